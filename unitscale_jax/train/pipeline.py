"""Pipeline parallelism: a scanned layer stack split over the ``stage`` mesh axis.

``--pipeline-stages P --microbatches M`` cuts the stacked layers of every scanned
``TransformerStack`` (parameters on a leading ``layers`` axis, ``scan_layers``) into ``P *
V`` chunks of consecutive layers; chunk ``c`` lives on stage ``c % P`` (``V`` chunks per
stage). The batch is cut into ``M`` microbatches, and each microbatch passes through the
chunks in order. What each stage does at each tick is an explicit ``Schedule.table``
``[tick, stage] -> (microbatch, chunk)`` or idle (``-1``); ``Pipeline`` executes exactly that
table under ``jax.shard_map`` (manual over ``stage`` only; the ``data`` / ``fsdp`` /
``tensor`` axes stay with the compiler, so the pipeline composes with ``--sharding``):

1. at tick ``t`` every stage ``s`` reads its entry ``(m, c)``; chunk 0 takes microbatch ``m``
   of the stack's input, any later chunk takes the activation the previous stage sent at
   tick ``t - 1``;
2. a busy stage runs its layers of chunk ``c`` (``jax.lax.scan`` over them, the same layer
   function as the unpipelined scan: same ops, same residual taus); an idle one skips them
   (``jax.lax.cond``);
3. the last chunk's result is microbatch ``m`` of the stack's output;
4. every stage sends its result to the next, ``s -> (s + 1) % P`` (``jax.lax.ppermute``).

``Schedule.check`` proves a table fits this executor (every (microbatch, chunk) once, each
chunk after its predecessor on the previous stage one tick earlier), so any checked table
computes the unpipelined stack. The backward pass is the autodiff transpose of the forward
one (ppermutes reversed), so it runs the same table backwards.

Schedules (``SCHEDULES``):

``gpipe`` (GPipe, Huang et al., 2019): ``V = 1``; stage ``s`` works on microbatch ``t - s``
  at tick ``t``. ``M + P - 1`` ticks; the bubble (idle stage-ticks over all stage-ticks) is
  ``(P - 1) / (M + P - 1)``.
``circular`` (the interleaved / circular schedule of Narayanan et al., 2021 as written for
  SPMD by GSPMD / praxis): ``V >= 2`` chunks per stage; microbatches go round the ring of
  stages ``V`` times in groups of ``P`` (``M`` must be a multiple of ``P``). ``M V + P - 1``
  ticks of ``1 / V`` the work each; the bubble is ``(P - 1) / (M V + P - 1)``.

Placement: parameters are sharded over ``stage`` on their ``layers`` axis (stage ``s`` keeps
layers ``s L / P ... (s + 1) L / P``); ``circular`` regroups them into its chunks inside the
step (a reshard of the layer parameters each step). Microbatch ``m`` is rows ``m::M`` of the
batch, so a data-parallel shard's rows stay on its devices. The embedding, final norm, readout
and loss are outside the pipeline (computed by every stage, on the whole batch).
Dropout keys are folded with the microbatch index (masks differ from an unpipelined run).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from unitscale_jax import ops

SCHEDULES = ("gpipe", "circular")
AXIS = "stage"
IDLE = -1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule as the table the executor runs.

    Attributes:
      kind: ``gpipe`` or ``circular``.
      stages: ``P``.
      microbatches: ``M``.
      chunks: ``V``, layer chunks per stage.
      table: int32 ``[ticks, stages, 2]``: ``(microbatch, chunk)`` of each stage at each tick,
        ``(-1, -1)`` when it is idle.
    """

    kind: str
    stages: int
    microbatches: int
    chunks: int
    table: np.ndarray

    @property
    def ticks(self) -> int:
        return int(self.table.shape[0])

    def idle(self) -> int:
        """Idle stage-ticks of the table."""
        return int(np.sum(self.table[..., 0] == IDLE))

    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return self.idle() / self.table[..., 0].size

    def check(self) -> None:
        """Raises ``ValueError`` unless the executor computes the unpipelined stack with this
        table: each (microbatch, chunk) exactly once; chunk 0 anywhere on stage 0; chunk ``c >
        0`` of microbatch ``m`` at ``(t, s)`` only if chunk ``c - 1`` of ``m`` ran at ``(t - 1,
        s - 1 mod P)``; chunk ``c`` on stage ``c % P``."""
        p, n = self.stages, self.stages * self.chunks
        seen = set()
        for t, s in np.ndindex(*self.table.shape[:2]):
            m, c = (int(v) for v in self.table[t, s])
            if m == IDLE:
                continue
            if not (0 <= m < self.microbatches and 0 <= c < n) or c % p != s or (m, c) in seen:
                raise ValueError(f"schedule entry (tick {t}, stage {s}) = {(m, c)} is out of "
                                 "range, on the wrong stage or repeated.")
            seen.add((m, c))
            if c and (t == 0 or tuple(self.table[t - 1, (s - 1) % p]) != (m, c - 1)):
                raise ValueError(f"schedule entry (tick {t}, stage {s}) = {(m, c)}: its input "
                                 f"(chunk {c - 1}) was not sent by stage {(s - 1) % p} at "
                                 f"tick {t - 1}.")
        if len(seen) != self.microbatches * n:
            raise ValueError(f"schedule runs {len(seen)} of the {self.microbatches * n} "
                             "(microbatch, chunk) pairs.")


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: stage ``s`` runs microbatch ``t - s`` (its one chunk ``s``) at tick ``t``."""
    p, m = stages, microbatches
    table = np.full((m + p - 1, p, 2), IDLE, np.int32)
    for t, s in np.ndindex(m + p - 1, p):
        if 0 <= t - s < m:
            table[t, s] = (t - s, s)
    return Schedule("gpipe", p, m, 1, table)


def circular(stages: int, microbatches: int, chunks: int) -> Schedule:
    """The circular schedule: item ``i = t - s`` of stage ``s``; items come in groups of ``P
    V``: microbatch ``(i // (P V)) P + i % P`` on its round ``(i // P) % V``, chunk ``round P +
    s``."""
    p, m, v = stages, microbatches, chunks
    if m % p:
        raise ValueError(f"the circular schedule needs the microbatches ({m}) to be a multiple "
                         f"of the stages ({p}).")
    table = np.full((m * v + p - 1, p, 2), IDLE, np.int32)
    for t, s in np.ndindex(m * v + p - 1, p):
        i = t - s
        if 0 <= i < m * v:
            table[t, s] = ((i // (p * v)) * p + i % p, ((i // p) % v) * p + s)
    return Schedule("circular", p, m, v, table)


def make_schedule(kind: str, stages: int, microbatches: int, chunks: int = 1) -> Schedule:
    """The checked schedule ``kind`` (``SCHEDULES``); ``chunks`` is ``V`` (``circular``)."""
    if kind == "gpipe":
        if chunks != 1:
            raise ValueError(f"the gpipe schedule has one chunk per stage, got {chunks}.")
        sched = gpipe(stages, microbatches)
    elif kind == "circular":
        sched = circular(stages, microbatches, chunks)
    else:
        raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {SCHEDULES}.")
    sched.check()
    return sched


def split_microbatches(a: jax.Array, m: int) -> jax.Array:
    """``[B, ...] -> [M, B / M, ...]``, microbatch ``i`` being rows ``i::M``."""
    return jnp.swapaxes(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 0, 1)


def join_microbatches(a: jax.Array) -> jax.Array:
    """The inverse of ``split_microbatches``."""
    return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Runs a scanned stack's layers by ``schedule`` over the ``stage`` axis of ``mesh``.

    An ``nn.stack_runner``: ``with nn.stack_runner(pipeline):`` (``Parallel.context`` does
    this) pipelines every scanned ``TransformerStack`` traced inside.
    """

    mesh: jax.sharding.Mesh
    schedule: Schedule

    def describe(self) -> str:
        s = self.schedule
        chunks = f" x {s.chunks} chunks" if s.chunks > 1 else ""
        return (f"pipeline {s.kind} ({s.stages} stages x {s.microbatches} microbatches{chunks}, "
                f"bubble {s.bubble_fraction():.1%})")

    def __call__(self, layer_fn: Callable, x: jax.Array, xs: Any, batched: dict) -> jax.Array:
        """The stack's output: ``layer_fn(h, layer_xs, batched_mb, microbatch)`` applied over
        the layers (leading axis of ``xs``) to each microbatch of ``x`` ``[B, ...]`` and of the
        ``batched`` arrays (leading axis ``B``)."""
        sched = self.schedule
        p, v, m = sched.stages, sched.chunks, sched.microbatches
        n_layers = jax.tree.leaves(xs)[0].shape[0]
        if n_layers % (p * v):
            raise ValueError(f"pipeline: {n_layers} layers do not split into {p} stages x {v} "
                             "chunks.")
        if x.shape[0] % m:
            raise ValueError(f"pipeline: a batch of {x.shape[0]} does not split into {m} "
                             "microbatches.")
        per = n_layers // (p * v)
        chunked = jax.tree.map(lambda a: a.reshape(v, p, per, *a.shape[1:]), xs)
        program = functools.partial(_stage_program, table=sched.table, layer_fn=layer_fn,
                                    stages=p, chunks=v)
        run = jax.shard_map(program, mesh=self.mesh, in_specs=(P(None, AXIS), P(), P()),
                            out_specs=P(), axis_names={AXIS})
        with ops.microbatches(m):  # the unit-scaled weight gradients of the whole batch
            out = run(chunked, split_microbatches(x, m),
                      jax.tree.map(lambda a: split_microbatches(a, m), batched))
        return join_microbatches(out)


def _stage_program(xs, x_mb, batched_mb, *, table, layer_fn, stages, chunks):
    """One stage's program (inside ``shard_map``): the ticks of ``table`` (module docstring)."""
    xs = jax.tree.map(lambda a: a[:, 0], xs)  # this stage's chunks: [V, layers per chunk, ...]
    stage = jax.lax.axis_index(AXIS)
    last_chunk = stages * chunks - 1
    ring = [(i, (i + 1) % stages) for i in range(stages)]

    def run_chunk(h, local, microbatch, batched):
        layers = jax.tree.map(lambda a: a[local], xs)

        def body(h, layer_xs):
            return layer_fn(h, layer_xs, batched, microbatch), None

        return jax.lax.scan(body, h, layers)[0]

    def tick(carry, row):
        received, out = carry
        mb, chunk = row[stage, 0], row[stage, 1]
        busy = mb != IDLE
        i = jnp.maximum(mb, 0)
        h = jnp.where(chunk == 0, x_mb[i], received)
        batched = jax.tree.map(lambda a: a[i], batched_mb)
        y = jax.lax.cond(busy, lambda h: run_chunk(h, jnp.maximum(chunk, 0) // stages, i,
                                                   batched), lambda h: h, h)
        done = busy & (chunk == last_chunk)
        out = jax.lax.dynamic_update_index_in_dim(out, jnp.where(done, y, out[i]), i, 0)
        return (jax.lax.ppermute(y, AXIS, ring), out), None

    vary = functools.partial(jax.lax.pcast, axis_name=AXIS, to="varying")
    init = (vary(jnp.zeros_like(x_mb[0])), vary(jnp.zeros_like(x_mb)))
    (_, out), _ = jax.lax.scan(tick, init, jnp.asarray(table))
    # only the stage of the last chunk holds the outputs: give them to every stage
    return jax.lax.psum(jnp.where(stage == (last_chunk % stages), out, 0), AXIS)

