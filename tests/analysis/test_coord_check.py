"""analysis.coord_check: structure, flat u-muP curves, SP curves growing with width."""

import numpy as np
import pytest

from unitscale_jax.analysis.coord import coord_check, plot_coord_check, width_slopes
from unitscale_jax.analysis.records import read_csv, write_csv
from unitscale_jax.nn import TransformerConfig

WIDTHS = (32, 64, 128)
STEPS = 3
CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=1, max_seq_len=16,
                           sp_init_std=None)


@pytest.fixture(scope="module")
def records():
    return coord_check(("umup", "sp"), WIDTHS, STEPS, batch_size=4, seq_len=16, config=CONFIG)


def test_structure(records):
    n_ops = 2 + 13 + 1  # embed, one layer's 13 taps, final_norm, logits
    assert len(records) == 2 * len(WIDTHS) * (STEPS + 1) * n_ops
    assert set(records[0]) == {"parametrization", "width", "step", "index", "name", "rms",
                               "loss", "learning_rate"}
    assert {r["width"] for r in records} == set(WIDTHS)
    assert {r["step"] for r in records} == set(range(STEPS + 1))
    names = [r["name"] for r in records if r["parametrization"] == "umup" and r["width"] == 32
             and r["step"] == 0]
    assert names[0] == "embed" and names[-1] == "logits" and "L0.mlp.out" in names
    assert all(np.isfinite(r["rms"]) and r["rms"] > 0 for r in records)
    # training makes progress on the memorised batch
    for p in ("umup", "sp"):
        loss = {r["step"]: r["loss"] for r in records
                if r["parametrization"] == p and r["width"] == 128}
        assert loss[STEPS] < loss[0], (p, loss)


def test_umup_flat_sp_growing(records):
    slopes = width_slopes(records)

    def mean_slope(p, step):
        # hidden activations (the layer's ops, norms excluded: they are flat by construction)
        s = [r["slope"] for r in slopes if r["parametrization"] == p and r["step"] == step
             and r["name"].startswith("L0.") and not r["name"].endswith("norm")]
        assert len(s) == 11
        return float(np.mean(s))

    # both start flat (SP here has fan_in^-1/2 init) ...
    assert abs(mean_slope("umup", 0)) < 0.1 and abs(mean_slope("sp", 0)) < 0.1
    # ... then SP's activations grow with width while u-muP's stay put
    grow_umup, grow_sp = mean_slope("umup", STEPS), mean_slope("sp", STEPS)
    assert abs(grow_umup) < 0.25, grow_umup
    assert grow_sp > 0.25, grow_sp
    assert grow_sp > abs(grow_umup) + 0.2, (grow_umup, grow_sp)
    # slopes are exact for exact power laws
    fake = [{"parametrization": "x", "step": 0, "index": 0, "name": "a", "width": w,
             "rms": 3 * w**0.5}
            for w in (16, 64, 256)]
    assert width_slopes(fake)[0]["slope"] == pytest.approx(0.5)


def test_csv_plot_and_errors(records, tmp_path):
    back = read_csv(write_csv(records, str(tmp_path / "cc.csv")))
    assert len(back) == len(records) and back[5] == records[5]
    path = plot_coord_check(back, str(tmp_path / "cc.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no records for"):
        plot_coord_check(records, str(tmp_path / "x.png"), names=["nope"])
    with pytest.raises(ValueError, match="widths"):
        coord_check(widths=())
    with pytest.raises(ValueError, match="learning rate"):
        coord_check(("mup",), widths=(32,), steps=0, config=CONFIG)
    with pytest.raises(ValueError, match="multiple of d_head"):
        coord_check(("umup",), widths=(40,), steps=0, config=CONFIG)
