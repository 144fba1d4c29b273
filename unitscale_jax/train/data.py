"""The run's data: ``unitscale_jax.data`` sources, tokenizer and iterators from a ``Config``.

Every failure caused by the user's input (a missing or empty file, an unknown tfds name, a
corpus shorter than one sequence, an unknown tokenizer) becomes a one-line ``UsageError``
that names the ``--data`` / ``--seq-len`` value.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

from unitscale_jax import data as datalib
from unitscale_jax import paths
from unitscale_jax.paths import PathError
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

    def eval_batches(self, cfg: Config, n: int) -> list[dict]:
        """The first ``n`` batches of one in-order pass over the validation split (fewer if
        the split is smaller); the same batches at every evaluation."""
        import jax
        it = self._iterator(cfg, "validation", cfg.training.batch_size // jax.process_count(),
                            shard_index=jax.process_index(), shard_count=jax.process_count(),
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
