"""The ``pmap`` train step (``unitscale_jax.train.pmap_step``) against the Trainer's ``jit``
+ mesh step (``--sharding dp``) on 8 fake CPU devices: the same losses, gradient norms and
updated parameters, step by step; and its one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.train.conftest import ROOT, subprocess_env
from unitscale_jax import train
from unitscale_jax.train import pmap_step

STEPS = 4
RTOL = 1e-5  # float32 sums over 8 devices vs over one batch: measured <= 2e-7


def test_pmap_step_matches_the_jit_mesh_step(tmp_path, shared_dirs):
    tfds_dir, cache = shared_dirs
    p = subprocess.run([sys.executable, str(ROOT / "tests/train/pmap_script.py"), tfds_dir,
                        str(tmp_path), str(STEPS)], cwd=ROOT,
                       env=subprocess_env(cache, devices=8), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert set(results) == {"umup_adamw_unit_scale", "umup_sgd_mlm", "sp_sgd_mlm"}
    for name, r in results.items():
        assert r["leading_axes"] == [8], name  # every state leaf: one copy per device
        assert r["init_rel_diff"] == 0.0, name  # the Trainer's initial parameters
        for key in ("loss", "grad_norm", "lr", "scored_tokens"):
            per_device = np.asarray(r["pmap"][key])
            assert per_device.shape == (STEPS, 8), (name, key)
            assert np.all(per_device == per_device[:, :1]), (name, key)  # devices agree
            np.testing.assert_allclose(per_device[:, 0], r["jit"][key], rtol=RTOL, atol=0,
                                       err_msg=f"{name} {key}")
        assert r["moved_rel"] > 0.1, name  # the parameters did train
        assert r["params_rel_diff"] < RTOL, (name, r["params_rel_diff"])
        assert r["replica_spread"] == 0.0 and r["model_rel_diff"] == 0.0, name
    # the MLM batches give the devices different numbers of scored tokens: the loss is the
    # token-weighted mean, not the mean of the devices' means
    for name in ("umup_sgd_mlm", "sp_sgd_mlm"):
        assert any(len(set(step)) > 1 for step in results[name]["per_device_tokens"]), name
    assert set(map(tuple, results["umup_adamw_unit_scale"]["per_device_tokens"])) == {(64,) * 8}


def test_shard_batch_splits_rows_in_device_order():
    batch = {"ids": np.arange(24).reshape(8, 3), "valid": np.arange(8) % 2 == 0}
    out = pmap_step.shard_batch(batch, 4)
    assert out["ids"].shape == (4, 2, 3) and out["valid"].shape == (4, 2)
    np.testing.assert_array_equal(out["ids"][1], batch["ids"][2:4])
    np.testing.assert_array_equal(out["valid"].reshape(-1), batch["valid"])


def test_shard_batch_rows_not_divisible_is_one_clear_error():
    with pytest.raises(train.UsageError, match=r"batch entry 'ids' of shape \(12, 3\) does not "
                       r"split into 8 equal parts .*multiple of 8\.$"):
        pmap_step.shard_batch({"ids": np.zeros((12, 3))}, 8)


@pytest.mark.parametrize("training, flag", [
    ({"sharding": "fsdp"}, "--sharding fsdp"),
    ({"distill_from": "runs/teacher"}, "--distill-from"),
])
def test_pmap_step_refuses_what_only_the_mesh_path_runs(training, flag):
    cfg = train.get_preset("tiny").replace(training=training)
    with pytest.raises(train.UsageError, match=f"does not run {flag}; use the Trainer"):
        pmap_step.make_pmap_train_step(cfg, vocab_size=260)


def test_replicate_and_unreplicate_round_trip():
    tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(3)}
    rep = pmap_step.replicate(tree)
    n = len(rep["step"])
    assert rep["w"].shape == (n, 2, 3) and rep["step"].shape == (n,)
    back = pmap_step.unreplicate(rep)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert int(back["step"]) == 3
