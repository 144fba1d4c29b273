"""Smoke test of ``experiments/low_precision.py --quick`` (in-process): every run is recorded
with its losses and end-of-training fractions, the plot and the underflow table are written,
and the measurements show the mechanism the full experiment is about (SP's gradients
underflow in E5M2, u-muP's do not, a loss scale lifts SP's)."""

import csv
import math

import low_precision
import pytest

DATA = str(low_precision.DEFAULT_DATA)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    if not low_precision.DEFAULT_DATA.is_file():
        pytest.fail(f"{DATA} (tiny Shakespeare) is missing; the experiment needs it.")
    out = tmp_path_factory.mktemp("low_precision")
    assert low_precision.main(["--quick", "--out", str(out), "--runs-dir",
                               str(out / "runs")]) == 0
    return out


def test_runs_table(out):
    rows = _rows(out / "low_precision.csv")
    got = [(r["parametrization"], r["precision"], r["loss_scale_label"]) for r in rows]
    want = [(p, prec, low_precision._ls_label(ls)) for p, prec, ls in low_precision.QUICK_RUNS]
    assert got == want
    for r in rows:
        assert r["diverged"] == "False" and r["seed"] == "0"
        val = float(r["final_val_loss"])
        assert 1.0 < val < math.log(260), r  # learned something in 40 steps
        assert math.isclose(float(r["bits_per_byte"]), val / math.log(2), rel_tol=1e-4)
        for cls, fmt, stat in low_precision.RUN_FRACTIONS:
            assert 0.0 <= float(r[low_precision._col(cls, fmt, stat)]) <= 1.0
    by = {(r["parametrization"], r["precision"], r["loss_scale_label"]): r for r in rows}
    u32 = float(by["umup", "fp32", "none"]["final_val_loss"])
    u8 = float(by["umup", "fp8-sim", "none"]["final_val_loss"])
    assert abs(u8 / u32 - 1) < 0.03, (u8, u32)
    # at the end, SP's activation gradients still underflow in E5M2; the loss scale lifts them
    sp8 = float(by["sp", "fp8-sim", "none"]["grad_e5m2_underflow"])
    sp8_ls = float(by["sp", "fp8-sim", "2^10"]["grad_e5m2_underflow"])
    assert sp8 > 0.1 and sp8_ls < sp8 / 10, (sp8, sp8_ls)
    assert float(by["umup", "fp8-sim", "none"]["grad_e5m2_underflow"]) < 0.01


def test_underflow_table(out):
    rows = _rows(out / "low_precision_underflow.csv")
    keys = {(r["model"], r["when"], r["tensor_class"]) for r in rows}
    for model in ("u-muP", "SP", "SP x loss scale 2^10"):
        for when in ("init", "end"):
            for cls in low_precision.CLASSES:
                assert (model, when, cls) in keys
    def get(model, when, cls, col, tokens="256"):
        return float(next(r[col] for r in rows if (r["model"], r["when"], r["tensor_class"],
                                                   r["tokens_per_step"]) ==
                          (model, when, cls, tokens)))
    assert get("SP", "init", "activation_grads", "e5m2_underflow") > 0.1
    assert get("u-muP", "init", "activation_grads", "e5m2_underflow") < 0.01
    assert get("SP x loss scale 2^10", "init", "activation_grads", "e5m2_underflow") < 0.05
    assert get("u-muP", "init", "activations", "e4m3_saturation") == 0.0
    # SP's gradients shrink as 1 / tokens per step: more of them underflow with more tokens
    more = str(max(low_precision.TOKENS_SWEEP["quick"]) * low_precision.SIZES["quick"]["seq_len"])
    assert (get("SP", "init", "activation_grads", "e5m2_underflow", more)
            > get("SP", "init", "activation_grads", "e5m2_underflow"))


def test_plot(out):
    with open(out / "low_precision.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
