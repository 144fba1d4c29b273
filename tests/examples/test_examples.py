"""Smoke tests of ``examples/*.py``: each script runs in a subprocess (short settings) and
what it prints is checked against what it claims."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NUMBER = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)"


def run_example(name: str, *args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_optax_chain():
    out = run_example("optax_chain.py", "--steps", "30", "--batch", "64").stdout
    assert out.rstrip().endswith("checks passed"), out
    for when in ("init", "trained"):
        assert f"{when}: unit RMS, finite updates and loss-scale invariance (2^-20..2^20): ok" \
            in out, out
    quarters = [float(m) for m in re.findall(rf"mean loss ({NUMBER})", out)]
    assert len(quarters) == 4 and quarters[-1] < 0.8 * quarters[0], quarters
    acc = float(re.search(rf"train accuracy ({NUMBER})", out).group(1))
    assert acc > 0.45, out  # 4 classes: chance is 0.25
    diffs = {(name.strip(), int(k)): float(d) for name, k, d in re.findall(
        rf"^(unit_scale \+ adamw|plain adamw)\s+loss x 2\^([-+]\d+): max \|param - "
        rf"param\(loss x 1\)\| = ({NUMBER})$", out, flags=re.M)}
    assert set(diffs) == {(n, k) for n in ("unit_scale + adamw", "plain adamw")
                          for k in (-16, 16)}, out
    assert diffs[("unit_scale + adamw", -16)] == diffs[("unit_scale + adamw", 16)] == 0.0
    assert diffs[("plain adamw", -16)] > 1e-3, out  # Adam's eps meets 2^-16-sized gradients


def _regression_rows(out: str) -> dict:
    rows = {}
    pattern = (rf"^(unit_scale\+sgd|sgd)\s+2\^(-?\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})"
               rf"\s+({NUMBER})\s+({NUMBER})$")
    for name, k, *values in re.findall(pattern, out, flags=re.M):
        rows[(name, int(k))] = [float(v) for v in values]
    return rows


def test_linear_regression(tmp_path):
    png = tmp_path / "fit.png"
    out = run_example("linear_regression.py", "--steps", "60", "--plot", str(png)).stdout
    rows = _regression_rows(out)
    exponents = (-20, -10, 0, 10, 20)
    assert set(rows) == {(n, k) for n in ("unit_scale+sgd", "sgd") for k in exponents}, out
    ls = re.search(rf"^least squares\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$", out, flags=re.M)
    ls_slope, ls_intercept, ls_loss = (float(v) for v in ls.groups())
    assert abs(ls_slope - 2.0) < 0.05 and abs(ls_intercept - 1.0) < 0.05

    ref = rows[("unit_scale+sgd", 0)]
    for k in exponents:  # slope, intercept, final loss, curve deviation, plateau factor
        slope, intercept, loss, dev, plateau = rows[("unit_scale+sgd", k)]
        assert abs(slope - ref[0]) <= 1e-6 and abs(intercept - ref[1]) <= 1e-6, (k, out)
        assert loss == ref[2] and dev == 0.0 and plateau == ref[4], (k, out)
        assert abs(slope - ls_slope) < 0.02 and abs(intercept - ls_intercept) < 0.02, out
        assert loss < 1.05 * ls_loss, out

    sgd = {k: rows[("sgd", k)] for k in exponents}
    assert abs(sgd[0][0] - ls_slope) < 0.2 and abs(sgd[0][1] - ls_intercept) < 0.05, out
    for k in (-20, -10):  # stalls: the line barely leaves 0
        assert abs(sgd[k][0]) < 0.1 and abs(sgd[k][1]) < 0.1 and sgd[k][2] > 2.0, (k, out)
    for k in (10, 20):  # diverges
        assert not all(math.isfinite(v) for v in sgd[k][:3]) or sgd[k][2] > 1e6, (k, out)
    assert f"plot saved to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_linear_regression_bad_flag_is_one_clear_error():
    proc = run_example("linear_regression.py", "--steps", "0", expect_rc=2)
    assert "error: --steps must be at least 1" in proc.stderr


def test_umup_from_ops():
    out = run_example("umup_from_ops.py").stdout
    rows = re.findall(rf"^(\S+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER}|-)(.*)$", out,
                      flags=re.M)
    stats = {name: (float(v), float(ev), float(g), None if eg == "-" else float(eg))
             for name, v, ev, g, eg, _ in rows}
    # 2 layers of 7 attention + 6 MLP activations, embed, final norm, logits; 5 weights a
    # layer, embed, readout
    assert len(stats) == 2 * 13 + 3 + 2 * 5 + 2, out
    d_model = 64
    assert stats["logits"][1] == round(d_model ** -0.5, 4)
    assert 0.5 <= stats["logits"][0] * d_model ** 0.5 <= 2.0, out  # readout alpha = 1/fan_in
    qk = [n for n in stats if n.endswith((".q", ".k"))]
    assert len(qk) == 4 and all(stats[n][3] is None for n in qk)
    assert all(stats[n][2] < 0.5 for n in qk), out  # the documented exception is real
    for name, (value, want_value, grad, want_grad) in stats.items():
        if name != "logits":
            assert want_value == 1.0 and 0.5 <= value <= 2.0, (name, out)
        if want_grad is not None:
            assert want_grad == 1.0 and 0.5 <= grad <= 2.0, (name, out)
    assert "78 of 78 stds within [0.5, 2] x their expected value" in out


def test_finetune_sst2_script(tmp_path):
    """The pretrain -> fine-tune -> evaluate script on a small SST-2-like task of its own (the
    real SST-2 run is the script's default)."""
    import json

    from tests.train.finetune_helpers import write_classification
    data = write_classification(tmp_path / "sst", n_train=1500, n_dev=40)
    out = tmp_path / "out"
    env = dict(os.environ, PRETRAIN_STEPS="10", FINETUNE_STEPS="10", VOCAB_SIZE="200",
               EXTRA_FLAGS="--eval-every 5 --batch-size 8 --no-progress --no-tensorboard "
                           "--no-plot",
               UNITSCALE_JAX=f"{sys.executable} -m unitscale_jax.cli")
    proc = subprocess.run(["bash", str(EXAMPLES / "finetune_sst2.sh"), str(data), str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("1. tokenizer", "2. masked-LM pretraining", "3. fine-tuning", "4. evaluation"):
        assert f"== {step}" in proc.stdout
    assert "init: trunk (embed, stack) from" in proc.stdout + proc.stderr
    report = json.loads((out / "finetuned" / "report.json").read_text())
    assert report["n_examples"] == 40 and 0 <= report["accuracy"] <= 1
    printed = float(re.search(rf"^accuracy\s+({NUMBER})", proc.stdout, flags=re.M).group(1))
    assert printed == round(report["accuracy"], 4)
    missing = subprocess.run(["bash", str(EXAMPLES / "finetune_sst2.sh"), str(tmp_path / "none")],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr


def test_pmap_data_parallel():
    out = run_example("pmap_data_parallel.py", "--steps", "20", "--devices", "4").stdout
    assert out.startswith("devices: 4 cpu, batch 16 (4 rows per device), 20 steps"), out
    losses = [float(v) for v in re.findall(rf"^step \d+: train loss ({NUMBER}) \(devices "
                                           r"agree: yes\)$", out, flags=re.M)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), out
    assert "replicas identical: yes" in out
    before, after = (float(v) for v in re.search(
        rf"^validation loss: ({NUMBER}) at initialisation, ({NUMBER}) after 20 steps", out,
        flags=re.M).groups())
    assert after < before - 1.0, out  # bytes: ~ln(256) = 5.5 nats at init


def test_pmap_data_parallel_batch_not_split_over_devices():
    proc = run_example("pmap_data_parallel.py", "--steps", "1", "--devices", "4",
                       "--batch-size", "10", expect_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmap_data_parallel.py: error: batch entry") \
        and "use a batch size that is a multiple of 4" in lines[0], proc.stderr
