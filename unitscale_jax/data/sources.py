"""Data sources named on the command line, and corpus statistics.

``resolve_source(spec)`` turns ``--data`` into a ``TextSource``: random-access tfds data sources
(``ArrayRecordDataSource``) for the ``train`` and ``validation`` splits plus the name of their text
field.

- ``None``: the built-in corpus (``pydoc_data.topics``; no download).
- ``"path/or/glob.txt"`` (or a list of them): local text through the ``LocalText`` builder.
- ``"tfds:NAME"`` (``NAME`` may be ``dataset/config:version``): any registered tfds dataset, loaded
  with tfds' own ``builder`` / ``download_and_prepare`` / ``as_data_source`` (downloads when not in
  ``data_dir``). Its validation split is ``validation`` (or ``valid``, ``dev``, ``test``), else the
  last ``validation_fraction`` of ``train``, taken with tfds' split slicing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from unitscale_jax.data import builders, corpus
from unitscale_jax.data.tokenizers import ByteTokenizer, Tokenizer

__all__ = ["TextSource", "resolve_source", "tfds_builder", "prepare_tfds", "SplitStats",
           "corpus_stats", "describe_corpus"]

_VALIDATION_NAMES = ("validation", "valid", "dev", "test")


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Splits of text records, as random-access sequences (``len`` and ``[i]``).

    Attributes:
      name: what the user named, for messages (``"builtin:pydoc_data.topics"``, a path, ``tfds:X``).
      splits: split name -> data source; each record is a mapping with ``text_key``.
      text_key: the record field holding the text (``str`` or UTF-8 ``bytes``).
    """

    name: str
    splits: Mapping[str, Sequence[Mapping[str, Any]]]
    text_key: str = "text"

    def split(self, split: str) -> Sequence[Mapping[str, Any]]:
        """The data source of ``split``.

        Raises:
          ValueError: no such split, or it is empty.
        """
        if split not in self.splits:
            raise ValueError(f"data source {self.name} has no split {split!r}; it has "
                             f"{sorted(self.splits)}.")
        ds = self.splits[split]
        if len(ds) == 0:
            raise ValueError(f"split {split!r} of data source {self.name} is empty.")
        return ds

    def text(self, record: Mapping[str, Any]) -> str:
        """The text of one record."""
        value = record[self.text_key]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def token_ids(self, record: Mapping[str, Any], tokenizer: Tokenizer) -> np.ndarray:
        """The token ids of one record (int32, no specials): ``tokenizer.encode`` of its text.
        The data pipeline reads every record through this (a ``PreparedSource`` returns its
        stored ids instead)."""
        return tokenizer.encode(self.text(record))

    def counted_stats(self, split: str) -> SplitStats | None:
        """The size of ``split`` when it is known without reading it (``corpus_stats`` uses
        it): None here; a ``PreparedSource`` has its manifest's counts."""
        del split
        return None

    def documents(self, split: str, limit: int | None = None) -> Iterator[str]:
        """The texts of ``split`` in stored order (at most ``limit``)."""
        ds = self.split(split)
        for i in range(len(ds) if limit is None else min(limit, len(ds))):
            yield self.text(ds[i])


def resolve_source(spec: str | Sequence[str] | None = None, *, data_dir: str | None = None,
                   validation_fraction: float = builders.DEFAULT_VALIDATION_FRACTION,
                   chunk_chars: int = builders.DEFAULT_CHUNK_CHARS, text_key: str | None = None,
                   download: bool = True, quiet: bool = True) -> TextSource:
    """Resolves a ``--data`` value into a prepared ``TextSource``.

    Args:
      spec: ``None`` (built-in corpus), a path or glob (or a list of them), or ``"tfds:NAME"``.
      data_dir: where tfds keeps prepared datasets (default: tfds' own, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      validation_fraction: share of chunks held out (local and built-in text), or of ``train``
        for a tfds dataset without a validation split.
      chunk_chars: chunk size of local and built-in text (see ``corpus``).
      text_key: the text feature of a tfds dataset; ``None`` picks its only ``Text`` feature.
      download: for ``tfds:NAME``, allow ``download_and_prepare`` (needs the internet).
      quiet: hide tfds' progress bars and logs.

    Raises:
      FileNotFoundError: a missing file, or a glob that matches nothing.
      ValueError: an empty or non-UTF-8 file, an unknown tfds dataset, a missing text feature.
      RuntimeError: the built-in corpus is unavailable in this Python build.
    """
    if spec is None:
        with builders.quiet_tfds(quiet):
            b = builders.builtin_builder(data_dir=data_dir, chunk_chars=chunk_chars,
                                         validation_fraction=validation_fraction)
        return TextSource(f"builtin:{corpus.BUILTIN_NAME}", builders.prepare(b, quiet=quiet))
    if isinstance(spec, str) and spec.startswith("tfds:"):
        return _tfds_source(spec[len("tfds:"):], data_dir=data_dir, text_key=text_key,
                            validation_fraction=validation_fraction, download=download,
                            quiet=quiet)
    with builders.quiet_tfds(quiet):
        b = builders.local_text_builder(spec, data_dir=data_dir, chunk_chars=chunk_chars,
                                        validation_fraction=validation_fraction)
    name = spec if isinstance(spec, str) else ",".join(spec)
    return TextSource(name, builders.prepare(b, quiet=quiet))


def tfds_builder(name: str, *, data_dir: str | None = None, flag: str = "--data"):
    """The tfds builder of dataset ``name`` (``dataset/config:version``, without ``tfds:``),
    for array_record files; ``prepare_tfds`` prepares it.

    Raises:
      ValueError: an empty or unknown dataset name (the message lists close matches).
      RuntimeError: a package the builder needs is missing.
    """
    import tensorflow_datasets as tfds
    if not name:
        raise ValueError(f"empty tfds dataset name; use {flag} tfds:NAME, e.g. "
                         "tfds:tiny_shakespeare.")
    try:
        with _missing_package_hint(name):
            return tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False),
                                          n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown tfds dataset {name!r} (from {flag} tfds:{name}): no "
                         f"registered tensorflow-datasets builder has that name.{hint}") from None


def prepare_tfds(builder, name: str, *, download: bool = True, quiet: bool = True) -> list[str]:
    """Prepares a ``tfds_builder`` (``download_and_prepare`` when ``download``; downloads when
    the dataset is not yet in its data directory) and returns its split names.

    Raises:
      ValueError: the dataset is not prepared and ``download`` is False.
      RuntimeError: the download or preparation failed, or a package it needs is missing.
    """
    if download:
        try:
            with builders.quiet_tfds(quiet), _missing_package_hint(name):
                builder.download_and_prepare(file_format="array_record")
        except OSError as e:  # includes requests' ConnectionError
            raise RuntimeError(f"could not download or prepare tfds dataset {name!r} into "
                               f"{builder.data_dir} ({type(e).__name__}: {e}); it needs the "
                               "internet, or pass local files with --data instead.") from None
    available = list(builder.info.splits)
    if not available:
        raise ValueError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; run with "
                         "downloads allowed (download=True) or prepare it first.")
    return available


def _tfds_source(name: str, *, data_dir, text_key, validation_fraction, download,
                 quiet) -> TextSource:
    builder = tfds_builder(name, data_dir=data_dir)
    key = _text_key(builder.info.features, text_key, name)
    available = prepare_tfds(builder, name, download=download, quiet=quiet)
    val = next((s for s in _VALIDATION_NAMES if s in available), None)
    if "train" not in available:
        raise ValueError(f"tfds dataset {name!r} has no 'train' split (it has {available}).")
    if val is not None:
        names = {"train": "train", "validation": val}
    elif validation_fraction > 0:
        n = builder.info.splits["train"].num_examples
        n_val = max(1, round(n * validation_fraction))
        if n < 2:
            raise ValueError(f"tfds dataset {name!r} has {n} train example(s) and no validation "
                             "split; it needs at least 2 to hold one out.")
        names = {"train": f"train[:{n - n_val}]", "validation": f"train[{n - n_val}:]"}
    else:
        names = {"train": "train"}
    splits = {k: builder.as_data_source(split=v) for k, v in names.items()}
    return TextSource(f"tfds:{name}", splits, key)


@contextlib.contextmanager
def _missing_package_hint(name: str):
    """Turns a missing optional package (e.g. tensorflow for a dataset whose generation needs
    it, or importlib_resources, which tfds 4.9.10 uses but does not declare:
    tensorflow/datasets#11212) into one clear RuntimeError."""
    try:
        yield
    except ModuleNotFoundError as e:
        raise RuntimeError(f"tfds dataset {name!r} needs the Python package {e.name!r}, which is "
                           f"not installed (pip install {e.name}).") from None


def _text_key(features, text_key: str | None, name: str) -> str:
    import tensorflow_datasets as tfds
    items = getattr(features, "items", lambda: [])()
    texts = sorted(k for k, f in items if isinstance(f, tfds.features.Text))
    if text_key is not None:
        if text_key not in dict(items):
            raise ValueError(f"tfds dataset {name!r} has no feature {text_key!r}; its features "
                             f"are {sorted(dict(items))} (text ones: {texts}).")
        return text_key
    if len(texts) != 1:
        raise ValueError(f"tfds dataset {name!r} has {len(texts)} text features {texts}; name "
                         "the one to train on with text_key (e.g. --text-key).")
    return texts[0]


@dataclasses.dataclass(frozen=True)
class SplitStats:
    """Size of one split: documents (records), UTF-8 bytes and tokens (no specials added)."""

    documents: int
    bytes: int
    tokens: int

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token: bits/byte = loss (nats/token) / (ln 2 * bytes_per_token)."""
        return self.bytes / max(self.tokens, 1)


def corpus_stats(source: TextSource, tokenizer: Tokenizer | None = None,
                 splits: Sequence[str] | None = None) -> dict[str, SplitStats]:
    """Counts documents, bytes and tokens of each split (a full pass: meant for corpora that
    fit a training run's startup, e.g. local files and the built-in corpus; a split whose
    counts the source knows, ``counted_stats``, is not read)."""
    tokenizer = tokenizer or ByteTokenizer()
    out = {}
    for split in splits or sorted(source.splits):
        known = source.counted_stats(split)
        if known is not None:
            out[split] = known
            continue
        docs = n_bytes = n_tokens = 0
        for text in source.documents(split):
            docs += 1
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tokenizer.encode(text))
        out[split] = SplitStats(docs, n_bytes, n_tokens)
    return out


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def describe_corpus(source: TextSource, stats: Mapping[str, SplitStats]) -> str:
    """One line for the trainer's log, e.g. ``builtin:pydoc_data.topics: train 159 records,
    439.9 kB, 439,904 tokens; validation 8 records, 26.2 kB, 26,213 tokens``."""
    parts = [f"{split} {s.documents:,} records, {_size(s.bytes)}, {s.tokens:,} tokens"
             for split, s in stats.items()]
    return f"{source.name}: " + "; ".join(parts)
