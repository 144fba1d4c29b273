"""``experiments/scaling_rule.py --quick`` on width and batch results written for the test:
the slope of log2 LR* against log2 parameters, the grows / constant / shrinks verdict, and
the check of M ∝ B ∝ L (k_M + k_B = 1) come out as the numbers say."""

import csv
import json
import math

import pytest
import scaling_rule as experiment


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _n_params(width):
    return 12 * width * width  # log2 M = 2 log2 width + const


@pytest.fixture()
def results(tmp_path):
    widths = (16, 32, 64, 128)
    # u-muP: flat (noise around 2^-0.5); SP: LR ∝ 1/width = M^-1/2
    umup = dict(zip(widths, (-0.45, -0.55, -0.45, -0.55)))
    sp = {w: -2 - math.log2(w) for w in widths}
    _write(tmp_path / "lr_transfer_quick_summary.csv",
           [{"parametrization": p, "width": w, "depth": 2, "best_lr_log2": round(v),
             "vertex_lr_log2": v} for p, d in (("umup", umup), ("sp", sp))
            for w, v in d.items()])
    _write(tmp_path / "lr_transfer_quick_runs.csv",
           [{"parametrization": p, "width": w, "depth": 2, "n_params": _n_params(w)}
            for p in ("umup", "sp") for w in widths])
    # umup_workflow: the tuned arms only (the transferred one has a fixed LR by design)
    _write(tmp_path / "umup_workflow_quick_summary.csv",
           [{"width": w, "n_params": _n_params(w), "arm": arm, "best_lr_log2": v,
             "vertex_lr_log2": ""} for w in (64, 128, 256, 512)
            for arm, v in (("sp_tuned", -8 - math.log2(w / 64)), ("umup_default_tuned", 0),
                           ("umup_transferred", 5))])
    _write(tmp_path / "batch_horizon_quick_fits.csv",
           [{"parametrization": "umup", "axis": "batch", "k": 1.0, "k_se": 0.1},
            {"parametrization": "sp", "axis": "batch", "k": 0.5, "k_se": 0.05},
            {"parametrization": "sp", "axis": "horizon", "k": -9, "k_se": 0.1}])
    return tmp_path


def test_verdicts_and_rule(results):
    res = experiment.main(["--quick", "--results", str(results)], log=lambda m: None)
    rows = {(r["source"], r["parametrization"]): r for r in res["rows"]}
    assert set(rows) == {(s, p) for s in ("lr_transfer", "umup_workflow")
                         for p in ("umup", "sp")}
    sp = rows[("lr_transfer", "sp")]
    assert sp["k_model"] == pytest.approx(-0.5) and sp["k_width"] == pytest.approx(-1.0)
    assert sp["lr_with_model_size"] == "shrinks"
    # doubling M and B: 2^(-0.5 + 0.5) = 1, not the rule's 2
    assert sp["lr_factor_doubling_model_and_batch"] == pytest.approx(1.0)
    assert sp["rule_lr_doubles"] is False
    um = rows[("lr_transfer", "umup")]
    assert um["lr_with_model_size"] == "constant" and um["k_model_lo"] < 0 < um["k_model_hi"]
    assert um["rule_lr_doubles"] is True  # k_M ~ 0 and k_B = 1 +- 0.1
    wf = rows[("umup_workflow", "sp")]
    assert wf["widths"] == "64/128/256/512" and wf["k_model"] == pytest.approx(-0.5)
    assert rows[("umup_workflow", "umup")]["k_model"] == pytest.approx(0.0)
    out = list(csv.DictReader(open(results / "scaling_rule_quick.csv")))
    assert len(out) == 4
    meta = json.loads((results / "scaling_rule_quick_meta.json").read_text())
    assert meta["claims"]["lr_transfer_sp"]["optimal_lr_with_model_size"] == "shrinks"
    assert len(meta["inputs"]) == 3
    with open(results / "scaling_rule_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_inputs(results):
    (results / "batch_horizon_quick_fits.csv").unlink()
    with pytest.raises(SystemExit, match="batch_horizon.py --quick"):
        experiment.main(["--quick", "--results", str(results)], log=lambda m: None)
    with pytest.raises(SystemExit, match="no width-transfer summary"):
        experiment.main(["--quick", "--results", str(results / "nowhere")],
                        log=lambda m: None)
    with pytest.raises(SystemExit, match="--width-sources"):
        experiment.main(["--width-sources", "nope"], log=lambda m: None)
