"""Raw text: local files and globs, the built-in corpus, chunking and the train/validation split.

A *document* is a file (or a built-in topic). Documents are cut into *chunks* of at most
``chunk_chars`` characters, at the last line break of the window when there is one in its second
half. Chunks are the unit of shuffling and of the split: over all chunks in order (files sorted
by path), ``n_val = max(1, round(n * validation_fraction))`` evenly spaced chunks go to
``validation``, the rest to ``train``. So one large file (e.g. a novel) still gets a held-out
part, the split is reproducible and does not depend on hashing, and the two splits share no text.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import string
from typing import AbstractSet, Iterable, Iterator, Sequence

__all__ = ["word_set", "known_words", "expand_paths", "read_text_file", "builtin_documents",
           "chunk_text", "effective_chunk_chars", "split_chunks", "iter_chunks", "fingerprint",
           "BUILTIN_NAME"]

BUILTIN_NAME = "pydoc_data.topics"
MIN_CHUNK_CHARS = 256


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Expands files and globs (``**`` allowed) into a sorted list of distinct absolute paths.

    Raises:
      FileNotFoundError: a path that does not exist, or a glob that matches no file.
      ValueError: a directory (name its files or a glob instead), or no path at all.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("no data path given; pass a text file or a glob such as 'data/*.txt'.")
    out: list[str] = []
    for p in map(os.fspath, paths):
        p = os.path.expanduser(p)
        if any(c in p for c in "*?["):  # a glob pattern
            files = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not files:
                raise FileNotFoundError(f"the glob {p!r} matches no file.")
            out.extend(files)
        elif os.path.isdir(p):
            raise ValueError(f"{p} is a directory; pass its files or a glob such as "
                             f"'{os.path.join(p, '*.txt')}'.")
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p}")
        else:
            out.append(p)
    return sorted(set(os.path.abspath(p) for p in out))


def read_text_file(path: str) -> str:
    """Reads a UTF-8 text file (a leading BOM is dropped).

    Raises:
      ValueError: the file is empty or is not UTF-8 text.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"data file {path} is empty ({len(data)} bytes); pass a file with text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text (invalid byte at offset {e.start}); "
                         "convert it to UTF-8 first.") from None


def builtin_documents() -> list[tuple[str, str]]:
    """The built-in corpus: ``(topic, text)`` for each entry of ``pydoc_data.topics.topics``.

    The English help texts of the language reference that CPython ships for ``help()``
    (about 0.5 MB in 79 topics on Python 3.11); no download is needed.

    Raises:
      RuntimeError: this Python build does not include ``pydoc_data`` (some distributions strip
        it); the message says how to pass a corpus instead.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = None
    if not topics:
        raise RuntimeError("the built-in corpus needs the standard library module "
                           "pydoc_data.topics, which this Python build lacks; pass a text corpus "
                           "with --data PATH (a file or a glob such as 'texts/*.txt').")
    return [(name, topics[name]) for name in sorted(topics) if topics[name].strip()]


def fingerprint(parts: Sequence[object]) -> str:
    """A short stable hex digest of ``parts`` (used to name dataset configs)."""
    return hashlib.sha256(repr(tuple(parts)).encode()).hexdigest()[:12]


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cuts ``text`` into pieces of at most ``chunk_chars`` characters, preferably at line breaks.

    A window is cut after its last ``\\n`` if that lies in the window's second half, else at
    ``chunk_chars``. Concatenating the pieces gives back ``text``, except that whitespace-only
    pieces are dropped.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}.")
    pieces, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + chunk_chars // 2, end)
            end = cut + 1 if cut >= 0 else end
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p.strip()]


def effective_chunk_chars(total_chars: int, chunk_chars: int, validation_fraction: float) -> int:
    """Shrinks ``chunk_chars`` for small corpora so the split has about 2/fraction chunks or more.

    Never below ``MIN_CHUNK_CHARS``; unchanged when ``validation_fraction`` is 0.
    """
    if validation_fraction <= 0:
        return chunk_chars
    want = math.ceil(2 / validation_fraction)
    return max(MIN_CHUNK_CHARS, min(chunk_chars, math.ceil(total_chars / want)))


def split_chunks(n_chunks: int, validation_fraction: float) -> list[str]:
    """The split (``"train"`` or ``"validation"``) of each of ``n_chunks`` chunks, in order.

    Raises:
      ValueError: the fraction is outside [0, 0.5], or a validation split is asked for but there
        are fewer than 2 chunks.
    """
    if not 0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in [0, 0.5], got {validation_fraction}.")
    if validation_fraction == 0:
        return ["train"] * n_chunks
    if n_chunks < 2:
        raise ValueError(f"the corpus makes only {n_chunks} chunk(s) of text, too few for a "
                         "train/validation split; pass more text or validation_fraction=0.")
    n_val = max(1, round(n_chunks * validation_fraction))
    val = {min(n_chunks - 1, int((j + 0.5) * n_chunks / n_val)) for j in range(n_val)}
    return ["validation" if i in val else "train" for i in range(n_chunks)]


def iter_chunks(documents: Sequence[tuple[str, str]], chunk_chars: int,
                validation_fraction: float) -> Iterator[tuple[str, str, int, str]]:
    """Yields ``(split, document_name, chunk_index, text)`` over all documents' chunks."""
    total = sum(len(t) for _, t in documents)
    size = effective_chunk_chars(total, chunk_chars, validation_fraction)
    chunks = [(name, i, piece) for name, text in documents
              for i, piece in enumerate(chunk_text(text, size))]
    if validation_fraction > 0 and len(chunks) < 2:
        raise ValueError(f"the corpus has {total} characters, which make {len(chunks)} chunk(s) "
                         f"of up to {size}: too few to hold out a validation split; pass more "
                         f"than {size} characters of text or validation_fraction=0.")
    for split, (name, i, piece) in zip(split_chunks(len(chunks), validation_fraction), chunks):
        yield split, name, i, piece


_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019"


def _bare(word: str) -> str:
    return word.strip(_PUNCTUATION)


def word_set(texts: Iterable[str]) -> frozenset[str]:
    """The whitespace-separated words of ``texts``, each also without surrounding punctuation.

    ``known_words`` looks sampled words up in it.
    """
    words: set[str] = set()
    for text in texts:
        for word in text.split():
            words.add(word)
            words.add(_bare(word))
    words.discard("")
    return frozenset(words)


def known_words(text: str, vocabulary: AbstractSet[str]) -> tuple[int, int]:
    """How many whitespace-separated words of ``text`` occur in a corpus: ``(known, total)``.

    A word counts as known when it, or it stripped of surrounding punctuation (``"The"`` for
    ``"The,"``), is in ``vocabulary`` (``word_set`` of the corpus). This is the demo's test of
    whether a sample reads like text: at least half of its words should be known. A word cut
    off at the end of the sample counts like any other.
    """
    words = text.split()
    known = sum(1 for w in words if w in vocabulary or (_bare(w) and _bare(w) in vocabulary))
    return known, len(words)
