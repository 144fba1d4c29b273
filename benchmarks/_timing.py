"""Shared timing helpers: interleaved runs, medians, a machine description, and the
trainer's train step as a zero-arg callable."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
    }


def interleaved_times(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Per-run wall times (s) of zero-arg callables run round-robin (drift hits all alike)."""
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return times


def train_step_runner(model, tx, ids, *, lr: float):
    """A zero-arg callable running one jitted step of the trainer's ``make_train_step``
    (forward, backward, ``tx`` update, gradient norm; state donated) of ``model.loss(ids)``
    (any model whose state is its ``nnx.Param`` s); returns the loss."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from unitscale_jax.train.step import make_train_step, new_state
    from unitscale_jax.train.tasks import ModelLoss

    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.copy, params)  # donated: the model's own arrays stay valid
    step = jax.jit(make_train_step(graphdef, ModelLoss(), tx, optax.constant_schedule(lr),
                                   use_value=False), donate_argnums=(0,))
    box = {"state": new_state(params, tx), "batch": {"ids": ids}}

    def run():
        box["state"], metrics = step(box["state"], box["batch"])
        return metrics["loss"]

    return run


def interleaved_medians(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Median wall time (s) of each zero-arg callable, run round-robin."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, runs, warmup).items()}


def paired_ratios(times: dict, base: str) -> dict:
    """Median over rounds of each variant's time divided by ``base``'s in the same round
    (robust to load drifting between rounds)."""
    return {k: statistics.median(a / b for a, b in zip(v, times[base])) for k, v in times.items()}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
