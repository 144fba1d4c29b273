"""Tokenizers: the ``Tokenizer`` protocol, a byte-level tokenizer and an adapter for subword ones.

Every tokenizer maps ``str -> np.ndarray[int32]`` and back, and names four special ids: ``pad``
(padding, never scored), ``bos`` (start of a cropped document), ``eos`` (end of a document; the
separator between packed documents) and ``mask`` (masked-LM corruption and span-corruption
sentinel). ``special_ids`` lists them; ``regular_ids`` is every other id (what a masked-LM
"random token" is drawn from).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "SubwordTokenizer", "get_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text`` (int32, 1-D, no special tokens added)."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of ``ids``; special ids are dropped."""


def special_ids(tok: Tokenizer) -> np.ndarray:
    """The distinct special ids of ``tok`` (pad, bos, eos, mask) as a sorted int32 array."""
    return np.unique(np.asarray([tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id], np.int32))


def regular_ids(tok: Tokenizer) -> np.ndarray:
    """Every id of ``tok`` that is not special, sorted (int32)."""
    return np.setdiff1d(np.arange(tok.vocab_size, dtype=np.int32), special_ids(tok))


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes; pad=256, bos=257, eos=258, mask=259.

    The vocabulary is exactly 260. It is not rounded up to a multiple of 8 or 64: ids that never
    occur would still take part in the softmax (changing the loss at init and u-muP's
    cross-entropy scale, which depends on V), and a 260-row embedding costs nothing. A trainer
    that wants an aligned table can pad it itself. ``decode`` drops special ids and replaces
    invalid UTF-8 (e.g. a sampled partial character) with U+FFFD.
    """

    pad_id, bos_id, eos_id, mask_id = 256, 257, 258, 259
    vocab_size = 260
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids).reshape(-1)
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"


class SubwordTokenizer:
    """Adapts any object with ``encode``/``decode`` (SentencePiece, HF ``tokenizers``, HF
    ``transformers``) to the ``Tokenizer`` protocol.

    ``backend.encode(text)`` may return a list of ints, an array, or an object with ``.ids``
    (``tokenizers.Encoding``). The base vocabulary size is ``vocab_size`` if given, else read from
    ``get_piece_size()`` (SentencePiece), ``get_vocab_size()`` (``tokenizers``) or ``len(backend)``
    (``transformers``). A special id the caller does not give is taken from the backend when it
    has one (``pad_id()``/``bos_id()``/... of SentencePiece, ``pad_token_id``... of
    ``transformers``, ``token_to_id("[PAD]")``...) and otherwise appended after the base
    vocabulary, so ``vocab_size`` grows by the number of appended specials.
    """

    _HF_NAMES = {"pad": ("[PAD]", "<pad>"), "bos": ("[CLS]", "<s>", "[BOS]", "<bos>"),
                 "eos": ("[SEP]", "</s>", "[EOS]", "<eos>", "<|endoftext|>"),
                 "mask": ("[MASK]", "<mask>")}

    def __init__(self, backend: Any, *, vocab_size: int | None = None, pad_id: int | None = None,
                 bos_id: int | None = None, eos_id: int | None = None,
                 mask_id: int | None = None, name: str | None = None):
        if not (callable(getattr(backend, "encode", None))
                and callable(getattr(backend, "decode", None))):
            raise TypeError(f"SubwordTokenizer needs an object with encode() and decode(); got "
                            f"{type(backend).__name__}.")
        self.backend = backend
        self.name = name or type(backend).__name__
        base = vocab_size if vocab_size is not None else self._backend_vocab_size(backend)
        given = {"pad": pad_id, "bos": bos_id, "eos": eos_id, "mask": mask_id}
        ids, next_id = {}, int(base)
        for kind, value in given.items():
            value = value if value is not None else self._backend_special(backend, kind)
            if value is None or not 0 <= value < base:
                value, next_id = next_id, next_id + 1
            ids[kind] = int(value)
        self.base_vocab_size = int(base)
        self.vocab_size = next_id
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (
            ids["pad"], ids["bos"], ids["eos"], ids["mask"])

    @staticmethod
    def _backend_vocab_size(backend: Any) -> int:
        for attr in ("get_piece_size", "get_vocab_size", "vocab_size"):
            value = getattr(backend, attr, None)
            if value is not None:
                return int(value() if callable(value) else value)
        if hasattr(backend, "__len__"):
            return len(backend)
        raise ValueError(f"cannot tell the vocabulary size of {type(backend).__name__}; pass "
                         "vocab_size=.")

    @classmethod
    def _backend_special(cls, backend: Any, kind: str) -> int | None:
        for attr in (f"{kind}_id", f"{kind}_token_id"):  # SentencePiece / transformers
            value = getattr(backend, attr, None)
            value = value() if callable(value) else value
            if isinstance(value, (int, np.integer)) and value >= 0:
                return int(value)
        token_to_id = getattr(backend, "token_to_id", None)  # HF tokenizers
        if callable(token_to_id):
            for token in cls._HF_NAMES[kind]:
                value = token_to_id(token)
                if value is not None:
                    return int(value)
        return None

    def encode(self, text: str) -> np.ndarray:
        try:  # transformers: do not add [CLS]/[SEP]; the pipeline adds its own specials
            out = self.backend.encode(text, add_special_tokens=False)
        except TypeError:
            out = self.backend.encode(text)
        out = getattr(out, "ids", out)
        return np.asarray(out, dtype=np.int32).reshape(-1)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids).reshape(-1)
        keep = (ids >= 0) & (ids < self.base_vocab_size) & ~np.isin(ids, special_ids(self))
        return self.backend.decode([int(i) for i in ids[keep]])

    def __repr__(self) -> str:
        return f"SubwordTokenizer({self.name}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=None)
def _import(module: str, hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this tokenizer needs the '{module}' package: {hint}") from e


def get_tokenizer(spec: str | Tokenizer | None = None) -> Tokenizer:
    """Returns a tokenizer from a command-line spec.

    Args:
      spec: ``None`` or ``"bytes"`` (``ByteTokenizer``); ``"sentencepiece:PATH.model"``;
        ``"hf:PATH/tokenizer.json"`` (HF ``tokenizers``); or a ``Tokenizer`` (returned as is).
        The optional packages are imported only when named.

    Raises:
      ValueError: an unknown spec. FileNotFoundError: a missing model file.
      ImportError: the named package is not installed.
    """
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    if not isinstance(spec, str):
        if isinstance(spec, Tokenizer):
            return spec
        raise TypeError(f"not a tokenizer: {spec!r}")
    kind, _, path = spec.partition(":")
    if kind not in ("sentencepiece", "hf") or not path:
        raise ValueError(f"unknown tokenizer {spec!r}; use 'bytes', 'sentencepiece:PATH.model' or "
                         "'hf:PATH/tokenizer.json'.")
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if kind == "sentencepiece":
        spm = _import("sentencepiece", "pip install sentencepiece")
        return SubwordTokenizer(spm.SentencePieceProcessor(model_file=path), name=spec)
    tokenizers = _import("tokenizers", "pip install tokenizers")
    return SubwordTokenizer(tokenizers.Tokenizer.from_file(path), name=spec)
