"""The run's data: ``unitscale_jax.data`` sources, tokenizer and iterators from a ``Config``.

Every failure caused by the user's input (a missing or empty file, an unknown tfds name, a
corpus shorter than one sequence, an unknown tokenizer) becomes a one-line ``UsageError``
that names the ``--data`` / ``--seq-len`` value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from unitscale_jax import data as datalib
from unitscale_jax import paths
from unitscale_jax.paths import PathError
from unitscale_jax.train import distributed
from unitscale_jax.train.config import Config
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.tasks import get_task

_USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError)


PREPARED = "prepared:"
"""``--data prepared:DIR``: a corpus tokenized by ``unitscale-jax prepare``
(``unitscale_jax.data.prepared``)."""


def _spec(value):
    if value is None:
        return None
    whole = value.startswith(("tfds:", PREPARED))
    parts = [p.strip() for p in value.split(",")] if not whole else [value]
    parts = [p for p in parts if p]
    if not parts:
        raise UsageError("--data is empty; pass a text file, a glob, tfds:NAME, or leave it out "
                         "for the built-in corpus.")
    return parts[0] if len(parts) == 1 else parts


def _name(cfg: Config) -> str:
    return "the built-in corpus" if cfg.data.data is None else f"--data {cfg.data.data}"


@dataclasses.dataclass
class RunData:
    """The resolved source and tokenizer of a run, and its iterators."""

    source: Any
    tokenizer: Any
    task: str
    bytes_per_token: float

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def _iterator(self, cfg: Config, split: str, batch_size: int, **kw):
        d = cfg.data
        try:
            return datalib.make_iterator(
                self.source, split, seq_len=d.seq_len, batch_size=batch_size, task=self.task,
                seed=cfg.training.seed, tokenizer=self.tokenizer, packing=d.packing,
                mask_prob=d.mask_prob, noise_density=d.noise_density, mean_span=d.mean_span,
                **kw)
        except ValueError as e:
            raise UsageError(f"{_name(cfg)}: {e}") from None

    def train_iterator(self, cfg: Config, *, shard_index: int = 0, shard_count: int = 1):
        """The endless, shuffled training iterator of this process (its rows of each batch)."""
        return self._iterator(cfg, "train", cfg.training.batch_size // shard_count,
                              shard_index=shard_index, shard_count=shard_count)

    def eval_batches(self, cfg: Config, n: int, *,
                     shard: Optional[tuple[int, int]] = None) -> list[dict]:
        """The first ``n`` batches of one in-order pass over the validation split (fewer if
        the split is smaller); the same batches at every evaluation.

        Args:
          shard: ``(index, count)``: the rows of record shard ``index`` of ``count``
            (``batch_size / count`` per batch); default this process's
            (``jax.process_index()`` of ``jax.process_count()``).
        """
        index, count = (jax.process_index(), jax.process_count()) if shard is None else shard
        it = self._iterator(cfg, "validation", cfg.training.batch_size // count,
                            shard_index=index, shard_count=count,
                            num_epochs=1, shuffle=False, drop_remainder=False)
        return list(itertools.islice(it, n))


def load_data(cfg: Config, log: Callable[[str], None] = print) -> RunData:
    """Resolves ``--data`` and ``--tokenizer``, checks both splits hold a sequence.

    ``--data prepared:DIR`` opens a prepared corpus (its tokenizer must be ``--tokenizer``);
    its sizes come from the manifest, so start-up reads a few records, not the corpus.

    Raises:
      UsageError: any problem with the data the user named.
      PathError: a ``--tokenizer`` file or ``--data-dir`` of the wrong kind.
    """
    d = cfg.data
    try:
        tokenizer = datalib.get_tokenizer(d.tokenizer)
    except PathError:
        raise
    except _USER_ERRORS as e:
        raise UsageError(f"--tokenizer {d.tokenizer}: {e}") from None
    if d.data_dir is not None:  # tfds prepares the data there (may be read-only once it has)
        paths.output_dir(d.data_dir, "--data-dir", "pass a directory for the prepared "
                         "datasets, or leave it out", probe=False)
    try:
        spec = _spec(d.data)
        if isinstance(spec, str) and spec.startswith(PREPARED):  # counts from its manifest
            source = datalib.open_prepared(spec[len(PREPARED):], tokenizer)
        else:
            source = datalib.resolve_source(spec, data_dir=d.data_dir,
                                            validation_fraction=d.validation_fraction,
                                            text_key=d.text_key)
    except (UsageError, PathError):
        raise
    except _USER_ERRORS as e:
        raise UsageError(f"{_name(cfg)}: {e}") from None
    task = get_task(cfg.model.kind).objective
    row_len = d.seq_len + 1 if task == "lm" else d.seq_len
    stats = {}
    for split in ("train", "validation"):
        try:
            datalib.check_corpus_length(source, split, tokenizer, row_len)
            stats[split] = datalib.corpus_stats(source, tokenizer, [split])[split]
        except ValueError as e:
            raise UsageError(f"{_name(cfg)}: {e}") from None
    log(f"data: {source.name}, train {stats['train'].documents} documents "
        f"({stats['train'].bytes / 1e6:.2f} MB, {stats['train'].tokens:,} tokens), validation "
        f"{stats['validation'].documents} documents ({stats['validation'].tokens:,} tokens); "
        f"tokenizer {getattr(tokenizer, 'name', type(tokenizer).__name__)} (vocabulary "
        f"{tokenizer.vocab_size})")
    return RunData(source, tokenizer, task, stats["validation"].bytes_per_token)


# --------------------------------------------------------------------------- data shards

BATCH_LOG_ENV = "UNITSCALE_JAX_BATCH_LOG"
"""A directory: each process appends, per training step, the record shards it read and a
digest of each of its batch rows to ``process-<i>.jsonl`` there (``record_batch``)."""


@dataclasses.dataclass(frozen=True)
class Shards:
    """How a run reads its batches: ``count`` record shards (shard ``k`` reads records
    ``k::count`` and gives rows ``[k, k + 1) * batch_size / count`` of every batch); this
    process reads the shards in ``local``, the rows its devices hold."""

    count: int
    local: tuple[int, ...]


def data_shards(rows: list[tuple[int, int]], batch_size: int,
                count: Optional[int] = None, *, resuming: bool = False) -> Shards:
    """The record shards of this process, from every process's batch rows
    (``train.step.process_rows``).

    Args:
      count: the number of shards; default the fewest that give every process whole shards
        (one per process, or per tensor-parallel group of processes).
      resuming: ``count`` is a checkpoint's (for the error message).

    Raises:
      UsageError: ``count`` does not divide the batch, or a process's rows are not whole
        shards.
    """
    bounds = sorted({b for r in rows for b in r} | {0, batch_size})
    fewest = batch_size // np.gcd.reduce(np.asarray(bounds[1:], np.int64))
    count = int(fewest if count is None else count)
    if batch_size % count or any(b * count % batch_size for b in bounds):
        fix = (f"resume it on a number of processes that {count} shard(s) split over (to move "
               "a run between process counts, start it with --data-shards, e.g. 4)"
               if resuming else f"pass --data-shards as a multiple of {fewest} that divides "
               f"{batch_size}")
        raise UsageError(f"{'the checkpoint was read in ' if resuming else ''}{count} data "
                         f"shard(s), which do not fit this run: each process reads whole shards "
                         f"of the --batch-size {batch_size} batch, and its processes hold the "
                         f"rows {rows}; {fix}.")
    start, stop = rows[jax.process_index()]
    per = batch_size // count
    return Shards(count, tuple(range(start // per, stop // per)))


class ShardedBatches:
    """This process's rows of every training batch: the batches of its record shards
    (``Shards.local``), one iterator each, joined along the batch axis.

    ``get_state`` is a collective (every process calls it at the same step): the position of
    every shard of the run, so that a run on any number of processes resumes it.

    Args:
      make: ``make(index, count)``: the iterator of record shard ``index`` of ``count``.
      layout: ``layout(count, resuming=False)``: this process's ``Shards`` for ``count``
        shards (None: the default count; ``data_shards``); called again when a checkpoint was
        read in another count of shards.
      count: the ``--data-shards`` given (None: the default, or a checkpoint's count).
    """

    def __init__(self, make: Callable[[int, int], Iterator], layout: Callable[..., Shards],
                 count: Optional[int] = None):
        self._make, self._layout, self._given = make, layout, count
        self._open(layout(count))

    def _open(self, shards: Shards) -> None:
        self.shards = shards
        self.iterators = [self._make(k, shards.count) for k in shards.local]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batches = [next(it) for it in self.iterators]
        if len(batches) == 1:
            return batches[0]
        return jax.tree.map(lambda *a: np.concatenate(a), *batches)

    def get_state(self) -> dict:
        """``{"shards": count, "states": [the state of each shard]}`` (JSON)."""
        merged: dict[str, Any] = {}
        for part in distributed.gather_json({str(k): it.get_state() for k, it in
                                             zip(self.shards.local, self.iterators)}):
            merged.update(part)
        return {"shards": self.shards.count,
                "states": [merged[str(k)] for k in range(self.shards.count)]}

    def set_state(self, state: dict) -> None:
        """Resumes from ``get_state`` (or a one-iterator state of an older checkpoint).

        Raises:
          UsageError: the checkpoint's shards do not split over this run's processes, or
            its data state does not match the data settings.
        """
        if not (isinstance(state, dict) and "states" in state):
            state = {"shards": 1, "states": [state]}
        count = int(state["shards"])
        if count != self.shards.count:
            if self._given is not None:
                raise UsageError(f"the checkpoint's data was read in {count} shards, not "
                                 f"--data-shards {self._given}; resume with --data-shards "
                                 f"{count}.")
            self._open(self._layout(count, resuming=True))
        for k, it in zip(self.shards.local, self.iterators):
            try:
                it.set_state(state["states"][k])
            except ValueError as e:
                raise UsageError(f"cannot resume the data pipeline of shard {k}: {e}") from None


def join_eval(per_shard: list[list[dict]]) -> list[dict]:
    """This process's validation batches from those of its shards: the first ``m`` of each
    joined along the batch axis, ``m`` the fewest any shard of any process has (so every
    process evaluates the same number of batches; a collective)."""
    m = min(distributed.gather_json(min(len(b) for b in per_shard)))
    return [b[0] if len(b) == 1 else jax.tree.map(lambda *a: np.concatenate(a), *b)
            for b in zip(*(batches[:m] for batches in per_shard))]


def record_batch(step: int, batch: Any, shards: Shards) -> None:
    """With ``$UNITSCALE_JAX_BATCH_LOG`` set, appends this process's shards and the SHA-1 of
    each row of ``batch`` (all its arrays) at ``step`` to ``process-<i>.jsonl`` there."""
    where = os.environ.get(BATCH_LOG_ENV)
    if not where:
        return
    leaves = [np.asarray(a) for a in jax.tree.leaves(batch)]
    rows = []
    for i in range(leaves[0].shape[0]):
        h = hashlib.sha1()
        for a in leaves:
            h.update(np.ascontiguousarray(a[i]).tobytes())
        rows.append(h.hexdigest())
    line = {"step": int(step), "process": jax.process_index(), "shards": list(shards.local),
            "count": shards.count, "rows": rows}
    path = Path(where) / f"process-{jax.process_index()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
