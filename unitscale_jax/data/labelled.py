"""Labelled data for fine-tuning: split discovery, readers, label vocabularies, encoding, batches.

Two kinds of task read labelled files:

- **sentence (pair) classification**: GLUE-style TSV (a header row, ``sentence`` + ``label`` as in
  SST-2, two text columns for pair tasks), CSV or JSONL. ``read_classification`` returns
  ``TextExamples``; ``encode_texts`` turns them into ``ids``/``mask``/``labels`` arrays with
  ``bos text eos`` (``bos a eos b eos`` for pairs).
- **token classification**: CoNLL files (a token per line, whitespace- or tab-separated columns,
  a blank line between sentences, ``-DOCSTART-`` lines skipped) whose tags follow IOB2 (default),
  IOB1 or IOBES. ``read_conll`` returns ``TaggedSentences``; ``encode_tagged`` splits each word
  into subwords and puts its tag on the first one (``where`` marks the scored positions);
  ``tags_from_subwords`` maps per-position predictions back to per-word tags.

``LabelVocab`` numbers the labels of the training split (saved with a run as JSON); a label of
another split that training never saw is a ``DataError``. ``make_batch_iterator`` serves the
encoded arrays as shuffled batches through the same grain pipeline pieces and checkpointable
``DataIterator`` as pretraining.

Every problem with a file is a ``DataError`` (a ``ValueError``) whose message is one line naming
the file (and line), what was found and how to fix it; the command line prints it as it is.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from unitscale_jax import paths
from unitscale_jax.data.pipeline import DataIterator, EpochShuffle
from unitscale_jax.data.tokenizers import Tokenizer, encode_words

__all__ = [
    "DataError", "SPLITS", "find_splits", "FORMATS", "TextExamples", "read_classification",
    "examples_from_records", "TFDS_SPLITS", "TfdsClassification", "read_tfds_classification",
    "LabelVocab", "TAG_SCHEMES", "split_tag", "check_tags",
    "TaggedSentences", "read_conll", "Encoded", "encode_texts", "encode_tagged",
    "tags_from_subwords", "make_batch_iterator",
]

_MAX_SEED = 2**32


class DataError(ValueError):
    """A labelled file (or its options) is wrong; the message is one line: where, what, the fix."""


def _where(path: str | os.PathLike, line: int | None = None) -> str:
    return f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)


# --------------------------------------------------------------------------- splits

SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "dev": ("dev", "validation"),
                                      "test": ("test",)}
"""Split -> the file stems that name it (``train.tsv``, ``dev.conll``, ``validation.jsonl``...)."""


def find_splits(data_dir: str | os.PathLike) -> dict[str, Path]:
    """The split files of a directory: ``train.*``, ``dev.*`` (or ``validation.*``), ``test.*``.

    A file belongs to a split when its name up to the first dot is the split's stem (any case)
    and it has an extension; hidden files and sub-directories are ignored.

    Returns:
      ``{"train": path, "dev": path, "test": path}`` with the splits found (at least one).

    Raises:
      DataError: ``data_dir`` is not a directory, holds no split file, or two files name one split
        (e.g. ``dev.tsv`` and ``validation.tsv``).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; pass a directory holding train.* / dev.* / "
                        "test.* files, or name the files with --train / --dev.")
    stems = {stem: split for split, names in SPLITS.items() for stem in names}
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        stem, dot, ext = path.name.partition(".")
        if path.name.startswith(".") or not path.is_file() or not dot or not ext:
            continue
        if stem.lower() in stems:
            found.setdefault(stems[stem.lower()], []).append(path)
    for split, files in found.items():
        if len(files) > 1:
            raise DataError(f"{root}: {len(files)} files for the {split} split "
                            f"({', '.join(p.name for p in files)}); keep one, or name the files "
                            "with --train / --dev.")
    if not found:
        names = ", ".join(p.name for p in sorted(root.iterdir())[:8]) or "nothing"
        raise DataError(f"{root}: no train.*, dev.*, validation.* or test.* file (found "
                        f"{names}); rename the files or name them with --train / --dev.")
    return {split: found[split][0] for split in SPLITS if split in found}


# --------------------------------------------------------------------------- classification

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
"""File extension -> classification file format."""

_LABEL_NAMES = ("label", "gold_label", "labels", "Quality", "is_duplicate")
_TEXT_LAYOUTS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                 ("#1 String", "#2 String"), ("premise", "hypothesis"), ("sentence",), ("text",))
"""Default text columns, first match wins: the GLUE layouts (MNLI/RTE/MRPC..., QNLI, QQP, MRPC's
original TSV, SNLI-style), then single sentences (SST-2, CoLA with a header, plain ``text``)."""


@dataclasses.dataclass(frozen=True)
class TextExamples:
    """Sentence or sentence-pair examples read from one file.

    Attributes:
      path: the file (for messages).
      texts: per example, its 1 or 2 texts.
      labels: per example, the label as a string (``"1"``, ``"positive"``), or None when the
        file was read without labels.
      lines: per example, the 1-based line where its row starts.
      columns: the column names of the file (``"0"``, ``"1"``... without a header).
      text_columns: the columns the texts came from; ``label_column``: the labels' (or None).
      rows: per example, its fields as read (a list for TSV/CSV, the record for JSONL), so that
        predictions can be written next to the unchanged input.
      header: the header row (TSV/CSV with a header), else None.
      format: ``"tsv"``, ``"csv"``, ``"jsonl"`` or ``"records"``.
    """

    path: str
    texts: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...] | None
    lines: tuple[int, ...]
    columns: tuple[str, ...]
    text_columns: tuple[str, ...]
    label_column: str | None
    rows: tuple[Any, ...]
    header: tuple[str, ...] | None
    format: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


def _read_bytes(path: str | os.PathLike) -> str:
    p = paths.check_kind(path, "file")
    if not p.is_file():
        raise DataError(f"{p}: no such file; check the path.")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (invalid byte at offset {e.start}); convert it to "
                        "UTF-8 first.") from None
    if not text.strip():
        raise DataError(f"{p}: empty file ({len(data)} bytes); pass a file with examples.")
    return text


def _resolve_column(spec: str | int, columns: Sequence[str], has_names: bool, what: str,
                    flag: str, where: str) -> str:
    """A column named by ``spec`` (a name or a 0-based index, also as a string of digits)."""
    if isinstance(spec, str) and has_names and spec in columns:
        return spec
    if isinstance(spec, str) and has_names:
        folded = [c for c in columns if c.lower() == spec.lower()]
        if len(folded) == 1:
            return folded[0]
    index = spec if isinstance(spec, int) else (int(spec) if spec.strip().isdigit() else None)
    if index is not None and 0 <= index < len(columns):
        return columns[index]
    found = ", ".join(repr(c) for c in columns)
    if index is not None:
        raise DataError(f"{where}: no {what} column {index} (0-based): the file has "
                        f"{len(columns)} column(s) ({found}); pass {flag} NAME or an index "
                        f"below {len(columns)}.")
    hint = (f"pass {flag} NAME|INDEX" if has_names else
            f"the file has no header row, so pass {flag} as a 0-based index")
    raise DataError(f"{where}: no {what} column {spec!r} (columns found: {found}); {hint}.")


def _default_columns(columns: Sequence[str], has_names: bool, text_columns, label_column,
                     with_labels: bool, where: str):
    found = ", ".join(repr(c) for c in columns)
    if text_columns is None:
        if has_names:
            layout = next((t for t in _TEXT_LAYOUTS if all(c in columns for c in t)), None)
            if layout is None:
                raise DataError(f"{where}: cannot tell the text column(s) (columns found: "
                                f"{found}); pass --text-column NAME|INDEX (twice for pairs).")
            text_columns = layout
        elif len(columns) in (1, 2):
            text_columns = (columns[0],)
        else:
            raise DataError(f"{where}: cannot tell the text column(s) of a file without a header "
                            f"and {len(columns)} columns; pass --text-column INDEX (twice for "
                            "pairs) and --label-column INDEX.")
    if label_column is None and with_labels:
        if has_names:
            label_column = next((c for c in _LABEL_NAMES if c in columns), None)
            if label_column is None:
                raise DataError(f"{where}: no label column (columns found: {found}); pass "
                                "--label-column NAME|INDEX.")
        elif len(columns) == 2:
            label_column = columns[1]
        else:
            raise DataError(f"{where}: cannot tell the label column of a file without a header "
                            f"and {len(columns)} columns; pass --label-column INDEX.")
    return text_columns, label_column


def _label_string(value: Any, where: str, column: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise DataError(f"{where}: label {value!r} in column {column!r} is not a class name or "
                        "an integer; use integer or string labels.")
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{where}: label {value!r} in column {column!r} is not an integer "
                            "class; classification needs integer or string labels.")
        value = int(value)
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: empty label in column {column!r}; give every example a "
                        "label (or read the file without labels for prediction).")
    return text


def examples_from_records(records: Iterable[Mapping[str, Any] | Sequence[Any]], *,
                          name: str, columns: Sequence[str] | None = None,
                          lines: Sequence[int] | None = None,
                          text_columns: Sequence[str | int] | None = None,
                          label_column: str | int | None = None, with_labels: bool = True,
                          has_names: bool = True, header: Sequence[str] | None = None,
                          format: str = "records") -> TextExamples:
    """Classification examples from records: mappings (JSONL, tfds) or rows of fields (TSV/CSV).

    Args:
      records: the rows; a mapping is looked up by column name, a sequence by position.
      name: the file or dataset, for messages.
      columns: the column names (default: the keys of the first mapping).
      lines: per record, its line number for messages (default: 1, 2, ...).
      text_columns: 1 or 2 columns (names or 0-based indices); default: a GLUE layout.
      label_column: a name or 0-based index; default: ``label`` (or another GLUE name).
      with_labels: False to read texts only (prediction input); a label column is then used
        when named, and ignored otherwise.
      has_names: whether ``columns`` are real names (False for a file without a header).
      header: stored on the result.
      format: stored on the result.

    Raises:
      DataError: no records, a missing column (the message lists the columns found), a row
        with too few fields, or an empty label.
    """
    records = list(records)
    if not records:
        raise DataError(f"{name}: no examples (the file is empty or holds only a header); "
                        "pass a file with examples.")
    lines = list(lines) if lines is not None else list(range(1, len(records) + 1))
    if columns is None:
        first = records[0]
        columns = list(first) if isinstance(first, Mapping) else [str(i) for i in
                                                                   range(len(first))]
    columns = [str(c) for c in columns]
    if text_columns is not None:
        text_columns = list(text_columns)
        if not 1 <= len(text_columns) <= 2:
            raise DataError(f"{name}: {len(text_columns)} text columns given; give one "
                            "(sentences) or two (sentence pairs).")
    where = name
    tcols, lcol = _default_columns(columns, has_names, text_columns, label_column, with_labels,
                                   where)
    tcols = tuple(_resolve_column(c, columns, has_names, "text", "--text-column", where)
                  for c in tcols)
    lcol = (None if lcol is None else
            _resolve_column(lcol, columns, has_names, "label", "--label-column", where))
    if lcol is not None and lcol in tcols:
        raise DataError(f"{where}: column {lcol!r} is both a text and the label column; pass "
                        "--text-column and --label-column with different columns.")
    position = {c: i for i, c in enumerate(columns)}
    texts, labels = [], []
    for record, line in zip(records, lines):
        def field(column: str, record=record, line=line):
            if isinstance(record, Mapping):
                if column not in record:
                    keys = ", ".join(repr(k) for k in record)
                    raise DataError(f"{_where(name, line)}: no column {column!r} in this record "
                                    f"(columns found: {keys}); every record needs the same "
                                    "columns.")
                return record[column]
            i = position[column]
            if i >= len(record):
                raise DataError(f"{_where(name, line)}: {len(record)} field(s), expected "
                                f"{len(columns)} (columns: {', '.join(columns)}); check the "
                                "delimiter and quoting of this line.")
            return record[i]

        row_texts = []
        for c in tcols:
            value = field(c)
            if not isinstance(value, str):
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                else:
                    raise DataError(f"{_where(name, line)}: the text in column {c!r} is "
                                    f"{type(value).__name__} {value!r}, not a string.")
            row_texts.append(value)
        texts.append(tuple(row_texts))
        if lcol is not None:
            labels.append(_label_string(field(lcol), _where(name, line), lcol))
    return TextExamples(path=str(name), texts=tuple(texts),
                        labels=tuple(labels) if lcol is not None else None, lines=tuple(lines),
                        columns=tuple(columns), text_columns=tcols, label_column=lcol,
                        rows=tuple(records), header=tuple(header) if header else None,
                        format=format)


def read_classification(path: str | os.PathLike, *,
                        text_columns: Sequence[str | int] | None = None,
                        label_column: str | int | None = None, no_header: bool = False,
                        with_labels: bool = True, format: str | None = None) -> TextExamples:
    """Reads a sentence(-pair) classification file: TSV, CSV or JSONL.

    TSV is read as GLUE writes it (tab-separated, no quoting); CSV with the ``csv`` module's
    default dialect (quoted fields may hold commas and line breaks); JSONL has one JSON object
    per line (blank lines skipped).

    Args:
      path: the file.
      text_columns: 1 or 2 columns, each a name or a 0-based index; default: the first GLUE
        layout present (``sentence1``/``sentence2``, ``question``/``sentence``,
        ``question1``/``question2``, ``premise``/``hypothesis``, ``sentence``, ``text``), or
        column 0 of a file without a header.
      label_column: a name or 0-based index; default ``label`` (or ``gold_label``, ...), or
        column 1 of a two-column file without a header.
      no_header: the TSV/CSV file has no header row (columns are then indices only).
      with_labels: False for prediction input: texts only, labels None.
      format: ``"tsv"``, ``"csv"`` or ``"jsonl"``; default: from the extension.

    Raises:
      DataError: a missing, empty or non-UTF-8 file, an unknown format, a missing column (the
        message lists the columns found), a malformed line (file:line).
    """
    name = os.fspath(path)
    paths.check_kind(name, "file", fix="pass a .tsv, .csv or .jsonl file")
    fmt = format or FORMATS.get(Path(name).suffix.lower())
    if fmt not in ("tsv", "csv", "jsonl"):
        raise DataError(f"{name}: cannot tell the format from the extension "
                        f"{Path(name).suffix!r}; name the file .tsv, .csv or .jsonl.")
    text = _read_bytes(name)
    common = dict(text_columns=text_columns, label_column=label_column, with_labels=with_labels)
    if fmt == "jsonl":
        records, lines = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{i}: not valid JSON ({e.msg} at column {e.colno}); "
                                "JSONL needs one JSON object per line.") from None
            if not isinstance(record, dict):
                raise DataError(f"{name}:{i}: a JSON {type(record).__name__}, not an object; "
                                "JSONL needs one JSON object per line.")
            records.append(record)
            lines.append(i)
        return examples_from_records(records, name=name, lines=lines, format="jsonl", **common)
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                            quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines, start = [], [], 1
    try:
        for row in reader:
            if row and any(f.strip() for f in row):
                rows.append(row)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: {e}; check the quoting of this line.") from None
    header = None
    if not no_header:
        if not rows:
            raise DataError(f"{name}: empty file; pass a file with examples.")
        header = [h.strip() for h in rows[0]]
        rows, lines = rows[1:], lines[1:]
        if not rows:
            raise DataError(f"{name}: only a header row ({', '.join(header)}), no examples; "
                            "pass a file with examples (or --no-header if that row is one).")
        columns = header
    else:
        columns = [str(i) for i in range(max(len(r) for r in rows))]
    return examples_from_records(rows, name=name, columns=columns, lines=lines,
                                 has_names=not no_header, header=header, format=fmt, **common)


TFDS_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",),
                                           "dev": ("validation", "dev", "valid"),
                                           "test": ("test",)}
"""Split -> the tfds split names that give it, first present wins."""


@dataclasses.dataclass(frozen=True)
class TfdsClassification:
    """A tfds dataset read for sentence(-pair) classification.

    Attributes:
      name: ``tfds:NAME``.
      splits: ``"train"`` / ``"dev"`` / ``"test"`` -> its examples (``path`` is
        ``tfds:NAME[split]``); a split without labels (GLUE's test splits, all ``-1``) is left
        out and named in ``unlabelled``.
      vocab: the label feature's ``ClassLabel`` names in id order, or None for an integer
        label feature (then number the training labels with ``LabelVocab.from_labels``).
      unlabelled: the tfds splits left out because they carry no labels.
    """

    name: str
    splits: dict[str, TextExamples]
    vocab: LabelVocab | None
    unlabelled: tuple[str, ...] = ()


def _tfds_value(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read_tfds_classification(name: str, *, data_dir: str | None = None,
                             text_columns: Sequence[str | int] | None = None,
                             label_column: str | int | None = None, download: bool = True,
                             quiet: bool = True) -> TfdsClassification:
    """Reads a tfds dataset (``glue/sst2``, any registered builder) for classification.

    The splits map to ``train``, ``dev`` (``validation``, ``dev`` or ``valid``) and ``test``
    (``TFDS_SPLITS``); the texts are the ``Text`` features (the GLUE layout when there are
    several, as for files) and the label is the ``ClassLabel`` feature (or an integer one),
    read through ``examples_from_records`` as a file's rows are. A ``ClassLabel``'s names
    become the label strings and the vocabulary; ``-1`` means unlabelled.

    Args:
      name: the dataset, without the ``tfds:`` prefix (``dataset/config:version``).
      data_dir: tfds' data directory (default: tfds' own).
      text_columns: 1 or 2 text features (names or indices among the features); default: the
        only ``Text`` feature, or a GLUE layout.
      label_column: the label feature; default: the only ``ClassLabel`` feature (or one named
        ``label``...).
      download: allow ``download_and_prepare``.
      quiet: hide tfds' logs.

    Raises:
      DataError: an unknown dataset, no train or dev split, no text or label feature (the
        message lists the features), unlabelled train/dev examples, a failed download.
    """
    import tensorflow_datasets as tfds

    from unitscale_jax.data.sources import prepare_tfds, tfds_builder
    where = f"tfds:{name}"
    try:
        builder = tfds_builder(name, data_dir=data_dir)
        features = dict(builder.info.features.items())
        kinds = {k: type(f).__name__ for k, f in features.items()}
        found = ", ".join(f"{k!r} ({kinds[k]})" for k in features)
        texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
        classes = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
        if text_columns is None:
            layout = next((t for t in _TEXT_LAYOUTS if all(c in texts for c in t)), None)
            if layout is None and len(texts) != 1:
                raise DataError(f"{where}: cannot tell the text feature(s) ({len(texts)} Text "
                                f"features; features: {found}); pass --text-column NAME (twice "
                                "for pairs).")
            text_columns = layout or tuple(texts)
        if label_column is None:
            named = [c for c in _LABEL_NAMES if c in features]
            if len(classes) == 1:
                label_column = classes[0]
            elif named:
                label_column = named[0]
            else:
                raise DataError(f"{where}: no label feature (a ClassLabel, or one named "
                                f"'label'; features: {found}); pass --label-column NAME, or use "
                                "a dataset with labels.")
        columns = list(features)
        label_name = _resolve_column(label_column, columns, True, "label", "--label-column",
                                     where)
        label_feature = features[label_name]
        if isinstance(label_feature, tfds.features.ClassLabel):
            names = tuple(label_feature.names)
        elif np.issubdtype(np.dtype(getattr(label_feature, "np_dtype", object)), np.integer) \
                and getattr(label_feature, "shape", None) == ():
            names = None
        else:
            raise DataError(f"{where}: feature {label_name!r} ({kinds[label_name]}) is not a "
                            f"class label (features: {found}); pass --label-column with a "
                            "ClassLabel or integer feature.")
        available = prepare_tfds(builder, name, download=download, quiet=quiet)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(str(e)) from None
    chosen = {split: next((t for t in options if t in available), None)
              for split, options in TFDS_SPLITS.items()}
    for split in ("train", "dev"):
        if chosen[split] is None:
            raise DataError(f"{where}: no {' / '.join(TFDS_SPLITS[split])} split (it has "
                            f"{', '.join(available)}); use a dataset with {split} and "
                            "validation splits, or pass files with --train / --dev.")
    out: dict[str, TextExamples] = {}
    unlabelled = []
    for split, tfds_split in chosen.items():
        if tfds_split is None:
            continue
        source = builder.as_data_source(split=tfds_split)
        records = [{k: _tfds_value(v) for k, v in source[i].items()}
                   for i in range(len(source))]
        split_name = f"{where}[{tfds_split}]"
        missing = [i for i, r in enumerate(records) if r.get(label_name) == -1]
        if records and len(missing) == len(records) and split == "test":
            unlabelled.append(tfds_split)
            continue
        if missing:
            raise DataError(f"{split_name}:{missing[0] + 1}: {len(missing)} example(s) without "
                            f"a label (-1 in {label_name!r}); fine-tuning needs labelled train "
                            "and dev splits.")
        if names is not None:
            for r in records:
                r[label_name] = names[int(r[label_name])]
        out[split] = examples_from_records(records, name=split_name, columns=columns,
                                           text_columns=text_columns, label_column=label_name,
                                           format="tfds")
    vocab = LabelVocab(names) if names is not None else None
    return TfdsClassification(where, out, vocab, tuple(unlabelled))


# --------------------------------------------------------------------------- label vocabulary


@dataclasses.dataclass(frozen=True)
class LabelVocab:
    """The labels of the training split, numbered ``0..n-1``.

    ``from_labels`` sorts integer labels numerically (so SST-2's ``0``/``1`` keep their
    numbers) and other labels as strings; ``for_tags`` lists a tag scheme's tags for the
    entity types seen in training (``O`` first). Save it with ``to_json``, load it with
    ``from_json``.

    Attributes:
      labels: the label strings in id order.
      scheme: the tag scheme for token classification, else None.
    """

    labels: tuple[str, ...]
    scheme: str | None = None

    def __post_init__(self):
        if len(set(self.labels)) != len(self.labels) or not self.labels:
            raise ValueError(f"a label vocabulary needs distinct labels, got {self.labels!r}.")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> LabelVocab:
        distinct = set(labels)
        try:
            ordered = sorted(distinct, key=int)
        except ValueError:
            ordered = sorted(distinct)
        return cls(tuple(ordered))

    @classmethod
    def for_tags(cls, tags: Iterable[str], scheme: str = "iob2") -> LabelVocab:
        """Every tag of ``scheme`` for the entity types among ``tags``: ``O``, then per type
        (sorted) its ``B-``/``I-`` (and ``E-``/``S-`` for IOBES) tags, so that any well-formed
        sequence over the types seen in training has ids."""
        prefixes = _scheme_prefixes(scheme)
        types = sorted({split_tag(t)[1] for t in tags} - {None})
        return cls(("O",) + tuple(f"{p}-{t}" for t in types for p in prefixes), scheme)

    def encode(self, labels: Sequence[str], *, name: str = "",
               lines: Sequence[int] | None = None) -> np.ndarray:
        """The ids of ``labels`` (int32).

        Raises:
          DataError: a label the training split does not have (names ``name:line``).
        """
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.empty(len(labels), np.int32)
        for i, label in enumerate(labels):
            if label not in index:
                where = _where(name, lines[i] if lines is not None else None)
                shown = ", ".join(self.labels[:12]) + (", ..." if len(self.labels) > 12 else "")
                what = "tag" if self.scheme else "label"
                raise DataError(f"{where}: {what} {label!r} never occurs in the training split "
                                f"(its {what}s: {shown}); fix the {what} or add examples of it to "
                                "the training data.")
            out[i] = index[label]
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return [self.labels[int(i)] for i in np.asarray(ids).reshape(-1)]

    def to_json(self) -> str:
        return json.dumps({"labels": list(self.labels), "scheme": self.scheme})

    @classmethod
    def from_json(cls, text: str) -> LabelVocab:
        """Raises ValueError: not a saved label vocabulary."""
        try:
            data = json.loads(text)
            return cls(tuple(str(x) for x in data["labels"]), data.get("scheme"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"not a saved label vocabulary ({e}).") from None


# --------------------------------------------------------------------------- CoNLL tagging

TAG_SCHEMES = {"iob2": ("B", "I"), "iob1": ("B", "I"), "iobes": ("B", "I", "E", "S")}
"""Tag scheme -> its entity prefixes (besides the ``O`` tag)."""


def _scheme_prefixes(scheme: str) -> tuple[str, ...]:
    if scheme not in TAG_SCHEMES:
        raise DataError(f"unknown tag scheme {scheme!r}; use one of {', '.join(TAG_SCHEMES)}.")
    return TAG_SCHEMES[scheme]


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", None)``; else ``("", None)``."""
    if tag == "O":
        return "O", None
    prefix, dash, kind = tag.partition("-")
    if len(prefix) == 1 and dash and kind:
        return prefix, kind
    return "", None


def check_tags(tags: Sequence[str], scheme: str = "iob2") -> tuple[int, str] | None:
    """The first problem of one sentence's tags under ``scheme``, as ``(index, message)``.

    Every scheme: each tag is ``O`` or ``P-TYPE`` with ``P`` among the scheme's prefixes.
    IOB2: ``I-X`` continues a ``B-X`` or ``I-X``. IOBES: ``I-X``/``E-X`` continue a
    ``B-X``/``I-X``, and an entity opened with ``B-X`` is closed by ``E-X``. IOB1 (any ``I-X``
    may open an entity; ``B-X`` separates two adjacent ones) checks the tags only.

    Returns:
      None when the tags are well-formed.
    """
    prefixes = _scheme_prefixes(scheme)
    names = {"iob2": "O, B-TYPE, I-TYPE", "iob1": "O, I-TYPE, B-TYPE",
             "iobes": "O, B-TYPE, I-TYPE, E-TYPE, S-TYPE"}[scheme]
    prev_prefix, prev_type = "O", None
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        previous = repr(tags[i - 1]) if i else "none: the sentence starts here"
        if prefix != "O" and prefix not in prefixes:
            hint = " (is the file IOBES? pass --tag-scheme iobes)" if prefix in ("E", "S") else ""
            return i, f"tag {tag!r} is not in the {scheme.upper()} scheme ({names}){hint}"
        inside = prev_prefix in ("B", "I")
        continues = inside and prev_type == kind
        if scheme == "iob2" and prefix == "I" and not continues:
            return i, (f"tag {tag!r} continues no entity (previous tag {previous}); in IOB2 an "
                       f"entity starts with B-{kind} (for IOB1 files pass --tag-scheme iob1)")
        if scheme == "iobes" and prefix in ("I", "E") and not continues:
            return i, (f"tag {tag!r} continues no entity (previous tag {previous}); in IOBES an "
                       f"entity starts with B-{kind} or is a single S-{kind}")
        if scheme == "iobes" and inside and prefix not in ("I", "E"):
            return i, (f"tag {tag!r} follows the unfinished entity {tags[i - 1]!r}; in IOBES an "
                       f"entity ends with E-{prev_type}")
        prev_prefix, prev_type = prefix, kind
    if scheme == "iobes" and prev_prefix in ("B", "I"):
        return len(tags) - 1, (f"the sentence ends inside the entity {tags[-1]!r}; in IOBES an "
                               f"entity ends with E-{prev_type}")
    return None


@dataclasses.dataclass(frozen=True)
class TaggedSentences:
    """Sentences of a CoNLL file.

    Attributes:
      path: the file.
      words: per sentence, its tokens.
      tags: per sentence, its tags (None when read without tags).
      lines: per sentence, the 1-based line number of each token (for messages, and to write
        predictions next to the input lines).
      scheme: the tag scheme the tags were checked against.
      n_columns: columns per token line.
    """

    path: str
    words: tuple[tuple[str, ...], ...]
    tags: tuple[tuple[str, ...], ...] | None
    lines: tuple[tuple[int, ...], ...]
    scheme: str
    n_columns: int

    def __len__(self) -> int:
        return len(self.words)

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.words)


def read_conll(path: str | os.PathLike, *, scheme: str = "iob2", tag_column: int | None = None,
               token_column: int = 0, with_tags: bool = True) -> TaggedSentences:
    """Reads a CoNLL token-classification file.

    One token per line; columns separated by tabs when the first token line has a tab, else by
    whitespace; the token is column ``token_column`` (default the first) and the tag column
    ``tag_column`` (default the last); a blank (or whitespace-only) line ends a sentence;
    ``-DOCSTART-`` lines are skipped (they end a sentence too).

    Args:
      path: the file.
      scheme: ``iob2`` (default), ``iob1`` or ``iobes``; every sentence's tags are checked
        (``check_tags``).
      tag_column: the tags' 0-based column index (negative counts from the end).
      token_column: the tokens' 0-based column index (negative counts from the end).
      with_tags: False for prediction input: tokens only (a single column is then allowed).

    Raises:
      DataError: a missing, empty or non-UTF-8 file; a line with another number of columns than
        the first token line, a tag outside the scheme or an I- tag continuing nothing (each
        naming file:line).
    """
    _scheme_prefixes(scheme)
    name = os.fspath(path)
    text = _read_bytes(name)
    words: list[tuple[str, ...]] = []
    tags: list[tuple[str, ...]] = []
    lines: list[tuple[int, ...]] = []
    cur_w: list[str] = []
    cur_t: list[str] = []
    cur_l: list[int] = []
    n_columns = delimiter = first_line = None

    def close():
        if cur_w:
            if with_tags:
                problem = check_tags(cur_t, scheme)
                if problem is not None:
                    i, message = problem
                    raise DataError(f"{name}:{cur_l[i]}: {message}.")
            words.append(tuple(cur_w))
            tags.append(tuple(cur_t))
            lines.append(tuple(cur_l))
            cur_w.clear(), cur_t.clear(), cur_l.clear()

    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            close()
            continue
        if n_columns is None:
            delimiter = "\t" if "\t" in raw else None
        fields = [f.strip() for f in raw.split(delimiter)] if delimiter else raw.split()
        if fields[0] == "-DOCSTART-":
            close()
            continue
        if n_columns is None:
            n_columns, first_line = len(fields), number
            if with_tags and n_columns < 2:
                raise DataError(f"{name}:{number}: one column ({fields[0]!r}) and no tag; a "
                                "CoNLL line is 'TOKEN TAG' (tab- or space-separated).")
            for label, col in (("token", token_column), ("tag", tag_column)):
                if col is not None and not -n_columns <= col < n_columns:
                    raise DataError(f"{name}:{number}: no {label} column {col} (0-based) in a "
                                    f"line of {n_columns} columns; pass --{label}-column "
                                    f"below {n_columns}.")
        if len(fields) != n_columns:
            sep = "tab" if delimiter else "whitespace"
            raise DataError(f"{name}:{number}: {len(fields)} column(s) ({sep}-separated), "
                            f"expected {n_columns} as on line {first_line}; fix this line (a "
                            "token with a space in a whitespace-separated file?).")
        cur_w.append(fields[token_column])
        cur_t.append(fields[-1 if tag_column is None else tag_column] if with_tags else "O")
        cur_l.append(number)
    close()
    if not words:
        raise DataError(f"{name}: no tokens (only blank or -DOCSTART- lines); pass a CoNLL "
                        "file with 'TOKEN TAG' lines.")
    return TaggedSentences(path=name, words=tuple(words), tags=tuple(tags) if with_tags else None,
                           lines=tuple(lines), scheme=scheme, n_columns=n_columns)


# --------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Model inputs of one split.

    Attributes:
      arrays: ``ids`` int32 ``[n, seq_len]``, ``mask`` bool ``[n, seq_len]`` (real tokens), and
        ``labels`` int32 ``[n]`` (classification) or ``labels`` int32 + ``where`` bool
        ``[n, seq_len]`` (tagging: the first subword of each word) plus ``word_index`` int32
        ``[n, seq_len]`` (the word each scored position starts, -1 elsewhere).
      truncated: examples cut to fit ``seq_len``.
      n_words: tagging only: words per sentence (int32 ``[n]``), to map predictions back.
    """

    arrays: dict[str, np.ndarray]
    truncated: int
    n_words: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.arrays["ids"].shape[0])


def _too_long(name: str, count: int, first_line: int, first_len: int, seq_len: int,
              what: str) -> DataError:
    return DataError(f"{_where(name, first_line)}: {count} {what} longer than --seq-len "
                     f"{seq_len} (this one has {first_len} tokens with its special tokens); "
                     "raise --seq-len or allow truncation (drop --no-truncate).")


def encode_texts(examples: TextExamples, tokenizer: Tokenizer, seq_len: int, *,
                 vocab: LabelVocab | None = None, truncate: bool = True) -> Encoded:
    """Token ids of sentence(-pair) examples: ``bos a eos`` or ``bos a eos b eos``, padded.

    A pair longer than ``seq_len`` loses tokens from the end of its longer text first (BERT's
    "longest first"); a single text loses its end.

    Args:
      examples: from ``read_classification``.
      tokenizer: any ``Tokenizer``.
      seq_len: row length.
      vocab: the training labels; with labelled examples, ``labels`` holds their ids.
      truncate: False: an example that does not fit is an error.

    Raises:
      DataError: (``truncate=False``) examples longer than ``seq_len`` (how many, and the first
        one's line); a label not in ``vocab``; ``seq_len`` too small for the special tokens.
    """
    n_special = 3 if examples.is_pair else 2
    if seq_len < n_special + 1:
        raise DataError(f"--seq-len {seq_len} leaves no room for text after {n_special} special "
                        "tokens; use a larger --seq-len.")
    n = len(examples)
    ids = np.full((n, seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, seq_len), bool)
    bos = np.asarray([tokenizer.bos_id], np.int32)
    eos = np.asarray([tokenizer.eos_id], np.int32)
    room = seq_len - n_special
    truncated, first = 0, None
    for i, texts in enumerate(examples.texts):
        parts = [tokenizer.encode(t) for t in texts]
        total = sum(len(p) for p in parts)
        if total > room:
            truncated += 1
            first = first or (examples.lines[i], total + n_special)
            if len(parts) == 1:
                parts = [parts[0][:room]]
            else:
                a, b = len(parts[0]), len(parts[1])
                while a + b > room:
                    a, b = (a - 1, b) if a >= b else (a, b - 1)
                parts = [parts[0][:a], parts[1][:b]]
        row = np.concatenate([bos, parts[0], eos] + ([parts[1], eos] if len(parts) == 2 else []))
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    if truncated and not truncate:
        raise _too_long(examples.path, truncated, first[0], first[1], seq_len, "example(s)")
    arrays = {"ids": ids, "mask": mask}
    if vocab is not None and examples.labels is not None:
        arrays["labels"] = vocab.encode(examples.labels, name=examples.path,
                                        lines=examples.lines)
    return Encoded(arrays, truncated)


def encode_tagged(sentences: TaggedSentences, tokenizer: Tokenizer, seq_len: int, *,
                  vocab: LabelVocab | None = None, truncate: bool = True) -> Encoded:
    """Subword ids of tagged sentences: ``bos w1_1 w1_2 w2_1 ... eos``, padded.

    Each word is split into subwords (``tokenizers.encode_words``); its tag id sits on its
    first subword, where ``where`` is True; the other subwords, the specials and the padding
    are masked out of the loss. A sentence longer than ``seq_len`` keeps the words whose first
    subword fits (a word cut in the middle keeps its label); ``tags_from_subwords`` gives the
    dropped words ``O``.

    Raises:
      DataError: (``truncate=False``) sentences longer than ``seq_len``; a tag not in
        ``vocab``; ``seq_len`` below 3.
    """
    if seq_len < 3:
        raise DataError(f"--seq-len {seq_len} leaves no room for a word after the 2 special "
                        "tokens; use a larger --seq-len.")
    n = len(sentences)
    ids = np.full((n, seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, seq_len), bool)
    labels = np.zeros((n, seq_len), np.int32)
    where = np.zeros((n, seq_len), bool)
    word_index = np.full((n, seq_len), -1, np.int32)
    n_words = np.asarray([len(w) for w in sentences.words], np.int32)
    room = seq_len - 2
    truncated, first = 0, None
    for i, words in enumerate(sentences.words):
        pieces = encode_words(tokenizer, words)
        lengths = np.asarray([len(p) for p in pieces])
        starts = 1 + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        row = np.concatenate(pieces)
        if len(row) > room:
            truncated += 1
            first = first or (sentences.lines[i][0], len(row) + 2)
            row = row[:room]
        keep = starts < 1 + len(row)
        ids[i, 0] = tokenizer.bos_id
        ids[i, 1:1 + len(row)] = row
        ids[i, 1 + len(row)] = tokenizer.eos_id
        mask[i, :len(row) + 2] = True
        where[i, starts[keep]] = True
        word_index[i, starts[keep]] = np.arange(len(words))[keep]
        if vocab is not None and sentences.tags is not None:
            tag_ids = vocab.encode(sentences.tags[i], name=sentences.path,
                                   lines=sentences.lines[i])
            labels[i, starts[keep]] = tag_ids[keep]
    if truncated and not truncate:
        raise _too_long(sentences.path, truncated, first[0], first[1], seq_len, "sentence(s)")
    arrays = {"ids": ids, "mask": mask, "labels": labels, "where": where,
              "word_index": word_index}
    return Encoded(arrays, truncated, n_words)


def tags_from_subwords(pred_ids: np.ndarray, word_index: np.ndarray, n_words: Sequence[int],
                       vocab: LabelVocab, *, fill: str = "O") -> list[list[str]]:
    """Per-word tags from per-position predictions: each word takes the prediction at its first
    subword; words cut off by truncation get ``fill``.

    Args:
      pred_ids: int ``[n, seq_len]`` predicted tag ids (e.g. ``argmax`` of the token logits).
      word_index: ``Encoded.arrays["word_index"]`` of the same rows.
      n_words: words per sentence (``Encoded.n_words``).
      vocab: the tag vocabulary.
    """
    pred_ids, word_index = np.asarray(pred_ids), np.asarray(word_index)
    out = []
    for row, index, count in zip(pred_ids, word_index, n_words):
        tags = [fill] * int(count)
        at = index >= 0
        for w, p in zip(index[at], row[at]):
            tags[int(w)] = vocab.labels[int(p)]
        out.append(tags)
    return out


# --------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class _Take:
    """A batch of row indices -> the rows of every array plus ``valid``; a final partial batch
    is filled up to ``batch_size`` with rows of ``pad_values`` (``valid`` False), so every batch
    has one shape."""

    arrays: Mapping[str, np.ndarray]
    batch_size: int
    pad_values: Mapping[str, Any]

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        index = np.asarray(index, np.int64).reshape(-1)
        missing = self.batch_size - len(index)
        out = {}
        for k, v in self.arrays.items():
            rows = v[index]
            if missing > 0:
                fill = np.full((missing,) + v.shape[1:], self.pad_values.get(k, 0), v.dtype)
                rows = np.concatenate([rows, fill])
            out[k] = rows
        out["valid"] = np.arange(self.batch_size) < len(index)
        return out


def make_batch_iterator(arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int = 0,
                        shuffle: bool = True, num_epochs: int | None = None,
                        drop_remainder: bool | None = None, tokenizer: Tokenizer,
                        name: str = "", split: str = "train", task: str = "labelled",
                        num_threads: int = 1) -> DataIterator:
    """Batches of encoded examples (``Encoded.arrays``) as a checkpointable ``DataIterator``.

    Every epoch visits the rows in a fresh permutation (``EpochShuffle``: ``default_rng([seed,
    epoch])``) when ``shuffle``; grain batches the row indices and each batch gathers its rows
    of every array, plus ``valid`` (bool ``[batch]``). ``get_state``/``set_state`` resume
    exactly, as for pretraining.

    Args:
      arrays: equal-length arrays (first axis = examples).
      batch_size: rows per batch.
      seed: the shuffle seed (0 <= seed < 2**32).
      shuffle: visit rows in a random order.
      num_epochs: passes over the data; None repeats forever.
      drop_remainder: drop a final partial batch; default True when repeating forever. When
        False the final batch is filled with padding rows (``ids`` = pad id, other arrays 0 /
        False, ``valid`` False).
      tokenizer: gives the pad id (and is recorded in the state's config).
      name: recorded in the state's config (a state saved for other data is then refused by
        ``set_state``).
      split: recorded in the state's config, as ``name``.
      task: recorded in the state's config, as ``name``.
      num_threads: grain read threads.

    Raises:
      ValueError: no rows, arrays of different lengths, or bad sizes.
    """
    lengths = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
    if not lengths or len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ValueError("make_batch_iterator needs equal-length, non-empty arrays; got "
                         f"{lengths}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    n = next(iter(lengths.values()))
    drop_remainder = (num_epochs is None) if drop_remainder is None else drop_remainder
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = EpochShuffle(ds, seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)  # batches of row indices
    ds = ds.map(_Take(arrays, batch_size, {"ids": tokenizer.pad_id, "word_index": -1}))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
    seq_len = int(arrays["ids"].shape[1]) if "ids" in arrays and arrays["ids"].ndim == 2 else 0
    config = dict(source=name, split=split, task=task, seq_len=seq_len, batch_size=batch_size,
                  seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  drop_remainder=drop_remainder, tokenizer=repr(tokenizer),
                  vocab_size=tokenizer.vocab_size, records=n)
    return DataIterator(it, task=task, split=split, seq_len=seq_len, batch_size=batch_size,
                        tokenizer=tokenizer, config=config)
