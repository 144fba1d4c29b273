"""``Trainer``: one training run, start to finish (or resumption to finish).

Order of work: resolve the config -> (multi-host init) -> data source and tokenizer ->
device mesh -> abstract model, optimizer and state shardings (``__init__``) -> restore the
newest valid checkpoint, else initialise (one jitted init straight into the shardings;
``build_state``) -> the loop of ``run``: ``step``, metrics, ``evaluate``, ``save`` -> final
evaluation, checkpoint, plot, summary. What the model learns comes from its ``Task``
(``unitscale_jax.train.tasks``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from unitscale_jax import nn, paths
from unitscale_jax.train import build, distributed, interop
from unitscale_jax.train import step as steplib
from unitscale_jax.train.checkpoint import Checkpoints
from unitscale_jax.train.config import Config, resolve, validate_pipeline
from unitscale_jax.train.data import (
    RunData,
    ShardedBatches,
    data_shards,
    join_eval,
    load_data,
    record_batch,
)
from unitscale_jax.train.errors import Diverged, Interrupted, UsageError
from unitscale_jax.train.lora_base import LoRABase, prune, restore_into
from unitscale_jax.train.metrics import MetricsWriter, read_metrics, truncate
from unitscale_jax.train.plotting import plot_losses
from unitscale_jax.train.run_dir import Log, StopSignals, prepare_run_dir
from unitscale_jax.train.tasks import Distillation, Task


def init_state_fn(cfg: Config, vocab_size: int, tx, task: Optional[Task] = None
                  ) -> Callable[[], dict]:
    """A function (to jit) returning a freshly initialised train state
    ``{"params", "opt_state", "step", "rng"}`` (of ``task``'s model, default ``--model``'s)."""

    def init():
        model = build.build_model(cfg, vocab_size, task=task)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return steplib.new_state(params, tx, cfg.training.seed)

    return init


def place(tree: Any, shardings: Any) -> Any:
    """A pytree of (host or device) arrays as global arrays in ``shardings`` (every process
    holds the whole of each array)."""
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx]),
        host, shardings)


def check_pipeline_batch(batch_size: int, microbatches: int, par: steplib.Parallel) -> None:
    """Raises ``UsageError`` unless ``microbatches`` divides each data-parallel replica's rows
    and, across processes, each process holds whole pipelines (its rows of the batch are then
    its own, as the data iterators assume)."""
    rows = batch_size // par.batch_shards
    if rows % microbatches:
        raise UsageError(f"--microbatches {microbatches} does not divide the {rows} rows of "
                         f"each data-parallel replica (--batch-size {batch_size} over "
                         f"{par.batch_shards}); use a divisor of {rows}, or a --batch-size "
                         f"that is a multiple of {par.batch_shards * microbatches}.")
    stages, local = par.mesh.shape["stage"], jax.local_device_count()
    if jax.process_count() > 1 and local % stages:
        raise UsageError(f"--pipeline-stages {stages} must divide the {local} devices of each "
                         "process (a pipeline's stages live in one process).")


class Trainer:
    """Trains (or resumes) the run described by a config.

    ``Trainer(cfg).run()`` is ``unitscale_jax.train.run(cfg)``. The pieces are usable
    alone: ``build_state()`` restores or initialises ``state``, ``step(batch)`` takes one
    optimizer step, ``evaluate(step)`` writes a validation row, ``save(step)`` a checkpoint.

    A subclass changes what is trained through the hooks ``_load_data``, ``_make_task``,
    ``_make_optimizer``, ``_make_checkpoints`` and ``_fresh_state`` (fine-tuning:
    ``unitscale_jax.train.finetune.FineTuner``); an ``evaluate`` that sets ``stop_reason``
    ends the run early (after a checkpoint of that step).

    Args:
      config: a ``Config`` (or its ``to_dict()``); ``None`` fields take their defaults.
      quiet: no progress bar or reports (the metrics files are still written).
      devices: the devices of the mesh (default every device of every process).

    Raises:
      UsageError: bad options or data (one-line message).
    """

    def __init__(self, config: Config | dict, *, quiet: bool = False,
                 devices: Optional[Sequence[Any]] = None):
        self.t_start = time.perf_counter()
        self.given = Config.from_dict(config) if isinstance(config, dict) else config
        self.cfg = cfg = resolve(self.given)
        t = cfg.training
        distributed.maybe_initialize(t)
        distributed.check_same_config(cfg.to_dict())
        self.primary = jax.process_index() == 0
        self.quiet = quiet
        self.log = Log(self.primary, quiet)
        self.teacher = None  # a distillation teacher (--distill-from): train.distill.Teacher
        self._created = paths.first_missing(t.run_dir)  # removed again if set-up fails
        with paths.removed_if_left_empty(self._created):
            self.run_dir = prepare_run_dir(cfg, self.given)
            self._set_up(cfg, devices)

    def _set_up(self, cfg: Config, devices: Optional[Sequence[Any]]) -> None:
        t = cfg.training
        self.data = self._load_data()
        self.task = self._make_task()
        tcfg = build.transformer_config(cfg, self.data.vocab_size)
        self.par = par = steplib.make_parallel(
            t.sharding, tensor_parallel=t.tensor_parallel,
            tensor_dims=(tcfg.n_heads, tcfg.kv_heads, tcfg.ffn_dim, tcfg.vocab_size),
            devices=devices, pipeline_stages=t.pipeline_stages, microbatches=t.microbatches,
            pipeline_schedule=t.pipeline_schedule, pipeline_chunks=t.pipeline_chunks)
        n_proc = jax.process_count()
        if t.batch_size % par.batch_shards or t.batch_size % n_proc:
            raise UsageError(f"--batch-size {t.batch_size} is not divisible by the "
                             f"{par.batch_shards} device(s) the batch is split over "
                             f"({par.describe()}); use a multiple of "
                             f"{math.lcm(par.batch_shards, n_proc)}.")
        if par.pipeline is not None:
            check_pipeline_batch(t.batch_size, t.microbatches, par)
            if self.teacher is not None:  # its stack runs through the pipeline too
                try:
                    validate_pipeline(self.teacher.cfg.model, t)
                except UsageError as e:
                    raise UsageError(f"the --distill-from teacher's layers: {e}") from None

        abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, self.data.vocab_size,
                                                                  task=self.task))
        graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        self.graphdef = graphdef
        self.n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params))
        self.tx, schedule = self._make_optimizer(abstract_model)
        tx = self.tx
        self._init = init_state_fn(cfg, self.data.vocab_size, tx, task=self.task)
        self.abstract_state = jax.eval_shape(self._init)
        p_shardings = steplib.param_shardings(abstract_params, par)
        self.shardings = steplib.state_shardings(tx, self.abstract_state, p_shardings, par)
        self.n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(p_shardings))
        self.step_shardings = self.shardings  # plus the frozen teacher's, when distilling
        if self.teacher is not None:
            self.step_shardings = {**self.shardings, "teacher": steplib.param_shardings(
                self.teacher.abstract_params, par)}
        self.log(f"model: {cfg.model.kind}, {cfg.model.parametrization}, "
                 f"{self.n_params / 1e6:.2f}M params (d_model {tcfg.d_model}, {tcfg.n_layers} "
                 f"layers, {tcfg.n_heads} heads), {cfg.optimizer.name} lr {cfg.optimizer.lr:g} "
                 f"{cfg.optimizer.schedule}, precision {t.precision}; {par.describe()}")

        self.ckpt = self._make_checkpoints() if t.checkpoint else None
        rows = steplib.process_rows(par, t.batch_size)
        self.train_it = ShardedBatches(
            lambda k, count: self.data.train_iterator(cfg, shard_index=k, shard_count=count),
            lambda count=None, resuming=False: data_shards(rows, t.batch_size, count,
                                                           resuming=resuming),
            cfg.data.data_shards)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._train_step, self._eval_step = steplib.jit_steps(
            steplib.make_train_step(graphdef, self.task, tx, schedule,
                                    use_value=build.needs_value(cfg), loss_scale=t.loss_scale),
            steplib.make_eval_step(graphdef, self.task), self.step_shardings, par,
            donate=jax.default_backend() != "cpu")
        self.state: Optional[dict] = None
        self.lora_base: Optional[LoRABase] = None  # a LoRA run's frozen base (train.lora_base)
        self.start_step = 0
        self.history: list[dict] = []
        self.last: dict[str, Optional[dict]] = {"train": None, "validation": None}
        self.writer: Optional[MetricsWriter] = None
        self.stop_reason: Optional[str] = None

    # ----------------------------------------------------------------------- hooks

    def _load_data(self):
        """The run's data (``train.data.RunData`` or an object with its interface)."""
        return load_data(self.cfg, self.log)

    def _make_task(self) -> Task:
        """The task trained (its model, loss and validation metrics)."""
        return self._distilled(build.get_task(self.cfg.model.kind))

    def _distilled(self, base: Task) -> Task:
        """``base``, or with ``--distill-from`` the ``Distillation`` of ``base`` from the
        teacher run (loaded into ``self.teacher``, in this run's precision)."""
        t = self.cfg.training
        if not t.distill_from:
            return base
        from unitscale_jax.train.distill import load_teacher
        self.teacher = load_teacher(self.cfg, self.data, base, log=self.log)
        return Distillation(base, self.teacher.graphdef, temperature=t.distill_temperature,
                            weight=t.distill_weight)

    def _make_optimizer(self, abstract_model) -> tuple[Any, Callable]:
        """``(tx, schedule)`` for the model (``build.model_optimizer``: with LoRA adapters
        only they train)."""
        return build.model_optimizer(self.cfg, abstract_model)

    def _make_checkpoints(self) -> Checkpoints:
        t = self.cfg.training
        return Checkpoints(self.run_dir / "checkpoints", keep=t.keep_checkpoints,
                           async_save=t.async_checkpointing, log=self.log)

    def _fresh_state(self) -> dict:
        """The state at step 0 (no checkpoint to resume), in the state's shardings."""
        return jax.jit(self._init, out_shardings=self.shardings)()

    def _initial_params(self) -> Optional[Any]:
        """The parameters a new run starts from (pure dict of arrays), or None for a fresh
        init: those of ``--init-from`` (an exported file or a run directory) if given; a LoRA
        run's adapters start fresh."""
        t = self.cfg.training
        if not t.init_from:
            return None
        fresh = None
        if build.uses_lora(self.cfg):
            init = interop.flat_params(jax.device_get(self._fresh_state()["params"]))
            fresh = {k: v for k, v in init.items() if nn.lora.is_adapter_name(k)}
        return interop.params_from_source(t.init_from, self.abstract_state["params"], self.cfg,
                                          self.data.vocab_size, log=self.log, fresh=fresh)

    def _trainable_labels(self, params: Any) -> Any:
        """``"train"`` / ``"frozen"`` per parameter of a LoRA run (``nn.lora.trainable_labels``:
        the adapters train)."""
        return nn.lora.trainable_labels(params)

    def _new_lora_base(self, params: Any) -> Optional[LoRABase]:
        """The reference to the frozen base of a LoRA run starting from ``--init-from`` with
        ``params`` (None otherwise: whole checkpoints)."""
        source = self.cfg.training.init_from
        if not (source and build.uses_lora(self.cfg)):
            return None
        labels = interop.flat_params(self._trainable_labels(params))
        return LoRABase.of(source, interop.flat_params(params),
                           {k for k, v in labels.items() if v == "frozen"})

    def restore_checkpoint(self, restore: Callable[[dict], Any]) -> Any:
        """``restore(target)`` on the run's sharded state target; a LoRA run's adapter-only
        checkpoint gets its frozen base back (``train.lora_base.restore_into``)."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.abstract_state, self.shardings)
        base = self.lora_base
        if base is None:
            return restore_into(None, self.run_dir, target, restore,
                                ckpt=self.ckpt if build.uses_lora(self.cfg) else None)
        frozen = set(base.frozen)
        shardings = prune(self.shardings["params"], lambda name: name in frozen)
        return restore_into(base, self.run_dir, target, restore, self.log,
                            place=lambda tree: place(tree, shardings))

    def _state_of(self, params: Any) -> dict:
        """The step-0 train state of given parameters, placed in the run's shardings."""
        interop.check_arrays(interop.flat_params(params),
                             interop.flat_params(self.abstract_state["params"]), "params")
        placed = place(params, self.shardings["params"])
        seed = self.cfg.training.seed
        return jax.jit(lambda p: steplib.new_state(p, self.tx, seed),
                       out_shardings=self.shardings)(placed)

    # ----------------------------------------------------------------------- pieces

    def build_state(self, params: Optional[Any] = None) -> int:
        """Restores the newest valid checkpoint into ``state``, else initialises it; opens the
        metrics writer. Returns the step the run starts from.

        Args:
          params: initial parameters (a pure dict of arrays shaped like the model's) used
            when there is no checkpoint, instead of ``--init-from`` or a fresh init.

        Raises:
          UsageError: the checkpoint is past ``--steps``; an ``--init-from`` file that cannot
            be read or does not fit the model.
        """
        t, ckpt = self.cfg.training, self.ckpt
        restored = None
        if ckpt is not None:
            if build.uses_lora(self.cfg) and ckpt.steps():
                self.lora_base = LoRABase.read(self.run_dir)
            restored = self.restore_checkpoint(ckpt.restore_latest)
        if restored is not None:
            start, self.state, data_state = restored
            if start > t.steps:
                ckpt.close()
                raise UsageError(f"the checkpoint in {ckpt.directory} is at step {start}, past "
                                 f"--steps {t.steps}; pass --steps {start} or more to continue, "
                                 "or --overwrite to start again.")
            self.train_it.set_state(data_state)
            if self.primary:
                truncate(self.metrics_path, start)
            for row in read_metrics(self.metrics_path):
                self.last[row["split"]] = row  # the latest rows already written
            self.log(f"resumed from the checkpoint at step {start} in {ckpt.directory}"
                     + ("; the run is already complete (raise --steps to train further)"
                        if start == t.steps else "")
                     + ("" if not t.init_from else
                        f" (its frozen base re-read from {self.lora_base.source})"
                        if self.lora_base is not None else
                        f" (--init-from {t.init_from} is not used)"))
        else:
            start = 0
            self.lora_base = None
            if params is None:
                params = self._initial_params()
                if params is not None and ckpt is not None:
                    self.lora_base = self._new_lora_base(params)
            self.state = self._fresh_state() if params is None else self._state_of(params)
            if self.primary:
                self.metrics_path.write_text("")
                if self.lora_base is not None:  # before the first adapter-only checkpoint
                    self.lora_base.write(self.run_dir)
        if self.teacher is not None:  # never checkpointed: restored from its run each start
            self.state = {**self.state, "teacher": place(self.teacher.params,
                                                         self.step_shardings["teacher"])}
        if self.primary:
            paths.write_text_atomic(self.run_dir / "config.json", self.given.to_json() + "\n")
        self.eval_batches = self._eval_batches()
        self.writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard,
                                    purge_step=start + 1 if start else None, enabled=self.primary)
        self.start_step = start
        return start

    def _eval_batches(self) -> Any:
        """This process's validation batches: those of its record shards
        (``train.data.join_eval``); another kind of data reads its own per process."""
        n, shards = self.cfg.training.eval_batches, self.train_it.shards
        if isinstance(self.data, RunData):
            return join_eval([self.data.eval_batches(self.cfg, n, shard=(k, shards.count))
                              for k in shards.local])
        if shards.local != (jax.process_index(),) or shards.count != jax.process_count():
            raise UsageError(f"this run reads its evaluation data per process, but its "
                             f"processes share batch rows ({self.par.describe()}); use "
                             "--sharding dp or fsdp.")
        return self.data.eval_batches(self.cfg, n)

    def step(self, batch: dict) -> dict:
        """One optimizer step on this process's rows of ``batch``; returns the step's
        metrics (device arrays: ``loss``, ``grad_norm``, ``lr``, ``scored_tokens`` and, with
        ``--loss-scale``, ``skipped_steps``)."""
        with self.par.context():
            self.state, metrics = self._train_step(self.state,
                                                   steplib.put_batch(batch, self.par))
        return metrics

    def evaluate(self, step: int) -> dict:
        """Evaluates on the validation batches; writes and returns the validation row."""
        total: dict[str, float] = {}
        count: dict[str, int] = {}
        with self.par.context():
            for b in self.eval_batches:
                sums = self._eval_step(self.state["params"], steplib.put_batch(b, self.par))
                for name, (s, n) in sums.items():
                    total[name] = total.get(name, 0.0) + float(s)
                    count[name] = count.get(name, 0) + int(n)
        means = {k: total[k] / max(count[k], 1) for k in total}
        row = self.writer.write(step, "validation",
                                self.task.metrics(means, self.data.bytes_per_token))
        self.history.append(row)
        self.last["validation"] = row
        parts = [f"{v:.4f} bits/byte" if k == "bits_per_byte" else f"{k} {v:.4f}"
                 for k, v in row.items() if k not in ("step", "split")]
        self.log(f"step {step}: validation {', '.join(parts)}")
        return row

    def checkpointed_state(self) -> dict:
        """``state`` without what is not checkpointed (a distillation teacher; a LoRA run's
        frozen base, ``train.lora_base``)."""
        state = {k: v for k, v in self.state.items() if k != "teacher"}
        return state if self.lora_base is None else self.lora_base.checkpoint_state(state)

    def save(self, step: int, *, force: bool = False) -> None:
        """Starts saving a checkpoint of ``state`` at ``step`` (no-op without checkpoints)."""
        if self.ckpt is not None:
            self.ckpt.save(step, self.checkpointed_state(), self.train_it.get_state(),
                           force=force)

    def close(self) -> None:
        """Waits for a background save; closes the checkpointer and the metrics files."""
        if self.ckpt is not None:
            self.ckpt.close()
        if self.writer is not None:
            self.writer.close()

    # ----------------------------------------------------------------------- the loop

    def _check_finite(self, s: int, m: dict) -> None:
        # with --loss-scale, overflowing gradients skip the step (train.precision)
        ckpt, scaled = self.ckpt, self.cfg.training.loss_scale is not None
        if math.isfinite(m["loss"]) and (math.isfinite(m["grad_norm"]) or scaled):
            return
        if ckpt is not None:
            ckpt.wait()
        good = max(ckpt.steps(), default=None) if ckpt is not None else None
        where = (f"the last good checkpoint is step {good} in {ckpt.directory}" if good
                 is not None else "no checkpoint was written")
        raise Diverged(f"non-finite training loss ({m['loss']}, gradient norm "
                       f"{m['grad_norm']}) at step {s}; stopped, {where}. Lower --lr "
                       + ("or --loss-scale " if scaled else "") + "or change --precision.")

    def _write_train_row(self, s: int, m: dict, timing: dict, bar) -> None:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        if s > timing["tick_step"]:
            tps = self.tokens_per_step * (s - timing["tick_step"]) / (now - timing["tick"])
            timing["train_s"] += now - timing["tick"]
            timing["steps_timed"] += s - timing["tick_step"]
        else:
            tps = float("nan")
        timing["tick"], timing["tick_step"] = now, s
        self._check_finite(s, m)
        values = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"]}
        if "skipped_steps" in m:
            values["skipped_steps"] = int(m["skipped_steps"])
        if math.isfinite(tps):  # not on the step that compiled
            values["tokens_per_s"] = tps
            timing["ema_tps"] = (tps if timing["ema_tps"] is None
                                 else 0.9 * timing["ema_tps"] + 0.1 * tps)
        row = self.writer.write(s, "train", {**values, "elapsed_s": now - self.t_start})
        self.history.append(row)
        self.last["train"] = row
        ema = timing["ema_tps"]
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False,
                        tok_s="compiled" if ema is None else f"{ema:,.0f}")

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.training.batch_size * self.cfg.data.seq_len

    def run(self) -> dict[str, Any]:
        """Builds the state and trains to ``--steps``; returns the summary (see ``run``).

        Raises:
          Diverged / Interrupted (``TrainingStopped``): a non-finite loss or an interrupt (the
            last good checkpoint stays).
        """
        from tqdm.auto import tqdm
        t, ckpt = self.cfg.training, self.ckpt
        with paths.removed_if_left_empty(self._created):
            start = self.build_state()
        stop = StopSignals()
        bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (t.progress and self.primary and not self.quiet), desc="train")
        self.log.bar = bar
        t_loop = time.perf_counter()
        startup_s = t_loop - self.t_start
        timing = {"first_step_s": None, "train_s": 0.0, "steps_timed": 0, "ema_tps": None,
                  "tick": time.perf_counter(), "tick_step": start}
        end = t.steps
        lost = None
        try:
            if start == 0 and t.eval_every:
                self.evaluate(0)
                timing["tick"] = time.perf_counter()
            if self.stop_reason is not None:  # e.g. a resumed run that had already stopped
                end = start
            for s in range(start + 1, t.steps + 1 if self.stop_reason is None else start + 1):
                batch = next(self.train_it)
                record_batch(s, batch, self.train_it.shards)
                m = self.step(batch)
                if timing["first_step_s"] is None:
                    jax.block_until_ready(m)
                    timing["first_step_s"] = time.perf_counter() - timing["tick"]
                    timing["tick"], timing["tick_step"] = time.perf_counter(), s
                ckpt_now = ckpt is not None and t.checkpoint_every and s % t.checkpoint_every == 0
                if s % t.log_every == 0 or ckpt_now or s == t.steps:
                    self._write_train_row(s, m, timing, bar)
                if t.eval_every and s % t.eval_every == 0:
                    self.evaluate(s)
                    timing["tick"] = time.perf_counter()
                if ckpt_now or (self.stop_reason is not None and ckpt is not None):
                    self.save(s, force=self.stop_reason is not None)
                bar.update(1)
                if self.stop_reason is not None:
                    self.log(f"step {s}: {self.stop_reason}; stopping.")
                    end = s
                    break
                if stop.received:
                    saved = ""
                    if ckpt is not None:
                        if s not in ckpt.steps():
                            self.save(s, force=True)
                        ckpt.wait()
                        saved = f"checkpoint saved at step {s}; "
                    raise Interrupted(f"{stop.received} received at step {s}: {saved}rerun "
                                      "the same command to resume.")
            if self.last["validation"] is None or self.last["validation"]["step"] != end:
                self.evaluate(end)
            if ckpt is not None and end not in ckpt.steps():
                self.save(end, force=True)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the step loop
            raise Interrupted("interrupted; the last complete checkpoint is kept; rerun the "
                                  "same command to resume.") from None
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            lost = distributed.peer_lost(e, "the last complete checkpoint in "
                                         f"{self.run_dir / 'checkpoints'} is kept")
            raise lost from None
        finally:
            stop.restore()
            bar.close()
            self.log.bar = None
            if lost is None:
                self.close()
            elif self.writer is not None:  # not the checkpointer: it may wait for the dead peer
                self.writer.close()
        return self._summary(startup_s, time.perf_counter() - t_loop, timing, end)

    def _summary(self, startup_s: float, train_s: float, timing: dict,
                 end: Optional[int] = None) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        plot_path = None
        if t.plot and self.primary:
            plot_path = plot_losses(self.metrics_path, self.run_dir / "loss.png",
                                    title=f"{cfg.preset} {cfg.model.kind} "
                                          f"{cfg.model.parametrization}, {t.precision}")
        tps = (self.tokens_per_step * timing["steps_timed"] / timing["train_s"]
               if timing["train_s"] > 0 else None)
        last_train, last_val = self.last["train"] or {}, self.last["validation"] or {}
        summary = {
            "run_dir": str(self.run_dir), "steps": t.steps if end is None else end,
            "start_step": self.start_step,
            "final_train_loss": last_train.get("loss"),
            "final_val_loss": last_val.get("loss"),
            "final_bits_per_byte": last_val.get("bits_per_byte"),
            "tokens_per_s": tps, "time_to_first_step_s": timing["first_step_s"],
            "startup_s": startup_s, "train_s": train_s, "n_params": self.n_params,
            "devices": int(self.par.mesh.devices.size), "sharded_params": self.n_sharded,
            "metrics": str(self.metrics_path),
            "tensorboard": str(self.writer.tb_dir) if t.tensorboard else None,
            "plot": str(plot_path) if plot_path else None,
            "checkpoint": (str(self.ckpt.directory / str(t.steps if end is None else end))
                           if self.ckpt is not None else None),
            "config": str(self.run_dir / "config.json"),
            "skipped_steps": last_train.get("skipped_steps", 0),
        }
        if self.primary:
            paths.write_text_atomic(self.run_dir / "summary.json", json.dumps(
                {**summary, "resolved_config": cfg.to_dict()}, indent=2) + "\n")
        summary["history"] = self.history
        return summary
