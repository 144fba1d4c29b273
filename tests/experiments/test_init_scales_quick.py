"""experiments/init_scales.py --quick: the flat-softmax prediction accounts for every attention
deviation from unit scale at init, and everything else in the decoder is within [0.5, 2]."""

import csv

import init_scales
import pytest


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("init_scales")
    rows = init_scales.main(["--quick", "--out", str(out)])
    for name in ("init_scales_quick.csv", "init_scales_quick_summary.csv"):
        with open(out / name) as f:
            assert len(list(csv.DictReader(f))) > 0
    with open(out / "init_scales_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return rows


def test_flat_softmax_prediction_matches_every_attention_layer(rows):
    preds = [(r["std"], r["flat_prediction"]) for r in rows if "flat_prediction" in r]
    grads = [(r["grad_std"], r["flat_prediction_grad"]) for r in rows
             if "flat_prediction_grad" in r]
    # decoder 2 + encoder 2 + encoder-decoder (2 encoder + 2 x 2 decoder) attention layers
    assert len(preds) == 10 and len(grads) == 20
    for measured, predicted in preds + grads:
        assert 0.9 <= measured / predicted <= 1.15, (measured, predicted)
    # and the prediction is what leaves [0.5, 2]: it is far from 1 where the measurement is
    assert max(p for _, p in preds) > 3 and min(p for _, p in grads) < 0.05


def test_decoder_outside_unit_range_only_where_the_rules_put_it(rows):
    dec = [r for r in rows if r["model"] == "decoder"]
    out = {r["tensor"] for r in dec if not r["in_range"]}
    # logits: readout alpha = 1/fan_in; q, k gradients: one attention scale, flat softmax
    assert out and all(t.endswith(("logits", ".q", ".k")) for t in out), out
    logits = next(r for r in dec if r["tensor"].endswith("logits"))
    assert abs(logits["std"] - 64 ** -0.5) < 0.02
