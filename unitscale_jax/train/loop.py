"""``run(config) -> summary``: one training run, start to finish (or resumption to finish).

Order of work: resolve the config -> (multi-host init) -> data source and tokenizer ->
device mesh -> abstract model, optimizer and state shardings -> restore the newest valid
checkpoint, else initialise (one jitted init straight into the shardings) -> the loop:
train step, metrics, evaluation, checkpoint -> final evaluation, checkpoint, plot, summary.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import nn
from unitscale_jax.train import build, distributed, step as steplib
from unitscale_jax.train.checkpoint import Checkpoints
from unitscale_jax.train.config import Config, differences, resolve
from unitscale_jax.train.data import RunData, load_data
from unitscale_jax.train.errors import TrainingStopped, UsageError
from unitscale_jax.train.metrics import MetricsWriter, read_metrics, truncate
from unitscale_jax.train.plotting import plot_losses


class _Log:
    """Prints one-line reports on the primary process without breaking the progress bar."""

    def __init__(self, enabled: bool, quiet: bool = False):
        self.enabled, self.quiet, self.bar = enabled, quiet, None

    def __call__(self, msg: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def _prepare_run_dir(cfg: Config, given: Config) -> Path:
    run_dir = Path(cfg.training.run_dir)
    cfg_path = run_dir / "config.json"
    if cfg.training.overwrite and run_dir.exists() and jax.process_index() == 0:
        for name in ("checkpoints", "corrupt_checkpoints", "tensorboard", "metrics.jsonl",
                     "config.json", "loss.png", "summary.json"):
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if cfg_path.exists():
        try:
            old = Config.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, UsageError, TypeError) as e:
            raise UsageError(f"{cfg_path} is not a valid run config ({e}); pass --overwrite to "
                             "start a new run there, or another --run-dir.") from None
        diff = differences(old, given)
        if diff:
            raise UsageError(f"{run_dir} holds a run with a different config ({'; '.join(diff)}); "
                             "rerun with the same options to resume it, or pass --overwrite or "
                             "another --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class _StopSignals:
    """SIGINT / SIGTERM (Ctrl-C, a cluster's preemption notice) end the run cleanly: the loop
    finishes its step, saves a checkpoint and stops. A second SIGINT interrupts at once."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def init_state_fn(cfg: Config, vocab_size: int, tx) -> Callable[[], dict]:
    """A function (to jit) returning a freshly initialised train state."""

    def init():
        model = build.build_model(cfg, vocab_size)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
                "rng": jax.random.key_data(jax.random.key(cfg.training.seed))}

    return init


def _evaluate(eval_step, params, batches: list, par) -> tuple[float, int]:
    total, count = 0.0, 0
    for b in batches:
        s, n = eval_step(params, steplib.put_batch(b, par))
        total += float(s)
        count += int(n)
    return total / max(count, 1), count


def run(config: Config | dict, *, quiet: bool = False,
        devices: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``config``.

    Args:
      config: a ``Config`` (or its ``to_dict()``); ``None`` fields take their defaults.
      quiet: no progress bar or reports (the metrics files are still written).
      devices: the devices of the mesh (default every device of every process).

    Returns:
      A summary dict: ``run_dir``, ``steps``, ``start_step`` (> 0 when resumed),
      ``final_train_loss``, ``final_val_loss``, ``final_bits_per_byte``, ``tokens_per_s``,
      ``time_to_first_step_s`` (includes compilation), ``startup_s``, ``train_s``,
      ``n_params``, ``devices``, ``sharded_params`` (parameter arrays split over devices),
      the output paths (``metrics``, ``tensorboard``, ``plot``,
      ``checkpoint``, ``config``) and ``history`` (this call's metric rows).

    Raises:
      UsageError: bad options or data (one-line message).
      TrainingStopped: a non-finite loss or an interrupt (the last good checkpoint stays).
    """
    t_start = time.perf_counter()
    given = Config.from_dict(config) if isinstance(config, dict) else config
    cfg = resolve(given)
    t = cfg.training
    distributed.maybe_initialize(t.distributed)
    primary = jax.process_index() == 0
    log = _Log(primary, quiet)
    run_dir = _prepare_run_dir(cfg, given)

    data: RunData = load_data(cfg, log)
    task = build.get_task(cfg.model.kind)
    tcfg = build.transformer_config(cfg, data.vocab_size)
    par = steplib.make_parallel(t.sharding, tensor_parallel=t.tensor_parallel,
                                tensor_dims=(tcfg.n_heads, tcfg.ffn_dim, tcfg.vocab_size),
                                devices=devices)
    n_proc = jax.process_count()
    if t.batch_size % par.batch_shards or t.batch_size % n_proc:
        raise UsageError(f"--batch-size {t.batch_size} is not divisible by the {par.batch_shards} "
                         f"device(s) the batch is split over ({par.describe()}); use a multiple "
                         f"of {math.lcm(par.batch_shards, n_proc)}.")

    abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, data.vocab_size))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params))
    info = nnx.to_pure_dict(nn.param_info(abstract_model))
    tx, schedule = build.build_optimizer(cfg, info)
    init = init_state_fn(cfg, data.vocab_size, tx)
    abstract_state = jax.eval_shape(init)
    p_shardings = steplib.param_shardings(abstract_params, par)
    shardings = steplib.state_shardings(abstract_state, p_shardings, par)
    n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(p_shardings))
    log(f"model: {cfg.model.kind}, {cfg.model.parametrization}, {n_params / 1e6:.2f}M params "
        f"(d_model {tcfg.d_model}, {tcfg.n_layers} layers, {tcfg.n_heads} heads), "
        f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g} {cfg.optimizer.schedule}, precision "
        f"{t.precision}; {par.describe()}")

    ckpt = (Checkpoints(run_dir / "checkpoints", keep=t.keep_checkpoints,
                        async_save=t.async_checkpointing, log=log) if t.checkpoint else None)
    train_it = data.train_iterator(cfg, shard_index=jax.process_index(), shard_count=n_proc)
    restored = None
    if ckpt is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        restored = ckpt.restore_latest(target)
    metrics_path = run_dir / "metrics.jsonl"
    if restored is not None:
        start, state, data_state = restored
        if start > t.steps:
            ckpt.close()
            raise UsageError(f"the checkpoint in {ckpt.directory} is at step {start}, past "
                             f"--steps {t.steps}; pass --steps {start} or more to continue, or "
                             "--overwrite to start again.")
        train_it.set_state(data_state)
        if primary:
            truncate(metrics_path, start)
        log(f"resumed from the checkpoint at step {start} in {ckpt.directory}"
            + ("; the run is already complete (raise --steps to train further)"
               if start == t.steps else ""))
    else:
        start = 0
        state = jax.jit(init, out_shardings=shardings)()
        if primary:
            metrics_path.write_text("")
    if primary:
        (run_dir / "config.json").write_text(given.to_json() + "\n")

    train_step, eval_step = steplib.jit_steps(
        steplib.make_train_step(graphdef, task, tx, schedule, use_value=build.needs_value(cfg),
                                loss_scale=t.loss_scale),
        steplib.make_eval_step(graphdef, task), shardings, par,
        donate=jax.default_backend() != "cpu")
    eval_batches = data.eval_batches(cfg, t.eval_batches)
    writer = MetricsWriter(run_dir, tensorboard=t.tensorboard,
                           purge_step=start + 1 if start else None, enabled=primary)
    history: list[dict] = []
    tokens_per_step = t.batch_size * cfg.data.seq_len
    last = {"train": None, "validation": None}
    for row in read_metrics(metrics_path) if restored is not None else ():
        last[row["split"]] = row  # resumed: the latest rows already written
    timing = {"first_step_s": None, "train_s": 0.0, "steps_timed": 0}

    def evaluate(s):
        loss, _ = _evaluate(eval_step, state["params"], eval_batches, par)
        bpb = loss / math.log(2) / data.bytes_per_token
        row = writer.write(s, "validation", {"loss": loss, "bits_per_byte": bpb})
        history.append(row)
        last["validation"] = row
        log(f"step {s}: validation loss {loss:.4f}, {bpb:.4f} bits/byte")
        return row

    def check_finite(s, m):
        # with --loss-scale, overflowing gradients skip the step (train.precision)
        grads_ok = math.isfinite(m["grad_norm"]) or t.loss_scale is not None
        if not (math.isfinite(m["loss"]) and grads_ok):
            if ckpt is not None:
                ckpt.wait()
            good = max(ckpt.steps(), default=None) if ckpt is not None else None
            where = (f"the last good checkpoint is step {good} in {ckpt.directory}" if good
                     is not None else "no checkpoint was written")
            raise TrainingStopped(f"non-finite training loss ({m['loss']}, gradient norm "
                                  f"{m['grad_norm']}) at step {s}; stopped, {where}. Lower --lr "
                                  + ("or --loss-scale " if t.loss_scale is not None else "")
                                  + "or change --precision.")

    stop = _StopSignals()
    from tqdm.auto import tqdm
    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not (t.progress and primary and not quiet), desc="train")
    log.bar = bar
    t_loop = time.perf_counter()
    startup_s = t_loop - t_start
    tick, tick_step = time.perf_counter(), start
    ema_tps = None
    try:
        with par.context():
            if start == 0 and t.eval_every:
                evaluate(0)
                tick = time.perf_counter()
            for i in range(start, t.steps):
                s = i + 1
                batch = steplib.put_batch(next(train_it), par)
                state, m = train_step(state, batch)
                if timing["first_step_s"] is None:
                    jax.block_until_ready(m)
                    timing["first_step_s"] = time.perf_counter() - tick
                    tick, tick_step = time.perf_counter(), s
                ckpt_now = ckpt is not None and t.checkpoint_every and s % t.checkpoint_every == 0
                if s % t.log_every == 0 or ckpt_now or s == t.steps:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    now = time.perf_counter()
                    if s > tick_step:
                        tps = tokens_per_step * (s - tick_step) / (now - tick)
                        timing["train_s"] += now - tick
                        timing["steps_timed"] += s - tick_step
                    else:
                        tps = float("nan")
                    tick, tick_step = now, s
                    check_finite(s, m)
                    values = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"]}
                    if "skipped_steps" in m:
                        values["skipped_steps"] = int(m["skipped_steps"])
                    if math.isfinite(tps):  # not on the step that compiled
                        values["tokens_per_s"] = tps
                    row = writer.write(s, "train", {**values, "elapsed_s": now - t_start})
                    history.append(row)
                    last["train"] = row
                    if math.isfinite(tps):
                        ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
                    bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False,
                                    tok_s="compiled" if ema_tps is None else f"{ema_tps:,.0f}")
                if t.eval_every and s % t.eval_every == 0:
                    evaluate(s)
                    tick = time.perf_counter()
                if ckpt_now:
                    ckpt.save(s, state, train_it.get_state())
                bar.update(1)
                if stop.received:
                    saved = ""
                    if ckpt is not None:
                        if s not in ckpt.steps():
                            ckpt.save(s, state, train_it.get_state(), force=True)
                        ckpt.wait()
                        saved = f"checkpoint saved at step {s}; "
                    raise TrainingStopped(f"{stop.received} received at step {s}: {saved}rerun "
                                          "the same command to resume.")
            if last["validation"] is None or last["validation"]["step"] != t.steps:
                evaluate(t.steps)
            if ckpt is not None and t.steps not in ckpt.steps():
                ckpt.save(t.steps, state, train_it.get_state(), force=True)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the step loop
        bar.close()
        raise TrainingStopped("interrupted; the last complete checkpoint is kept; rerun the same "
                              "command to resume.") from None
    finally:
        stop.restore()
        bar.close()
        log.bar = None
        if ckpt is not None:
            ckpt.close()
        writer.close()

    plot_path = None
    if t.plot and primary:
        plot_path = plot_losses(metrics_path, run_dir / "loss.png",
                                title=f"{cfg.preset} {cfg.model.kind} "
                                      f"{cfg.model.parametrization}, {t.precision}")
    tps = (tokens_per_step * timing["steps_timed"] / timing["train_s"]
           if timing["train_s"] > 0 else None)
    summary = {
        "run_dir": str(run_dir), "steps": t.steps, "start_step": start,
        "final_train_loss": last["train"]["loss"] if last["train"] else None,
        "final_val_loss": last["validation"]["loss"] if last["validation"] else None,
        "final_bits_per_byte": (last["validation"]["bits_per_byte"]
                                if last["validation"] else None),
        "tokens_per_s": tps, "time_to_first_step_s": timing["first_step_s"],
        "startup_s": startup_s, "train_s": time.perf_counter() - t_loop, "n_params": n_params,
        "devices": int(par.mesh.devices.size), "sharded_params": n_sharded,
        "metrics": str(metrics_path),
        "tensorboard": str(writer.tb_dir) if t.tensorboard else None,
        "plot": str(plot_path) if plot_path else None,
        "checkpoint": str(ckpt.directory / str(t.steps)) if ckpt is not None else None,
        "config": str(run_dir / "config.json"),
        "skipped_steps": (last["train"] or {}).get("skipped_steps", 0),
    }
    if primary:
        (run_dir / "summary.json").write_text(
            json.dumps({**summary, "resolved_config": cfg.to_dict()}, indent=2) + "\n")
    summary["history"] = history
    return summary


def format_summary(s: dict) -> str:
    """The short report printed at the end of ``unitscale-jax train``."""
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"done: {s['steps']} steps ({s['steps'] - s['start_step']} this run"
        + (f", resumed at step {s['start_step']}" if s["start_step"] else "") + "), "
        f"{f(s['tokens_per_s'], ',.0f')} tokens/s, first step (with compilation) "
        f"{f(s['time_to_first_step_s'], '.1f')} s",
        f"final train loss {f(s['final_train_loss'], '.4f')}, validation loss "
        f"{f(s['final_val_loss'], '.4f')} ({f(s['final_bits_per_byte'], '.4f')} bits/byte)",
        f"  metrics:     {s['metrics']}",
    ]
    if s["tensorboard"]:
        lines.append(f"  tensorboard: {s['tensorboard']}  (tensorboard --logdir {s['tensorboard']})")
    if s["plot"]:
        lines.append(f"  plot:        {s['plot']}")
    if s["checkpoint"]:
        lines.append(f"  checkpoint:  {s['checkpoint']}")
    lines.append(f"  config:      {s['config']}")
    return "\n".join(lines)
