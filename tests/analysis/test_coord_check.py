"""analysis.coord_check: structure, flat u-muP and muP curves, SP curves growing with width;
width_ratios and its table on exact power laws."""

import numpy as np
import pytest

from unitscale_jax.analysis.coord import (
    coord_check,
    plot_coord_check,
    ratio_table,
    width_ratios,
    width_slopes,
)
from unitscale_jax.analysis.records import read_csv, write_csv
from unitscale_jax.nn import TransformerConfig

WIDTHS = (32, 64, 128)
STEPS = 3
CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=1, max_seq_len=16,
                           sp_init_std=None)


@pytest.fixture(scope="module")
def records():
    return coord_check(("umup", "mup", "sp"), WIDTHS, STEPS, batch_size=4, seq_len=16,
                       config=CONFIG)


def test_structure(records):
    n_ops = 2 + 13 + 1  # embed, one layer's 13 taps, final_norm, logits
    assert len(records) == 3 * len(WIDTHS) * (STEPS + 1) * n_ops
    assert set(records[0]) == {"parametrization", "width", "step", "index", "name", "mean_abs",
                               "rms", "loss", "learning_rate"}
    assert {r["width"] for r in records} == set(WIDTHS)
    assert {r["step"] for r in records} == set(range(STEPS + 1))
    names = [r["name"] for r in records if r["parametrization"] == "umup" and r["width"] == 32
             and r["step"] == 0]
    assert names[0] == "embed" and names[-1] == "logits" and "L0.mlp.out" in names
    assert all(np.isfinite(r["rms"]) and r["rms"] > 0 for r in records)
    # mean |x| <= RMS (Cauchy-Schwarz), with equality only for constant |x|
    assert all(0 < r["mean_abs"] <= r["rms"] * (1 + 1e-12) for r in records)
    # training makes progress on the memorised batch
    for p in ("umup", "mup", "sp"):
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

    # all start flat (SP here has fan_in^-1/2 init) ...
    for p in ("umup", "mup", "sp"):
        assert abs(mean_slope(p, 0)) < 0.1, p
    # ... then SP's activations grow with width while u-muP's and muP's stay put
    grow_umup, grow_mup, grow_sp = (mean_slope(p, STEPS) for p in ("umup", "mup", "sp"))
    assert abs(grow_umup) < 0.25 and abs(grow_mup) < 0.25, (grow_umup, grow_mup)
    assert grow_sp > 0.25, grow_sp
    assert grow_sp > max(abs(grow_umup), abs(grow_mup)) + 0.2, (grow_umup, grow_mup, grow_sp)
    # the hidden ratios at the last step say the same
    ratios = {(r["parametrization"], r["name"]): r["ratio"] for r in width_ratios(records)
              if r["name"].startswith("L0.")}
    assert max(v for (p, _), v in ratios.items() if p != "sp") < 2.0
    assert ratios[("sp", "L0.mlp.out")] > 2.0
    # slopes are exact for exact power laws
    fake = [{"parametrization": "x", "step": 0, "index": 0, "name": "a", "width": w,
             "rms": 3 * w**0.5, "mean_abs": 2.0}
            for w in (16, 64, 256)]
    assert width_slopes(fake, stat="rms")[0]["slope"] == pytest.approx(0.5)
    assert width_slopes(fake)[0]["slope"] == pytest.approx(0.0)


def test_width_ratios_of_power_laws():
    # a: 3 w^0.5 (ratio 4 over 16 -> 256), b: 5 w^-1 (ratio 16, falling); one width of c
    fake = [{"parametrization": p, "step": t, "index": i, "name": n, "width": w,
             "mean_abs": f(w) * (1 + t), "rms": 1.0}
            for p in ("x", "y") for t in (0, 2) for w in (16, 64, 256)
            for i, (n, f) in enumerate([("a", lambda w: 3 * w ** 0.5), ("b", lambda w: 5 / w)])]
    fake.append({**fake[0], "name": "c", "index": 2, "step": 2})
    got = width_ratios(fake)
    assert [(r["parametrization"], r["name"]) for r in got] == [("x", "a"), ("x", "b"),
                                                               ("y", "a"), ("y", "b")]
    a, b = got[0], got[1]
    assert a["step"] == 2 and a["ratio"] == pytest.approx(4.0) and a["slope"] == pytest.approx(0.5)
    assert (a["min_width"], a["max_width"], a["widths"]) == (16, 256, 3)
    assert a["max"] == pytest.approx(3 * 16 * 3) and a["min"] == pytest.approx(3 * 4 * 3)
    assert b["ratio"] == pytest.approx(16.0) and b["slope"] == pytest.approx(-1.0)
    assert b["min_width"] == 256
    assert width_ratios(fake, step=0)[0]["ratio"] == pytest.approx(4.0)
    assert {r["ratio"] for r in width_ratios(fake, stat="rms")} == {1.0}
    table = ratio_table(got)
    assert table.splitlines()[-1].split() == ["largest", "ratio", "16.00", "16.00"]
    assert "  4.00 (+0.50)" in table and " 16.00 (-1.00)" in table
    with pytest.raises(ValueError, match="no records at step 1"):
        width_ratios(fake, step=1)
    with pytest.raises(ValueError, match="stat must be one of"):
        width_ratios(fake, stat="std")
    with pytest.raises(ValueError, match="no records"):
        width_ratios([])


def test_csv_plot_and_errors(records, tmp_path):
    back = read_csv(write_csv(records, str(tmp_path / "cc.csv")))
    assert len(back) == len(records) and back[5] == records[5]
    for kw in ({}, {"lines": "step", "stat": "rms", "names": ["logits", "L0.mlp.out"]}):
        path = plot_coord_check(back, str(tmp_path / "cc.png"), **kw)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="lines must be"):
        plot_coord_check(records, str(tmp_path / "x.png"), lines="width")
    with pytest.raises(ValueError, match="no records for"):
        plot_coord_check(records, str(tmp_path / "x.png"), names=["nope"])
    with pytest.raises(ValueError, match="widths"):
        coord_check(widths=())
    with pytest.raises(ValueError, match="learning rate"):
        coord_check(("xp",), widths=(32,), steps=0, config=CONFIG)
    with pytest.raises(ValueError, match="multiple of d_head"):
        coord_check(("umup",), widths=(40,), steps=0, config=CONFIG)
