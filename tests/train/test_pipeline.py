"""Pipeline parallelism (``unitscale_jax.train.pipeline``): the schedule tables and their
bubbles, the flags' checks, and (in a subprocess with 8 fake CPU devices,
``pipeline_script.py``) the loss and every gradient of the pipelined model against the
unpipelined one, and a pipelined ``train`` run's loss curve against the unpipelined run's."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.train.conftest import ROOT, subprocess_env
from unitscale_jax import train
from unitscale_jax.train import pipeline
from unitscale_jax.train.flags import parse_train_args


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 2), (4, 8), (3, 5), (8, 16)])
def test_gpipe_bubble_counted_from_its_table(p, m):
    s = pipeline.make_schedule("gpipe", p, m)
    assert s.table.shape == (m + p - 1, p, 2) and s.ticks == m + p - 1
    assert s.idle() == p * (p - 1)  # the (P-1)-tick fill and drain of every stage
    assert s.bubble_fraction() == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert list(s.table[:, 0, 0]) == list(range(m)) + [-1] * (p - 1)  # stage 0: 0, 1, ...


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 3), (2, 6, 4)])
def test_circular_bubble_is_smaller(p, m, v):
    s = pipeline.make_schedule("circular", p, m, v)
    assert s.ticks == m * v + p - 1 and s.idle() == p * (p - 1)
    assert s.bubble_fraction() == pytest.approx((p - 1) / (m * v + p - 1), abs=1e-12)
    assert s.bubble_fraction() < pipeline.make_schedule("gpipe", p, m).bubble_fraction()
    # each stage runs its v chunks of every microbatch
    for stage in range(p):
        busy = s.table[:, stage][s.table[:, stage, 0] >= 0]
        assert sorted(map(tuple, busy)) == sorted((mb, r * p + stage) for mb in range(m)
                                                  for r in range(v))


def test_schedule_check_rejects_tables_the_executor_would_get_wrong():
    good = pipeline.gpipe(2, 3)
    good.check()
    late = good.table.copy()  # stage 1 runs microbatch 1 before stage 0 sent it
    late[1, 1], late[2, 1] = late[2, 1].copy(), late[1, 1].copy()
    missing = good.table.copy()
    missing[0, 0] = -1
    wrong_stage = good.table.copy()
    wrong_stage[0, 0] = (0, 1)
    for table, msg in [(late, "was not sent by stage 0"), (missing, "was not sent|runs 5 of"),
                       (wrong_stage, "wrong stage")]:
        with pytest.raises(ValueError, match=msg):
            pipeline.Schedule("gpipe", 2, 3, 1, table).check()
    with pytest.raises(ValueError, match="multiple of the stages"):
        pipeline.make_schedule("circular", 2, 3, 2)


def test_microbatches_are_strided_rows():
    x = np.arange(12).reshape(6, 2)
    mb = np.asarray(pipeline.split_microbatches(x, 3))
    assert mb.shape == (3, 2, 2) and mb[1].tolist() == [x[1].tolist(), x[4].tolist()]
    np.testing.assert_array_equal(pipeline.join_microbatches(mb), x)


@pytest.mark.parametrize("args,msg", [
    (["--pipeline-stages", "3", "--n-layers", "4"],
     "--pipeline-stages 3 does not divide --n-layers 4"),
    (["--pipeline-stages", "2", "--n-layers", "2", "--pipeline-schedule", "circular"],
     "--pipeline-stages 2 x --pipeline-chunks 2 does not divide --n-layers 2"),
    (["--pipeline-stages", "2", "--n-layers", "4", "--no-scan-layers"],
     "splits the stacked layers of --scan-layers; drop --no-scan-layers"),
    (["--microbatches", "4"], "--microbatches configure the pipeline: set --pipeline-stages"),
    (["--pipeline-stages", "2", "--pipeline-chunks", "2"],
     "the gpipe schedule has one chunk per stage"),
    (["--pipeline-stages", "2", "--n-layers", "4", "--pipeline-schedule", "circular",
      "--microbatches", "3"], "needs a multiple of --pipeline-stages 2"),
    (["--pipeline-stages", "0"], "--pipeline-stages must be >= 1"),
    (["--model", "encdec", "--pipeline-stages", "2", "--n-decoder-layers", "3"],
     "does not divide --n-decoder-layers 3"),
])
def test_bad_pipeline_flags_are_one_line_errors(args, msg):
    with pytest.raises(train.UsageError, match=msg.replace("(", r"\(")) as e:
        train.resolve(parse_train_args(args))
    assert "\n" not in str(e.value)


def test_pipeline_defaults_resolve():
    t = train.resolve(parse_train_args(["--pipeline-stages", "2"])).training
    assert (t.microbatches, t.pipeline_chunks) == (2, 1)
    t = train.resolve(parse_train_args(["--pipeline-stages", "2", "--n-layers", "4",
                                        "--pipeline-schedule", "circular"])).training
    assert (t.microbatches, t.pipeline_chunks) == (2, 2)
    assert train.resolve(parse_train_args([])).training.microbatches == 1


def test_pipelined_model_and_train_run_match_unpipelined_on_8_devices(tmp_path, shared_dirs):
    tfds_dir, cache = shared_dirs
    p = subprocess.run([sys.executable, str(ROOT / "tests/train/pipeline_script.py"),
                        tfds_dir, str(tmp_path)], cwd=ROOT, env=subprocess_env(cache, devices=8),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULTS "))
    res = json.loads(line[len("RESULTS "):])
    for name, r in res["equivalence"].items():
        assert r["layers_sharded_over_stage"], name
        assert r["loss_rel"] <= 1e-6, (name, r)
        assert r["grad_rel"] <= 5e-6, (name, r)  # every gradient leaf, relative to its max
        assert r["n_grads"] == r["n_params"], name
    assert set(res["equivalence"]) == {"gpipe 2 stages x 4 data", "gpipe 4 stages x 2 data",
                                       "circular 2 stages x 4 data",
                                       "gpipe 2 stages x 4 fsdp, padded encoder"}
    one, piped = res["train"]["unpipelined"], res["train"]["pipelined"]
    assert piped["rc"] == 0, piped["stderr"]
    assert "pipeline gpipe (2 stages x 4 microbatches, bubble 20.0%)" in piped["log"]
    assert len(one["train"]) == len(piped["train"]) == 6 and one["val"][-1] < one["val"][0]
    np.testing.assert_allclose(piped["train"], one["train"], rtol=1e-5)
    np.testing.assert_allclose(piped["val"], one["val"], rtol=1e-5)
    np.testing.assert_allclose(piped["grad_norm"], one["grad_norm"], rtol=1e-4)
    bad = res["bad_microbatches"]
    assert bad["rc"] == 2
    lines = bad["stderr"].strip().splitlines()
    assert len(lines) == 1 and "--microbatches 4 does not divide the 2 rows of each" in lines[0]
    for name, msg in [("bad_stages", "--pipeline-stages 3 does not divide the 8 devices"),
                      ("bad_teacher", "the --distill-from teacher's layers: --pipeline-stages 4 "
                                      "does not divide --n-layers 2")]:
        bad = res[name]
        lines = bad["stderr"].strip().splitlines()
        assert bad["rc"] == 2 and len(lines) == 1 and msg in lines[0], (name, bad)
