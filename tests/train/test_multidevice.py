"""One jitted step over a Mesh of 8 (fake CPU) devices gives the 1-device loss curve."""

import json
import subprocess
import sys

import numpy as np

from tests.train.conftest import ROOT, subprocess_env


def test_eight_devices_match_one_device(tmp_path, shared_dirs):
    tfds_dir, cache = shared_dirs
    p = subprocess.run([sys.executable, str(ROOT / "tests/train/multidevice_script.py"),
                        tfds_dir, str(tmp_path)], cwd=ROOT, env=subprocess_env(cache, devices=8),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULTS "))
    res = json.loads(line[len("RESULTS "):])
    one = res["one"]
    assert one["devices"] == 1 and len(one["train"]) == 8 and len(one["val"]) == 3
    assert one["val"][-1] < one["val"][0] - 0.5  # it trains
    for kind in ("dp", "fsdp", "tp", "fsdp_tp"):
        r = res[kind]
        assert r["devices"] == 8, kind
        assert (r["sharded_params"] > 0) == (kind != "dp"), (kind, r["sharded_params"])
        np.testing.assert_allclose(r["train"], one["train"], rtol=2e-5, atol=0, err_msg=kind)
        np.testing.assert_allclose(r["val"], one["val"], rtol=2e-5, atol=0, err_msg=kind)
        np.testing.assert_allclose(r["grad_norm"], one["grad_norm"], rtol=1e-4, err_msg=kind)
    bad = res["bad_batch"]
    assert bad["rc"] == 2
    lines = bad["stderr"].strip().splitlines()
    assert len(lines) == 1 and "--batch-size 12 is not divisible by the 8 device(s)" in lines[0]
