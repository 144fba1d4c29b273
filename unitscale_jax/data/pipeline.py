"""The grain input pipeline: shuffle, tokenize, pack or crop, batch, apply the objective.

``make_iterator`` builds, with grain's dataset API::

    MapDataset.source(split)[shard_index::shard_count]   # per-process shard
      -> EpochShuffle(seed)       # a new permutation of the records every epoch
      .repeat(num_epochs)         # None = forever
      .map(tokenize)              # pack: text + eos;  crop: bos + text + eos
      [crop: .random_map(crop_or_pad, seed)]   # a random window per record
      .to_iter_dataset(ReadOptions(num_threads))
      [pack: ConcatThenSplitIterDataset(length = row_len)]  # concatenate, cut into rows
      .batch(batch_size)
      .map(lm_batch) | .random_map(mask_tokens | span_corruption, seed)

with ``row_len = seq_len + 1`` for the LM (inputs and targets are the row shifted by one) and
``seq_len`` for the encoder objectives. Every step is deterministic given ``seed``; every random
step draws from grain's per-element Philox streams, so the iterator's state (grain's
``DatasetIterator.get_state()``, a small JSON-serialisable dict of counters) fully determines the
batches that follow: ``set_state`` on a freshly built iterator with the same arguments resumes
exactly. Grain is used in-process (no worker processes): these byte-level transforms cost far
less than a training step.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from unitscale_jax.data import objectives
from unitscale_jax.data.sources import TextSource
from unitscale_jax.data.tokenizers import ByteTokenizer, Tokenizer, regular_ids

__all__ = ["TASKS", "DataIterator", "EpochShuffle", "make_iterator", "make_lm_iterator",
           "check_corpus_length", "row_length", "example_batch"]

TASKS = ("lm", "mlm", "seq2seq")
_MAX_SEED = 2**32


class EpochShuffle(grain.MapDataset):
    """Global shuffle, a fresh permutation per epoch: ``np.random.default_rng([seed, epoch])``.

    Same contract as grain's ``MapDataset.shuffle`` (index ``e * n + i`` reads record
    ``perm_e[i]`` of epoch ``e``; stateless, so iterator states stay small counters), but it
    computes each epoch's permutation once: grain's ``index_shuffle`` costs about 5 ms per index
    for a 10-record dataset and 0.5 ms for 100 (measured, grain 0.2.18), which dominates
    cropped batches of small corpora. Memory: one int64 per record.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed, self._n = int(seed), len(parent)
        self._cache: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return self._n

    def _permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._cache  # one tuple: safe under grain's read threads
        if cached_epoch != epoch:
            perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._cache = (epoch, perm)
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        return self._parent[int(self._permutation(epoch)[i]) + epoch * self._n]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """Record -> {"tokens": int32[n]}, with eos (pack) or bos...eos (crop) around the text."""

    tokenizer: Tokenizer
    source: TextSource
    add_bos: bool

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ids = self.source.token_ids(record, self.tokenizer)
        head = [self.tokenizer.bos_id] if self.add_bos else []
        return {"tokens": np.concatenate([np.asarray(head, np.int32), ids,
                                          np.asarray([self.tokenizer.eos_id], np.int32)])}


@dataclasses.dataclass(frozen=True)
class _CropOrPad:
    """A uniformly placed window of ``row_len`` tokens, or the whole record padded to it."""

    row_len: int
    pad_id: int

    def __call__(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = element["tokens"]
        if len(tokens) > self.row_len:
            start = int(rng.integers(0, len(tokens) - self.row_len + 1))
            return {"tokens": tokens[start:start + self.row_len]}
        out = np.full(self.row_len, self.pad_id, np.int32)
        out[:len(tokens)] = tokens
        return {"tokens": out}


@dataclasses.dataclass(frozen=True)
class _RepadPacked:
    """Packed rows: grain zero-fills the unused tail of the last row; make it ``pad_id``."""

    pad_id: int

    def __call__(self, element) -> dict[str, np.ndarray]:
        return {"tokens": np.where(element["tokens_segment_ids"] > 0, element["tokens"],
                                   self.pad_id).astype(np.int32)}


def row_length(task: str, seq_len: int) -> int:
    """Tokens per packed row: ``seq_len + 1`` for the LM (inputs and targets are the row
    shifted by one), ``seq_len`` for the encoder objectives."""
    return seq_len + 1 if task == "lm" else seq_len


def example_batch(task: str, *, seq_len: int, batch_size: int, tokenizer: Tokenizer | None = None,
                  mask_prob: float = 0.15, noise_density: float = 0.15,
                  mean_span: float = 3.0) -> dict[str, np.ndarray]:
    """A batch with the arrays, shapes and dtypes of ``make_iterator``'s for ``task``, made
    from rows of one repeated regular token (no data read): what a planner traces the train
    step with (``unitscale_jax.train.plan``).

    Raises:
      ValueError: an unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}.")
    tokenizer = tokenizer or ByteTokenizer()
    row = np.full((batch_size, row_length(task, seq_len)), regular_ids(tokenizer)[0], np.int32)
    objective = _Objective(task, tokenizer, batch_size, mask_prob, noise_density, mean_span)
    return objective({"tokens": row}, np.random.default_rng(0))


@dataclasses.dataclass(frozen=True)
class _Objective:
    """Batch {"tokens": [b, row_len]} -> the task's arrays, padded to ``batch_size`` rows."""

    task: str
    tokenizer: Tokenizer
    batch_size: int
    mask_prob: float
    noise_density: float
    mean_span: float

    def _rows(self, batch) -> np.ndarray:
        tokens = np.asarray(batch["tokens"], np.int32)
        missing = self.batch_size - tokens.shape[0]  # final batch of a finite pass
        if missing > 0:
            fill = np.full((missing, tokens.shape[1]), self.tokenizer.pad_id, np.int32)
            tokens = np.concatenate([tokens, fill])
        return tokens

    def __call__(self, batch, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        tokens = self._rows(batch)
        if self.task == "lm":
            return objectives.lm_batch(tokens, self.tokenizer.pad_id)
        if self.task == "mlm":
            return objectives.mask_tokens(tokens, rng, self.tokenizer, mask_prob=self.mask_prob)
        return objectives.span_corruption(tokens, rng, self.tokenizer,
                                          noise_density=self.noise_density,
                                          mean_span=self.mean_span)


def _tuples(x):
    """JSON turns tuples into lists; grain's packing state compares slices with tuples."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


class DataIterator:
    """An iterator of batches (dicts of NumPy arrays) with a checkpointable state.

    Attributes:
      task, split, seq_len, batch_size, tokenizer: as given to ``make_iterator``.
      tokens_per_batch: ``batch_size * seq_len``, positions per batch (scored or not).
      config: the arguments that determine the batches (saved with the state and checked when
        it is restored).
    """

    def __init__(self, dataset: grain.IterDataset, *, task: str, split: str, seq_len: int,
                 batch_size: int, tokenizer: Tokenizer, config: Mapping[str, Any]):
        self._it = iter(dataset)
        self.task, self.split, self.seq_len = task, split, seq_len
        self.batch_size, self.tokenizer = batch_size, tokenizer
        self.tokens_per_batch = batch_size * seq_len
        self.config = json.loads(json.dumps(dict(config)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """The pipeline position, JSON-serialisable: ``{"grain": grain's iterator state,
        "config": self.config}``. Store it in the checkpoint."""
        return {"grain": json.loads(json.dumps(self._it.get_state())), "config": self.config}

    def set_state(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restores a position from ``get_state`` (also after a JSON round trip).

        Raises:
          ValueError: (``strict``) the state was saved by a pipeline with other arguments, whose
            position would not mean the same batches here; the message lists the differences.
        """
        if not isinstance(state, Mapping) or "grain" not in state:
            raise ValueError("not a data-pipeline state (expected the dict from get_state()).")
        saved = state.get("config", {})
        if strict and saved != self.config:
            diff = {k: (saved.get(k), self.config.get(k))
                    for k in sorted(set(saved) | set(self.config))
                    if saved.get(k) != self.config.get(k)}
            raise ValueError("the data-pipeline state was saved with other settings "
                             f"(saved, now): {diff}; resume with the same data settings.")
        self._it.set_state(_tuples(dict(state["grain"])))

    def __repr__(self) -> str:
        return (f"DataIterator(task={self.task}, split={self.split}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, tokenizer={self.tokenizer!r})")


def check_corpus_length(source: TextSource, split: str, tokenizer: Tokenizer, row_len: int,
                        *, shard_index: int = 0,
                        shard_count: int = 1) -> int:
    """Counts tokens of ``split`` (this shard) until one row of ``row_len`` is filled.

    Returns:
      The tokens counted (at least ``row_len`` when it returns).

    Raises:
      ValueError: the whole split holds fewer than ``row_len`` tokens; the message has the counts.
    """
    ds = source.split(split)
    idx = range(shard_index, len(ds), shard_count)
    total = docs = 0
    for i in idx:
        total += len(source.token_ids(ds[i], tokenizer)) + 1  # + eos
        docs += 1
        if total >= row_len:
            return total
    raise ValueError(f"split {split!r} of {source.name} has only {total} tokens in {docs} "
                     f"document(s) (separators included), fewer than one sequence of {row_len} "
                     "tokens; use a smaller seq_len or a larger corpus.")


def make_iterator(source: TextSource, split: str = "train", *, seq_len: int, batch_size: int,
                  task: str = "lm", seed: int = 0, tokenizer: Tokenizer | None = None,
                  packing: str = "pack", shuffle: bool | None = None,
                  num_epochs: int | None = None, drop_remainder: bool | None = None,
                  shard_index: int = 0, shard_count: int = 1, num_threads: int = 2,
                  mask_prob: float = 0.15, noise_density: float = 0.15,
                  mean_span: float = 3.0) -> DataIterator:
    """Builds the batch iterator of one split for one objective.

    Args:
      source: from ``resolve_source``.
      split: ``"train"`` or ``"validation"``.
      seq_len: model sequence length (the LM reads ``seq_len + 1`` tokens per row).
      batch_size: rows per batch on this process.
      task: ``"lm"`` -> ``inputs``, ``targets``, ``where`` (see ``objectives.lm_batch``);
        ``"mlm"`` -> ``ids``, ``labels``, ``where``, ``valid`` (``objectives.mask_tokens``);
        ``"seq2seq"`` -> ``encoder_ids``, ``encoder_mask``, ``decoder_input_ids``,
        ``decoder_target_ids``, ``decoder_where`` (``objectives.span_corruption``).
      seed: seeds the shuffle, the crop windows and the masking (0 <= seed < 2**32).
      tokenizer: default ``ByteTokenizer()``.
      packing: ``"pack"``: documents joined by ``eos`` and cut into full rows (the last row of a
        finite pass is padded); ``"crop"``: one ``bos`` + document + ``eos`` per row, a random
        window when longer, padded when shorter.
      shuffle: default: True for ``train``, False otherwise.
      num_epochs: passes over the split; None repeats forever (default for ``train``; the
        default for other splits is 1).
      drop_remainder: drop a final partial batch; default: True when repeating forever. When
        False the final batch is filled up with all-padding rows (``where`` False), so every
        batch has the same shape.
      shard_index: take records ``shard_index::shard_count`` (e.g. ``jax.process_index()``).
      shard_count: number of shards (e.g. ``jax.process_count()``).
      num_threads: grain read threads.
      mask_prob: masked-LM selection probability.
      noise_density: span-corruption noise density.
      mean_span: span-corruption mean span length.

    Returns:
      A ``DataIterator`` (``next``, ``get_state``, ``set_state``).

    Raises:
      ValueError: bad arguments, a missing or empty split, or (packing) a split shorter than
        one row.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}.")
    if packing not in ("pack", "crop"):
        raise ValueError(f"unknown packing {packing!r}; use 'pack' or 'crop'.")
    for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                             ("shard_count", shard_count, 1)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}.")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    tokenizer = tokenizer or ByteTokenizer()
    shuffle = (split == "train") if shuffle is None else shuffle
    if num_epochs is None and split != "train":
        num_epochs = 1
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    drop_remainder = (num_epochs is None) if drop_remainder is None else drop_remainder
    row_len = row_length(task, seq_len)
    crop = packing == "crop"
    if crop:
        source.split(split)  # exists and is not empty; short documents are padded
    else:
        check_corpus_length(source, split, tokenizer, row_len, shard_index=shard_index,
                            shard_count=shard_count)

    ds = grain.MapDataset.source(source.split(split))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle:
        ds = EpochShuffle(ds, seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Tokenize(tokenizer, source, add_bos=crop))
    if crop:
        ds = ds.random_map(_CropOrPad(row_len, tokenizer.pad_id), seed=(seed + 1) % _MAX_SEED)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64))
    if not crop:
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": row_len})
        it = it.map(_RepadPacked(tokenizer.pad_id))
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    objective = _Objective(task, tokenizer, batch_size, mask_prob, noise_density, mean_span)
    if task == "lm":
        it = it.map(objective)
    else:
        it = it.random_map(objective, seed=(seed + 2) % _MAX_SEED)
    config = dict(source=source.name, split=split, task=task, seq_len=seq_len,
                  batch_size=batch_size, seed=seed, packing=packing, shuffle=shuffle,
                  num_epochs=num_epochs, drop_remainder=drop_remainder, shard=[shard_index,
                  shard_count], tokenizer=repr(tokenizer), vocab_size=tokenizer.vocab_size,
                  records=len(source.split(split)))
    if task == "mlm":
        config["mask_prob"] = mask_prob
    if task == "seq2seq":
        config.update(noise_density=noise_density, mean_span=mean_span)
    return DataIterator(it, task=task, split=split, seq_len=seq_len, batch_size=batch_size,
                        tokenizer=tokenizer, config=config)


def make_lm_iterator(source: TextSource, split: str, seq_len: int, batch_size: int,
                     seed: int = 0, tokenizer: Tokenizer | None = None,
                     **kwargs) -> DataIterator:
    """``make_iterator(..., task="lm")``: batches of next-token ``inputs``/``targets``/``where``."""
    return make_iterator(source, split, seq_len=seq_len, batch_size=batch_size, task="lm",
                         seed=seed, tokenizer=tokenizer, **kwargs)
