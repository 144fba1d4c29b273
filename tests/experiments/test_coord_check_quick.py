"""``experiments/coord_check.py --quick`` (u-muP and SP; widths 32 ... 256, one layer, 5 Adam
steps): every u-muP module stays within the bound of 2 across widths, SP's hidden modules all
grow with width, and the records, summary, figure and metadata are written and agree."""

import csv
import json

import coord_check as experiment
import pytest

from unitscale_jax.analysis import coord


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_coord_check_quick_umup_within_two_sp_grows(tmp_path):
    out = tmp_path / "o"
    res = experiment.main(["--quick", "--out", str(out), "--parametrizations", "umup,sp"],
                          log=lambda m: None)
    records = _rows(out / "coord_check_quick.csv")
    n_ops = 2 + 13 + 1  # embed, one layer's 13 taps, final_norm, logits
    assert len(records) == 2 * 4 * 6 * n_ops
    assert {int(r["width"]) for r in records} == {32, 64, 128, 256}

    # the ratios of the records CSV (re-read) at step 5
    for r in records:
        for k in ("width", "step", "index"):
            r[k] = int(r[k])
        for k in ("mean_abs", "rms"):
            r[k] = float(r[k])
    ratios = coord.width_ratios(records)
    assert {r["step"] for r in ratios} == {5}
    umup = {r["name"]: r for r in ratios if r["parametrization"] == "umup"}
    sp = {r["name"]: r for r in ratios if r["parametrization"] == "sp"}
    assert len(umup) == len(sp) == n_ops
    # u-muP: every module within a factor 2 across an 8x range of widths
    over = {n: round(r["ratio"], 2) for n, r in umup.items() if r["ratio"] > 2.0}
    assert not over, over
    # SP: every hidden module (norms aside) grows with width, its matmul outputs by > 2x
    hidden = [n for n in sp if experiment.is_hidden(n)]
    assert len(hidden) == 11
    assert all(sp[n]["slope"] > 0.1 for n in hidden), {n: sp[n]["slope"] for n in hidden}
    for n in ("L0.attn.proj", "L0.mlp.out", "L0.mlp.resid"):
        assert sp[n]["ratio"] > 2.0 and sp[n]["ratio"] > 2 * umup[n]["ratio"], n

    # the summary CSV holds the same ratios, and the claims follow from them
    summary = [r for r in _rows(out / "coord_check_quick_summary.csv") if r["step"] == "5"]
    for r in summary:
        want = (umup if r["parametrization"] == "umup" else sp)[r["name"]]["ratio"]
        assert float(r["ratio"]) == pytest.approx(want, rel=1e-4)  # 6 digits in the CSVs
        assert r["within_bound"] == str(float(r["ratio"]) <= 2.0)
    claims = res["claims"]
    assert claims["umup"]["claim_within_bound"] is True
    assert claims["umup"]["max_ratio"] == pytest.approx(max(r["ratio"] for r in umup.values()),
                                                        rel=1e-4)
    assert claims["sp"]["claim_hidden_grow"] is True and claims["sp"]["hidden_growing"] == 11
    with open(out / "coord_check_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "coord_check_quick_meta.json").read_text())
    assert meta["command"].startswith("python experiments/coord_check.py --quick")
    assert meta["settings"]["widths"] == [32, 64, 128, 256]
    assert [(t["parametrization"], t["width"]) for t in meta["timings"]] == [
        (p, w) for p in ("umup", "sp") for w in (32, 64, 128, 256)]


def test_coord_check_bad_arguments():
    with pytest.raises(SystemExit, match="--lr takes PAR=LR"):
        experiment.main(["--quick", "--lr", "sp=-1"])
    with pytest.raises(SystemExit, match="--widths needs two or more"):
        experiment.main(["--widths", "64,72"])
    with pytest.raises(SystemExit, match="--parametrizations takes"):
        experiment.main(["--parametrizations", "umup,xp"])
    assert experiment.learning_rates(["mup=0.5"], ["mup", "sp"]) == {
        "mup": 0.5, "sp": coord.LEARNING_RATES["sp"]}
