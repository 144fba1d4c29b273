"""``unitscale-jax plan``: the planner's figures are the real compiled step's, its collective
count follows the HLO's loops, the pod-sized presets have Llama's parameter counts, and the
resident memory of a real run is within 2x of what the plan says."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import ROOT, subprocess_env
from unitscale_jax import train
from unitscale_jax.cli import main
from unitscale_jax.train import plan as planner
from unitscale_jax.train.build import build_model
from unitscale_jax.train.presets import PARAMETERS, VOCAB_SIZES

# d_model 1024, two layers, a short batch: the buffers (state, gradients, Adam's temporaries)
# outweigh what compiling and the data pipeline add to the process
RSS_CONFIG = {
    "model": {"d_model": 1024, "n_layers": 2, "n_heads": 8, "attention_impl": "xla",
              "scan_layers": False},
    "data": {"seq_len": 32},
    "training": {"steps": 3, "batch_size": 4, "sharding": "fsdp", "eval_every": 0,
                 "checkpoint": False, "progress": False, "tensorboard": False, "plot": False}}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_pod_presets_have_llamas_parameter_counts(name):
    cfg = train.resolve(train.get_preset(name))
    model = nnx.eval_shape(lambda: build_model(cfg, VOCAB_SIZES[name]))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == PARAMETERS[name]
    m = cfg.model
    norm_gains = (2 * m.n_layers + 1) * m.d_model  # Llama's RMSNorm gains; u-muP has none
    published = {"1b": 1_100_048_384, "7b": 6_738_415_616}  # TinyLlama-1.1B, Llama-2-7B
    if name in published:
        assert n + norm_gains == published[name]


def test_mesh_flag():
    assert planner.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1, "stage": 1}
    assert planner.parse_mesh("fsdp=64, tensor=4")["tensor"] == 4
    assert planner.mesh_sharding(planner.parse_mesh("data=8")) == ("dp", None)
    assert planner.mesh_sharding(planner.parse_mesh("fsdp=8")) == ("fsdp", None)
    assert planner.mesh_sharding(planner.parse_mesh("data=2,tensor=4")) == ("tp", 4)
    assert planner.mesh_sharding(planner.parse_mesh("fsdp=64,tensor=4")) == ("fsdp_tp", 4)
    assert planner.mesh_sharding(planner.parse_mesh("stage=1")) == ("dp", None)
    assert planner.parse_mesh("fsdp=4,stage=2") == {"data": 1, "fsdp": 4, "tensor": 1,
                                                    "stage": 2}


@pytest.mark.parametrize("argv, needle", [
    (["--mesh", "fsdp=8,stage=2", "--pipeline-stages", "2"],
     "unknown option(s): --pipeline-stages"),
    (["--mesh", "data=2,fsdp=4"], "no mesh with both data and fsdp above 1"),
    (["--mesh", "fdsp=8"], "'fdsp=8' is not AXIS=SIZE with AXIS one of data, fsdp, tensor, "
                           "stage"),
    (["--mesh", "fsdp=0"], "the size of fsdp must be a positive integer, got '0'"),
    (["--mesh", "fsdp=x"], "the size of fsdp must be a positive integer, got 'x'"),
    (["--mesh", "fsdp=512"], "has 512 devices; plans compile for at most 256"),
    (["--mesh", "fsdp=8", "--accelerator", "tpu-v9"], "argument --accelerator: invalid choice"),
    (["--mesh", "fsdp=8", "--sharding", "tp"], "unknown option(s): --sharding"),
    ([], "the following arguments are required: --mesh"),
])
def test_bad_plan_options_are_one_line(capsys, argv, needle):
    assert main(["plan", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unitscale-jax: error: "), err
    assert needle in err[0], err[0]


HLO = """HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[32,16]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = f32[8,16]{1,0} all-reduce(%x), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, to_apply=%add
  ROOT %rs = f32[2,16]{1,0} reduce-scatter(%x), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}
"""  # noqa: E501


def test_collectives_are_counted_as_often_as_they_run():
    prof = planner.hlo_profile(HLO, 4)
    c = prof["collectives"]
    assert prof["loops"] == [3]
    assert c["all-gather"] == {"count": 3, "bytes": 3 * 32 * 16 * 2,
                               "wire_bytes": 3 * 3 / 4 * 32 * 16 * 2}  # ring: (n-1)/n of it
    assert c["all-reduce"] == {"count": 1, "bytes": 512, "wire_bytes": 2 * 1 / 2 * 512}  # n=2
    assert c["reduce-scatter"] == {"count": 1, "bytes": 128, "wire_bytes": 3 * 128}  # n=4
    assert c["all-to-all"]["count"] == c["collective-permute"]["count"] == 0


def test_roofline():
    acc = planner.ACCELERATORS["tpu-v5p"]
    p = planner.predict(acc, flops=459e12, hbm_bytes=2765e9 / 2, wire_bytes=600e9 / 4,
                        model_flops_per_step=2 * 459e12, n_devices=4)
    assert p["compute_s"] == pytest.approx(1.0) and p["memory_s"] == pytest.approx(0.5)
    assert p["collective_s"] == pytest.approx(0.25) and p["step_s"] == pytest.approx(1.25)
    assert p["bound"] == "compute" and p["mfu"] == pytest.approx(0.5 / 1.25)
    assert p["mfu_overlapped"] == pytest.approx(0.5)
    for a in planner.ACCELERATORS.values():
        assert a.source.startswith("https://") and a.source in planner.__doc__


def _rss(mode, tmp_path, cache, *extra):
    p = subprocess.run([sys.executable, str(ROOT / "tests/train/rss_script.py"), mode, *extra],
                       cwd=ROOT, env=subprocess_env(cache, devices=4), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(re.search(r"^MAXRSS (\d+)$", p.stdout, flags=re.M).group(1))


def test_plan_is_the_real_step_and_a_real_run_fits_it(tmp_path, shared_dirs):
    tfds_dir, cache = shared_dirs
    rss_config = {**RSS_CONFIG, "data": {**RSS_CONFIG["data"], "data_dir": tfds_dir}}
    p = subprocess.run([sys.executable, str(ROOT / "tests/train/plan_script.py"), tfds_dir,
                        str(tmp_path), json.dumps(rss_config)], cwd=ROOT,
                       env=subprocess_env(cache, devices=4), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULTS "))[8:])

    # cost_analysis of a sharded program is one device's share
    assert res["matmul"]["flops"] == res["matmul"]["global"] / 4

    fields = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")
    for name in ("unscanned", "scanned"):
        plan, real = res[name]["plan"], res[name]["real"]
        assert plan["devices"] == 4 and plan["sharding"] == "fsdp", name
        assert {f: plan["per_device"][f] for f in fields} == {f: real[f] for f in fields}, name
        assert plan["collectives"] == real["collectives"], name
        assert plan["per_device"]["argument_bytes"] == (plan["per_device"]["state_bytes"]
                                                        + plan["per_device"]["batch_bytes"])
        assert plan["collectives"]["all-gather"]["count"] > 0, name  # fsdp gathers weights
        assert plan["xla_cost_as_compiled"]["flops"] == real["flops"], name
    unscanned, scanned = res["unscanned"]["plan"], res["scanned"]["plan"]
    assert unscanned["flops_method"] == "direct"
    assert unscanned["flops_per_device"] == res["unscanned"]["real"]["flops"]
    # a scanned stack's loop body is counted once by XLA; the plan counts every layer
    assert scanned["while_loops"] and scanned["flops_method"].startswith("extrapolated")
    assert res["scanned"]["real"]["flops"] < 0.7 * unscanned["flops_per_device"]
    assert scanned["flops_per_device"] == pytest.approx(unscanned["flops_per_device"], rel=0.01)
    pred = unscanned["prediction"]
    assert pred["accelerator"] == "tpu-v5p" and 0 < pred["mfu"] <= pred["mfu_overlapped"] < 1

    # a pipelined run (fsdp=2 x stage=2, GPipe, 4 microbatches): memory and collectives are the
    # real pipelined step's, the bubble the schedule table's, which slows the predicted compute
    plan, real = res["pipelined"]["plan"], res["pipelined"]["real"]
    assert {f: plan["per_device"][f] for f in fields} == {f: real[f] for f in fields}
    assert plan["collectives"] == real["collectives"]
    assert plan["collectives"]["collective-permute"]["count"] > 0  # stages pass activations
    assert plan["pipeline"] == {"stages": 2, "microbatches": 4, "chunks": 1,
                                "schedule": "gpipe", "bubble_fraction": pytest.approx(1 / 5)}
    assert plan["flops_method"].startswith("extrapolated")
    pred = plan["prediction"]
    assert pred["compute_s"] == pytest.approx(plan["flops_per_device"] / (1 - 1 / 5)
                                              / planner.ACCELERATORS["tpu-v5p"].peak_flops)

    cli = res["cli"]
    assert cli["rc"] == 0, cli["stderr"]
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["devices"] == 4 and written["prediction"]["accelerator"] == "h100"
    bad = res["bad_batch"]
    assert bad["rc"] == 2 and "--batch-size 6 is not divisible by the 4 device(s)" in bad["stderr"]

    # A real run of the RSS config (4 fake devices, 3 steps): its peak resident memory over an
    # idle JAX process's is within 2x of the plan's, summed over the devices (one process
    # holds all four; as compiled on the CPU, without donation: old and new state both live)
    planned = 4 * res["rss_plan"]["per_device"]["peak_bytes"]
    assert planned > 1.5e9  # the buffers, not the compiler, dominate
    config = {**rss_config, "training": {**rss_config["training"],
                                         "run_dir": str(tmp_path / "rss_run")}}
    extra = _rss("run", tmp_path, cache, json.dumps(config)) - _rss("idle", tmp_path, cache)
    assert planned / 2 <= extra <= 2 * planned, (extra / 1e9, planned / 1e9)
