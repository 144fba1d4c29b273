"""``unitscale-jax plan``: what a training run needs on a device mesh, without the devices.

The planner builds the run's real ``Trainer`` (model, optimizer, state shardings and jitted
train step of ``unitscale_jax.train.trainer`` / ``train.step``) on *fake CPU devices* of the
mesh's size, with a data source that only knows the vocabulary, and lowers and compiles the
train step for abstract arguments (``jax.ShapeDtypeStruct``: no weight is ever allocated).
From the compiled program it reports, **per device**:

* parameter, optimizer-state and batch bytes (each array's shard under its
  ``NamedSharding``), and XLA's buffer assignment (``compiled.memory_analysis()``):
  arguments, outputs, temporaries (activations saved for the backward pass, gradients,
  optimizer temporaries) and the peak they add up to;
* FLOPs and bytes accessed (``compiled.cost_analysis()``). Both are per device: XLA analyses
  the SPMD-partitioned program that one device runs (checked in ``tests/train/test_plan.py``:
  an ``[N, K]`` row-sharded matmul on 4 devices reports a quarter of its FLOPs). XLA's cost
  analysis counts the body of a ``while`` loop once, whatever its trip count, so for a
  scanned layer stack (``--scan-layers``, the default) the figures come from more compiles
  of the same run with 1 and 2 unscanned layers and loop-free attention: ``cost(L) = cost(1)
  + (L - 1) * (cost(2) - cost(1))``, plus with ``--remat`` each layer's forward pass once more
  (``extrapolated_cost``; exact for a stack of identical layers; ``flops_method`` says which
  was used);
* the collectives in the compiled HLO (``compiled.as_text()``): all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute ops, each counted as often as it runs
  (an op in a scanned layer's loop body counts ``trip count`` times), with the bytes of
  their results and the bytes each device sends over its links by the ring algorithms
  (all-gather and all-to-all ``(n-1)/n`` of the result, reduce-scatter ``(n-1)`` times the
  result, all-reduce ``2 (n-1)/n`` of it, collective-permute all of it, for groups of ``n``
  devices).

and predicts the step time and MFU on a named accelerator (``ACCELERATORS``) with a roofline:
``compute = max(flops / peak, HBM traffic / HBM bandwidth)``, ``collectives = wire bytes /
link bandwidth`` (one direction of the chip's interconnect), ``step = compute +
collectives`` (no overlap: the pessimistic end; ``step_overlapped_s`` is the optimistic
``max`` of the terms) and ``MFU = model FLOPs / (devices * peak * step)``, where the model
FLOPs are ``6 N T + 12 L d S T`` per step (``N`` matmul parameters, i.e. all but the input
embedding; ``T`` tokens; ``L`` layers of attention width ``d``; sequence ``S``; PaLM,
Chowdhery et al. 2022, appendix B). The HBM traffic is the least the step can have, every
buffer of XLA's assignment written once and read once (arguments + outputs + 2 x
temporaries); XLA:CPU's own ``bytes accessed`` (every operand of every unfused op, dense
attention scores included) is the upper end, reported as ``memory_upper_s``.

What the model assumes, honestly: the program analysed is the one **XLA:CPU** compiles; a TPU
or GPU compiler fuses, lays out, rematerialises and schedules differently, so its temporaries
and bytes accessed differ (the FLOPs and the collectives, fixed by the SPMD partitioner, much
less). Attention runs as the CPU would run it (``--attention-impl auto``: dense XLA attention
up to ``ops.plain.CHUNKED_MIN_KV_LEN`` keys, else the chunked kernel; a TPU would run the
Pallas kernel, whose FLOPs XLA cannot see). Peaks are the hardware's dense bfloat16 numbers,
which no real step reaches; the interconnect is modelled as one ring per collective at the
chip's full one-way bandwidth (a torus or NVSwitch may do better on several axes at once, a
multi-host NIC far worse: the model has no DCN/InfiniBand term, so an 8 x H100 plan is for
one NVLink node). On the CPU the step does not donate its input state (the Trainer donates
it on accelerators), so ``peak_bytes`` counts the old and the new state; ``peak_donated_bytes``
(the prediction for an accelerator) counts the state once.

Accelerator figures (per chip), from the vendors' spec pages:

* TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM (16 GB), 400 GB/s bidirectional ICI;
  https://cloud.google.com/tpu/docs/v5e
* TPU v5p: 459 TFLOP/s bf16, 2765 GB/s HBM (95 GiB), 1200 GB/s bidirectional ICI;
  https://cloud.google.com/tpu/docs/v5p
* TPU v6e (Trillium): 918 TFLOP/s bf16, 1640 GB/s HBM (32 GB), 800 GB/s bidirectional ICI;
  https://cloud.google.com/tpu/docs/v6e
* H100 SXM: 989 TFLOP/s dense bf16 (the 1979 on the page is with 2:4 sparsity), 3.35 TB/s
  HBM3 (80 GB), 900 GB/s bidirectional NVLink; https://www.nvidia.com/en-us/data-center/h100/
* H200 SXM: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e (141 GB), 900 GB/s bidirectional NVLink;
  https://www.nvidia.com/en-us/data-center/h200/

``--mesh data=D,fsdp=F,tensor=T`` maps onto the trainer's ``--sharding``: ``data`` alone is
``dp``, ``fsdp`` alone ``fsdp``, ``data x tensor`` is ``tp``, ``fsdp x tensor`` is
``fsdp_tp`` (``--tensor-parallel T``); the trainer has no mesh with both ``data`` and
``fsdp`` above 1. ``stage=S`` is ``--pipeline-stages S`` (``unitscale_jax.train.pipeline``;
``--microbatches``, ``--pipeline-schedule`` and ``--pipeline-chunks`` as in ``train``): the
memory and collectives are the pipelined step's as compiled; its FLOPs are extrapolated from
1- and 2-layer unpipelined compiles over the same devices (the useful work per device, as
if the stages were data parallel), and the predicted compute time is divided by
``1 - bubble``, the schedule table's idle share of stage-ticks (``Schedule.bubble_fraction``),
during which a stage waits. The embedding and readout, which every stage runs on the whole
batch, are not added to the compute time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from unitscale_jax.train.config import Config
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.trainer import Trainer

MESH_AXES = ("data", "fsdp", "tensor", "stage")
"""The axes ``--mesh`` accepts (``stage``: pipeline stages)."""

MAX_DEVICES = 256
"""The most fake CPU devices a plan compiles for (XLA:CPU's partitioner and this machine's
memory are the limit, not the model)."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One chip's peak figures (see the module docstring for the sources).

    Attributes:
      peak_flops: dense bfloat16 FLOP/s.
      hbm_bandwidth: HBM bytes/s.
      hbm_bytes: HBM capacity.
      link_bandwidth: one-way inter-chip bytes/s (ICI or NVLink; half the bidirectional
        figure).
      source: the vendor's spec page.
    """

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    link_bandwidth: float
    source: str


GB, GIB = 1e9, 2.0**30
ACCELERATORS = {a.name: a for a in (
    Accelerator("tpu-v5e", 197e12, 819 * GB, 16 * GB, 400 * GB / 2,
                "https://cloud.google.com/tpu/docs/v5e"),
    Accelerator("tpu-v5p", 459e12, 2765 * GB, 95 * GIB, 1200 * GB / 2,
                "https://cloud.google.com/tpu/docs/v5p"),
    Accelerator("tpu-v6e", 918e12, 1640 * GB, 32 * GB, 800 * GB / 2,
                "https://cloud.google.com/tpu/docs/v6e"),
    Accelerator("h100", 989e12, 3350 * GB, 80 * GB, 900 * GB / 2,
                "https://www.nvidia.com/en-us/data-center/h100/"),
    Accelerator("h200", 989e12, 4800 * GB, 141 * GB, 900 * GB / 2,
                "https://www.nvidia.com/en-us/data-center/h200/"),
)}


# --------------------------------------------------------------------------- the mesh

def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,fsdp=8,tensor=2"`` -> ``{"data": 1, "fsdp": 8, "tensor": 2, "stage": 1}``
    (axes left out are 1).

    Raises:
      UsageError: an unknown axis, a size that is not a positive integer, or more than
        ``MAX_DEVICES`` devices.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    example = "e.g. --mesh data=1,fsdp=8,tensor=1"
    for part in (p.strip() for p in text.split(",")):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise UsageError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of "
                             f"{', '.join(MESH_AXES)} ({example}).")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise UsageError(f"--mesh {text!r}: the size of {name} must be a positive integer, "
                             f"got {value.strip()!r} ({example}).")
        sizes[name] = size
    n = math.prod(sizes.values())
    if n > MAX_DEVICES:
        raise UsageError(f"--mesh {text!r} has {n} devices; plans compile for at most "
                         f"{MAX_DEVICES} fake CPU devices.")
    return sizes


def mesh_sharding(sizes: dict[str, int]) -> tuple[str, Optional[int]]:
    """The trainer's ``(--sharding, --tensor-parallel)`` of a ``parse_mesh`` mesh.

    Raises:
      UsageError: ``data`` and ``fsdp`` both above 1 (no such trainer mesh).
    """
    d, f, t = sizes["data"], sizes["fsdp"], sizes["tensor"]
    if d > 1 and f > 1:
        raise UsageError(f"--mesh data={d},fsdp={f}: the trainer's --sharding has no mesh with "
                         "both data and fsdp above 1; use fsdp alone (it splits the batch too) "
                         "or data alone.")
    if t == 1:
        return ("fsdp" if f > 1 else "dp"), None
    return ("fsdp_tp" if f > 1 else "tp"), t


def use_cpu_devices(n: int) -> list:
    """``n`` CPU devices for the plan: asks JAX for that many fake ones (``jax_platforms=cpu``,
    ``jax_num_cpu_devices``) if its backend has not started yet.

    Raises:
      UsageError: JAX already started in this process with fewer CPU devices.
    """
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # the backend is up: use what it has
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise UsageError(f"the mesh needs {n} devices but JAX already started in this process "
                         f"with {len(devices)} CPU device(s); plan in a fresh process "
                         f"(unitscale-jax plan), or start it with XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n}.")
    return devices[:n]


# --------------------------------------------------------------------------- the trainer

@dataclasses.dataclass
class _Vocabulary:
    """A run's data as far as the step needs it: its vocabulary (no text is read)."""

    vocab_size: int
    bytes_per_token: float = 1.0

    def train_iterator(self, cfg: Config, *, shard_index: int = 0, shard_count: int = 1):
        return None  # a plan never takes a step


class _PlanTrainer(Trainer):
    """The run's ``Trainer`` with a vocabulary instead of data."""

    def __init__(self, config: Config, vocab_size: int, devices: Sequence[Any]):
        self._vocabulary = _Vocabulary(vocab_size)
        super().__init__(config, quiet=True, devices=devices)

    def _load_data(self):
        return self._vocabulary


def plan_config(cfg: Config, sizes: dict[str, int], run_dir: str) -> Config:
    """``cfg`` as the planner builds it: the mesh's sharding, no multi-host start, nothing
    written but an empty ``run_dir``; ``--attention-impl auto`` (without dropout) becomes
    ``chunked``: on a TPU or GPU auto runs a flash kernel (Pallas, cuDNN) whose memory grows
    with the sequence, not its square, as the chunked kernel's does on the CPU."""
    kind, tp = mesh_sharding(sizes)
    model = {}
    if cfg.model.attention_impl == "auto" and cfg.model.dropout == 0:
        model["attention_impl"] = "chunked"  # what auto's flash kernels do, as the CPU can
    return cfg.replace(model=model, training={
        "sharding": kind, "tensor_parallel": tp, "pipeline_stages": sizes["stage"],
        "distributed": "off", "run_dir": run_dir,
        "checkpoint": False, "tensorboard": False, "plot": False, "progress": False,
        "init_from": None})


def build_trainer(cfg: Config, vocab_size: int, devices: Sequence[Any]) -> Trainer:
    """The run's ``Trainer`` (abstract state, shardings, jitted step) on ``devices``, with
    a temporary, empty run directory that is removed again."""
    with tempfile.TemporaryDirectory(prefix="unitscale-plan-") as tmp:
        return _PlanTrainer(cfg.replace(training={"run_dir": str(Path(tmp) / "run")}),
                            vocab_size, devices)


def abstract_batch(trainer: Trainer) -> dict:
    """The global batch of the run's task as ``ShapeDtypeStruct``s (``data.example_batch``)."""
    from unitscale_jax.data import example_batch
    c = trainer.cfg
    d = c.data
    batch = example_batch(trainer.task.objective, seq_len=d.seq_len,
                          batch_size=c.training.batch_size, mask_prob=d.mask_prob,
                          noise_density=d.noise_density, mean_span=d.mean_span)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def abstract_state(trainer: Trainer) -> dict:
    """The train state the step takes, as ``ShapeDtypeStruct``s in its shardings."""
    state = dict(trainer.abstract_state)
    if trainer.teacher is not None:
        state["teacher"] = trainer.teacher.abstract_params
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, trainer.step_shardings)


def compile_step(trainer: Trainer):
    """The trainer's train step, lowered and compiled for abstract arguments."""
    with trainer.par.context():
        return trainer._train_step.lower(abstract_state(trainer),
                                         abstract_batch(trainer)).compile()


# --------------------------------------------------------------------------- the HLO

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
          "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?)\s(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_CALLS = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size(line: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    return n_devices


def _wire_bytes(op: str, result: float, n: int) -> float:
    if n <= 1:
        return 0.0
    return {"all-gather": (n - 1) / n * result, "all-to-all": (n - 1) / n * result,
            "reduce-scatter": (n - 1) * result, "all-reduce": 2 * (n - 1) / n * result,
            "collective-permute": result}[op]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, name = "", None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)", line)
            name = m.group(2)
            comps[name] = []
            if m.group(1):
                entry = name
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps, entry


def hlo_profile(hlo: str, n_devices: int) -> dict:
    """The collectives and loops of a compiled module's HLO text.

    Returns:
      ``{"collectives": {op: {"count", "bytes", "wire_bytes"}}, "loops": [trip counts]}``:
      each collective counted (and its result bytes and per-device wire bytes summed) as many
      times as it runs: once per iteration of every ``while`` loop around it.
    """
    comps, entry = _computations(hlo)
    mult = dict.fromkeys(comps, 0)
    mult[entry] = 1
    loops = []
    for name in reversed(list(comps)):  # callers come after their callees in HLO text
        for line in comps[name]:
            trip = 1
            if " while(" in line:
                m = _TRIP.search(line)
                trip = int(m.group(1)) if m else 1
                loops.append(trip)
            children = _CALLS.findall(line)
            m = re.search(r"branch_computations=\{([^}]*)\}", line)
            if m:
                children += re.findall(r"%?([\w.\-]+)", m.group(1))
            for child in children:
                if child in mult:
                    mult[child] += mult[name] * trip
    out = {op: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0} for op in COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            m = _OP.match(line)
            if not m or not mult[name]:
                continue
            types, op = m.group(1), m.group(2)
            if m.group(3):  # an async start: (operand, result) tuple; the result is the last
                shapes = _SHAPE.findall(types)
                types = "{}[{}]".format(*shapes[-1]) if shapes else ""
            result = _shape_bytes(types)
            n = _group_size(line, n_devices)
            rec = out[op]
            rec["count"] += mult[name]
            rec["bytes"] += mult[name] * result
            rec["wire_bytes"] += mult[name] * _wire_bytes(op, result, n)
    return {"collectives": out, "loops": loops}


# --------------------------------------------------------------------------- the plan

def _shard_bytes(tree: Any) -> float:
    return float(sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                     for a in jax.tree.leaves(tree)))


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def model_flops(trainer: Trainer) -> float:
    """``6 N T + 12 L d S T`` per step (PaLM's count; see the module docstring)."""
    from unitscale_jax.train.build import transformer_config
    c = trainer.cfg
    t = transformer_config(c, trainer.data.vocab_size)
    params = trainer.abstract_state["params"]
    embedding = sum(math.prod(a.shape) for path, a in jax.tree_util.tree_leaves_with_path(params)
                    if "embed" in jax.tree_util.keystr(path))
    tokens = c.training.batch_size * c.data.seq_len
    layers = t.n_layers + (t.n_decoder_layers or (t.n_layers if c.model.kind == "encdec" else 0))
    return 6.0 * (trainer.n_params - embedding) * tokens + (
        12.0 * layers * t.n_heads * t.head_dim * c.data.seq_len * tokens)


def compile_eval_step(trainer: Trainer):
    """The trainer's eval step (the forward pass), compiled for abstract arguments."""
    params = abstract_state(trainer)["params"]
    with trainer.par.context():
        return trainer._eval_step.lower(params, abstract_batch(trainer)).compile()


def _layer_cost(cfg: Config, vocab_size: int, devices, n_layers: int) -> tuple[dict, dict]:
    """XLA's cost of the train step and of the eval step (the forward pass) with
    ``n_layers`` unscanned layers and loop-free attention (``xla`` for ``chunked``: the same
    FLOPs, no loop to undercount)."""
    impl = "xla" if cfg.model.attention_impl == "chunked" else cfg.model.attention_impl
    variant = cfg.replace(model={"n_layers": n_layers, "scan_layers": False,
                                 "attention_impl": impl},
                          training={"pipeline_stages": 1, "microbatches": None,
                                    "pipeline_schedule": "gpipe", "pipeline_chunks": None})
    trainer = build_trainer(variant, vocab_size, devices)
    return _cost(compile_step(trainer)), _cost(compile_eval_step(trainer))


def extrapolated_cost(cfg: Config, vocab_size: int, devices) -> dict:
    """The step's FLOPs and bytes accessed with every layer counted (see the module
    docstring): ``train(1) + (L - 1) (train(2) - train(1))`` of unscanned compiles, plus,
    with ``--remat``, the forward pass of every layer once more (``L (eval(2) - eval(1))``:
    a scanned stack recomputes each layer's forward pass in the backward pass; unscanned
    stacks are never rematerialised)."""
    (t1, e1), (t2, e2) = (_layer_cost(cfg, vocab_size, devices, k) for k in (1, 2))
    layers, remat = cfg.model.n_layers, cfg.model.remat and cfg.model.scan_layers
    return {k: t1[k] + (layers - 1) * (t2[k] - t1[k]) + (layers * (e2[k] - e1[k]) if remat
                                                         else 0.0) for k in t1}


def predict(accelerator: Accelerator, flops: float, hbm_bytes: float, wire_bytes: float,
            model_flops_per_step: float, n_devices: int, *,
            bytes_accessed: Optional[float] = None) -> dict:
    """The roofline step time (seconds) and MFU of one device's share of a step.

    Args:
      hbm_bytes: the HBM traffic of the roofline's memory term.
      bytes_accessed: XLA:CPU's bytes accessed (reported as ``memory_upper_s``).
    """
    compute = flops / accelerator.peak_flops
    memory = hbm_bytes / accelerator.hbm_bandwidth
    comm = wire_bytes / accelerator.link_bandwidth
    step = max(compute, memory) + comm
    overlapped = max(compute, memory, comm)
    peak = n_devices * accelerator.peak_flops
    return {"accelerator": accelerator.name, "source": accelerator.source,
            "compute_s": compute, "memory_s": memory, "collective_s": comm, "step_s": step,
            "memory_upper_s": (None if bytes_accessed is None
                               else bytes_accessed / accelerator.hbm_bandwidth),
            "step_overlapped_s": overlapped, "bound": "compute" if compute >= memory else "memory",
            "mfu": model_flops_per_step / (peak * step) if step else None,
            "mfu_overlapped": model_flops_per_step / (peak * overlapped) if overlapped else None}


def plan(cfg: Config, sizes: dict[str, int], *, vocab_size: int,
         accelerator: Optional[str] = None, log=None) -> dict:
    """The plan of ``cfg`` on mesh ``sizes`` (``parse_mesh``): see the module docstring.

    Needs ``prod(sizes)`` CPU devices in this process (``use_cpu_devices``).

    Raises:
      UsageError: a mesh the trainer cannot build, a batch the mesh does not divide, an
        unknown accelerator, or any bad option of the run (the trainer's message).
    """
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise UsageError(f"--accelerator {accelerator!r} is not known; choose one of "
                         f"{', '.join(ACCELERATORS)}.")
    log = log or (lambda msg: None)
    mesh_sharding(sizes)  # a mesh the trainer cannot build fails before JAX is asked for devices
    n = math.prod(sizes.values())
    devices = use_cpu_devices(n)
    run = plan_config(cfg, sizes, "unused")
    t0 = time.perf_counter()
    trainer = build_trainer(run, vocab_size, devices)
    state = abstract_state(trainer)
    compiled = compile_step(trainer)
    compile_s = time.perf_counter() - t0
    log(f"compiled the train step for {trainer.par.describe()} in {compile_s:.1f} s")
    mem = compiled.memory_analysis()
    hlo = hlo_profile(compiled.as_text(), n)
    raw = _cost(compiled)
    cost, method = raw, "direct"
    if any(trip > 1 for trip in hlo["loops"]):
        cost = extrapolated_cost(trainer.cfg, vocab_size, devices)
        method = "extrapolated from 1 and 2 unscanned layers" + (
            " (+ the rematerialised forward passes)" if trainer.cfg.model.remat else "")
        log(f"FLOPs from 1- and 2-layer compiles ({time.perf_counter() - t0:.1f} s in all)")
    state_bytes = _shard_bytes({k: v for k, v in state.items() if k != "teacher"})
    per_device = {
        "params_bytes": _shard_bytes(state["params"]),
        "opt_state_bytes": _shard_bytes(state["opt_state"]),
        "state_bytes": state_bytes,
        "batch_bytes": _shard_bytes(jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=trainer.par.batch),
            abstract_batch(trainer))),
        "argument_bytes": float(mem.argument_size_in_bytes),
        "output_bytes": float(mem.output_size_in_bytes),
        "alias_bytes": float(mem.alias_size_in_bytes),
        "temp_bytes": float(mem.temp_size_in_bytes),
        "generated_code_bytes": float(mem.generated_code_size_in_bytes),
    }
    per_device["peak_bytes"] = (per_device["argument_bytes"] + per_device["output_bytes"]
                                - per_device["alias_bytes"] + per_device["temp_bytes"])
    per_device["peak_donated_bytes"] = per_device["peak_bytes"] - min(
        state_bytes, per_device["output_bytes"] - per_device["alias_bytes"])
    # each buffer of the step written once and read once: the least HBM traffic it can have
    per_device["hbm_traffic_bytes"] = (per_device["argument_bytes"] + per_device["output_bytes"]
                                       + 2 * per_device["temp_bytes"])
    wire = sum(c["wire_bytes"] for c in hlo["collectives"].values())
    mflops = model_flops(trainer)
    c = trainer.cfg
    out = {
        "preset": c.preset, "model": c.model.kind, "parametrization": c.model.parametrization,
        "n_params": trainer.n_params, "vocab_size": vocab_size,
        "d_model": c.model.d_model, "n_layers": c.model.n_layers, "n_heads": c.model.n_heads,
        "scan_layers": c.model.scan_layers, "remat": c.model.remat,
        "attention_impl": c.model.attention_impl,
        "precision": c.training.precision, "optimizer": c.optimizer.name,
        "batch_size": c.training.batch_size, "seq_len": c.data.seq_len,
        "tokens_per_step": c.training.batch_size * c.data.seq_len,
        "mesh": sizes, "devices": n, "sharding": c.training.sharding,
        "tensor_parallel": c.training.tensor_parallel,
        "mesh_described": trainer.par.describe(), "batch_shards": trainer.par.batch_shards,
        "per_device": per_device,
        "flops_per_device": cost["flops"], "bytes_accessed_per_device": cost["bytes_accessed"],
        "flops_method": method, "xla_cost_as_compiled": raw,
        "flops_global": cost["flops"] * n, "model_flops_per_step": mflops,
        "collectives": hlo["collectives"], "collective_wire_bytes_per_device": wire,
        "while_loops": hlo["loops"], "compile_s": compile_s,
        "jax_version": jax.__version__, "compiled_on": "XLA:CPU (fake devices)",
    }
    pipe = trainer.par.pipeline
    bubble = pipe.schedule.bubble_fraction() if pipe is not None else 0.0
    out["pipeline"] = None if pipe is None else {
        "stages": pipe.schedule.stages, "microbatches": pipe.schedule.microbatches,
        "chunks": pipe.schedule.chunks, "schedule": pipe.schedule.kind,
        "bubble_fraction": bubble}
    if accelerator is not None:
        acc = ACCELERATORS[accelerator]
        out["prediction"] = {
            **predict(acc, cost["flops"] / (1.0 - bubble), per_device["hbm_traffic_bytes"],
                      wire, mflops, n, bytes_accessed=cost["bytes_accessed"]),
            "hbm_bytes": acc.hbm_bytes,
            "fits": per_device["peak_donated_bytes"] <= acc.hbm_bytes}
    return out


def _gib(x: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if x >= size:
            return f"{x / size:,.2f} {unit}"
    return f"{x:.0f} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def format_plan(p: dict) -> str:
    """A plan as a short, human-readable report."""
    d = p["per_device"]
    lines = [
        f"plan: {p['preset']} {p['model']} {p['parametrization']}, {p['n_params'] / 1e9:.3f}B "
        f"params (vocabulary {p['vocab_size']}), batch {p['batch_size']} x {p['seq_len']} "
        f"tokens, {p['precision']}; {p['mesh_described']}",
        f"  per device: params {_gib(d['params_bytes'])}, optimizer state "
        f"{_gib(d['opt_state_bytes'])}, batch {_gib(d['batch_bytes'])}, temporaries "
        f"{_gib(d['temp_bytes'])}; peak {_gib(d['peak_donated_bytes'])} with the state donated "
        f"({_gib(d['peak_bytes'])} as compiled on the CPU)",
        f"  FLOPs per device per step: {p['flops_per_device']:.4g} ({p['flops_method']}); "
        f"model FLOPs per step {p['model_flops_per_step']:.4g} (6NT + 12LdST)",
    ]
    colls = [f"{op} x{c['count']} ({_gib(c['bytes'])})"
             for op, c in p["collectives"].items() if c["count"]]
    lines.append(f"  collectives per step: {', '.join(colls) or 'none'}; "
                 f"{_gib(p['collective_wire_bytes_per_device'])} sent per device")
    pred = p.get("prediction")
    if pred:
        lines.append(
            f"  on {pred['accelerator']}: compute {_ms(pred['compute_s'])}, HBM "
            f"{_ms(pred['memory_s'])} (at most {_ms(pred['memory_upper_s'])}), collectives "
            f"{_ms(pred['collective_s'])} -> step {_ms(pred['step_s'])} (MFU {pred['mfu']:.1%}; "
            f"{_ms(pred['step_overlapped_s'])}, MFU {pred['mfu_overlapped']:.1%} if fully "
            f"overlapped); "
            + ("fits" if pred["fits"] else "does NOT fit")
            + f" in {_gib(pred['hbm_bytes'])} of HBM")
    return "\n".join(lines)


def write_plan(p: dict, path: Path) -> None:
    """The plan as JSON (written atomically)."""
    from unitscale_jax import paths
    paths.write_text_atomic(path, json.dumps(p, indent=2) + "\n")


def default_vocab_size(cfg: Config) -> int:
    """The vocabulary a plan assumes: the preset's (``presets.VOCAB_SIZES``), else the
    tokenizer's.

    Raises:
      UsageError, PathError: a ``--tokenizer`` that cannot be loaded.
    """
    from unitscale_jax.train.presets import VOCAB_SIZES
    if cfg.preset in VOCAB_SIZES:
        return VOCAB_SIZES[cfg.preset]
    from unitscale_jax.data import get_tokenizer
    from unitscale_jax.paths import PathError
    try:
        return int(get_tokenizer(cfg.data.tokenizer).vocab_size)
    except PathError:
        raise
    except (ValueError, OSError, ImportError) as e:
        raise UsageError(f"--tokenizer {cfg.data.tokenizer}: {e}") from None

