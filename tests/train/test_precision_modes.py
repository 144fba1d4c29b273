"""``--precision fp16|fp8-sim|fp8`` and ``--loss-scale``: dtypes of the backward pass, SP's
gradient underflow and its recovery by loss scaling, overflow handling, end-to-end runs."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import taps, train
from unitscale_jax.precision import E4M3, E5M2
from unitscale_jax.train import build
from unitscale_jax.train import precision as tprec
from unitscale_jax.train.flags import parse_train_args

VOCAB = 260


def _cfg(par, prec, *, d_model=32, n_layers=1, seq_len=16, scan=True):
    return train.resolve(train.get_preset("tiny").replace(
        model={"parametrization": par, "d_model": d_model, "n_layers": n_layers, "n_heads": 2,
               "scan_layers": scan},
        data={"seq_len": seq_len}, training={"precision": prec}))


def _batch(b, length, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (b, length + 1), 0, 256)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "where": jnp.ones((b, length), bool)}


def _loss_fn(cfg, batch):
    model = build.build_model(cfg, VOCAB)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return build.TASKS["decoder"].loss(nnx.merge(graphdef, p), batch, None)

    return loss, params


def test_precision_table_flags_and_errors():
    assert tuple(train.PRECISIONS) == ("fp32", "bf16", "fp16", "fp8-sim", "fp8")
    fp16 = train.precision_setup("fp16")
    assert fp16.dtype == "float16" and fp16.policy.mode == "none"
    assert fp16.policy.compute_dtype == jnp.float16
    sim = train.precision_setup("fp8-sim")
    assert sim.dtype == "float32" and sim.policy.mode == "sim"
    assert (sim.policy.fwd_format, sim.policy.bwd_format) == (E4M3, E5M2)
    real = train.precision_setup("fp8")
    assert real.dtype == "bfloat16" and real.policy.mode == "real"
    assert (real.policy.fwd_format, real.policy.bwd_format) == (E4M3, E5M2)
    tc = build.transformer_config(_cfg("sp", "fp16"), VOCAB)
    assert tc.dtype == jnp.float16 and tc.param_dtype == jnp.float32  # fp32 master weights

    cfg = parse_train_args(["--precision", "fp8-sim", "--loss-scale", "2^10"])
    assert cfg.training.precision == "fp8-sim" and cfg.training.loss_scale == 1024.0
    assert parse_train_args([]).training.loss_scale is None
    with pytest.raises(train.UsageError, match="--precision"):
        parse_train_args(["--precision", "fp4"])
    with pytest.raises(train.UsageError, match="--loss-scale must be > 0"):
        train.resolve(train.get_preset("tiny").replace(training={"loss_scale": 0.0}))
    with pytest.raises(train.UsageError, match="--precision must be one of"):
        train.precision_setup("fp4")


def _dot_dtypes(jaxpr, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars)
                       + (str(eqn.outvars[0].aval.dtype),))
        for p in eqn.params.values():
            for q in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(q, jax.extend.core.ClosedJaxpr):
                    _dot_dtypes(q.jaxpr, out)
                elif isinstance(q, jax.extend.core.Jaxpr):
                    _dot_dtypes(q, out)
    return out


@pytest.mark.parametrize("par", ["sp", "umup"])
def test_fp16_backward_runs_in_fp16(par):
    """Every matmul of the forward and backward pass has float16 operands; results are float16
    except the kernel gradients (sums over every token, accumulated in float32 and, in u-muP,
    scaled by B^-1/2 before the cast, or float16 overflows at large batches: ``ops._wide``;
    SP runs the same linear core with its scales at 1); the gradient reaching every tapped
    activation is float16; master gradients are float32."""
    cfg = _cfg(par, "fp16", n_layers=2, scan=False)
    batch = _batch(2, 8)
    loss, params = _loss_fn(cfg, batch)
    dots = _dot_dtypes(jax.make_jaxpr(jax.grad(lambda p: loss(p)[0]))(params).jaxpr, [])
    # 2 layers x 5 projections + readout, one forward and two backward matmuls each
    assert len(dots) >= 3 * (2 * 5 + 1)
    wide = ("float16", "float16", "float32")
    assert set(dots) - {wide} == {("float16", "float16", "float16")}, set(dots)
    assert dots.count(wide) == 2 * 5 + 1  # one per kernel

    model = build.build_model(cfg, VOCAB)
    graphdef, state = nnx.split(model)

    def run(perts):
        with taps.capture_activations(perts) as cap:
            out = build.TASKS["decoder"].loss(nnx.merge(graphdef, state), batch, None)[0]
        return out, cap.values

    shapes = jax.eval_shape(lambda: run(None)[1])
    assert len(shapes) > 20
    perts = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    g_acts = jax.jit(jax.grad(lambda p: run(p)[0]))(perts)
    assert {str(g.dtype) for g in g_acts.values()} == {"float16"}
    grads = jax.jit(jax.grad(lambda p: loss(p)[0]))(params)
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _grad_fn(par, prec, batch):
    """``scale -> flat gradients of the loss`` through ``scale_loss`` / ``unscale_grads`` (the
    scale is traced, so one compilation serves every scale)."""
    loss, params = _loss_fn(_cfg(par, prec, seq_len=batch["inputs"].shape[1]), batch)

    @jax.jit
    def fn(scale):
        grads, _ = jax.grad(tprec.scale_loss(loss, scale), has_aux=True)(params)
        grads = tprec.unscale_grads(grads, scale)
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    return fn


def test_loss_scaling_is_exact_in_fp32_and_recovers_sp_gradients_in_fp8_sim():
    """SP's gradients of the mean loss scale as 1/tokens: with 1024 tokens, E5M2 flushes a
    large share of them to zero; a loss scale of 2^10 lifts them back. u-muP needs none."""
    batch = _batch(16, 64)
    sp32 = _grad_fn("sp", "fp32", batch)
    ref = sp32(1.0)
    chex.assert_trees_all_close(sp32(2.0 ** 10), ref, rtol=1e-6, atol=0)

    def err(g, r):
        return float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))

    def new_zeros(g, r):
        return float(jnp.mean((g == 0) & (r != 0)))

    sp8 = _grad_fn("sp", "fp8-sim", batch)
    plain, scaled = sp8(1.0), sp8(2.0 ** 10)
    assert new_zeros(plain, ref) > 0.05 and err(plain, ref) > 0.15, (new_zeros(plain, ref),
                                                                     err(plain, ref))
    assert new_zeros(scaled, ref) < 0.01 and err(scaled, ref) < 0.5 * err(plain, ref)
    u_ref = _grad_fn("umup", "fp32", batch)(1.0)
    u_sim = _grad_fn("umup", "fp8-sim", batch)(1.0)
    assert new_zeros(u_sim, u_ref) < 0.01 and err(u_sim, u_ref) < 0.12  # E4M3/E5M2 rounding


def _run_cfg(tmp_path, tfds_dir, name, **training):
    return train.get_preset("tiny").replace(
        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "parametrization": "sp"},
        data={"seq_len": 32, "data_dir": tfds_dir}, optimizer={"lr": 2.0 ** -6},
        training={"batch_size": 8, "eval_batches": 2, "run_dir": str(tmp_path / name),
                  "progress": False, "tensorboard": False, "plot": False, "checkpoint": False,
                  **training})


def test_overflowing_loss_scale_skips_steps_then_stops(tmp_path, shared_dirs):
    """fp16 with a loss scale of 2^40: every gradient overflows, so the first
    MAX_CONSECUTIVE_OVERFLOWS steps are skipped (parameters unchanged: equal validation
    losses); then the update is applied, the parameters turn non-finite and the run stops
    with a message naming --loss-scale."""
    n = tprec.MAX_CONSECUTIVE_OVERFLOWS
    cfg = _run_cfg(tmp_path, shared_dirs[0], "overflow", steps=n + 5, eval_every=5,
                   precision="fp16", loss_scale=2.0 ** 40)
    with pytest.raises(train.Diverged, match="--loss-scale"):
        train.run(cfg, quiet=True)
    rows = train.read_metrics(tmp_path / "overflow" / "metrics.jsonl")
    tr = [r for r in rows if r["split"] == "train"]
    assert [r["skipped_steps"] for r in tr[:n]] == list(range(1, n + 1))
    assert not any(math.isfinite(r["grad_norm"]) for r in tr[:n])
    assert all(math.isfinite(r["loss"]) for r in tr[:n])
    val = [r["loss"] for r in rows if r["split"] == "validation"]
    assert len(val) == n // 5 + 1 and len(set(val)) == 1, val  # nothing was updated
    assert tr[-1]["step"] <= n + 2


def test_loss_scale_divides_out_before_the_optimizer(tmp_path, shared_dirs):
    """fp32 SGD (not scale invariant, unlike Adam): a loss-scaled run follows the same
    trajectory as an unscaled one, so the optimizer sees the gradients of the loss itself."""
    sgd = {"name": "sgd", "lr": 0.5, "schedule": "constant", "warmup_steps": 0}
    runs = [train.run(_run_cfg(tmp_path, shared_dirs[0], f"sgd{ls}", steps=6, eval_every=6,
                               loss_scale=ls).replace(optimizer=sgd), quiet=True)
            for ls in (None, 2.0 ** 10)]
    losses = [[r["loss"] for r in s["history"] if r["split"] == "train"] for s in runs]
    assert len(losses[0]) == 6 and losses[0][-1] < losses[0][0]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert runs[1]["skipped_steps"] == 0 and "skipped_steps" not in runs[0]["history"][1]


def test_real_fp8_run_trains(tmp_path, shared_dirs):
    s = train.run(_run_cfg(tmp_path, shared_dirs[0], "fp8", steps=10, eval_every=10,
                           precision="fp8").replace(model={"parametrization": "umup"},
                                                    optimizer={"lr": 1.0}), quiet=True)
    val = [r["loss"] for r in s["history"] if r["split"] == "validation"]
    assert all(math.isfinite(v) for v in val) and val[-1] < val[0], val
