"""Tokenizers: the ``Tokenizer`` protocol, a byte-level tokenizer and an adapter for subword ones.

Every tokenizer maps ``str -> np.ndarray[int32]`` and back, and names four special ids: ``pad``
(padding, never scored), ``bos`` (start of a cropped document), ``eos`` (end of a document; the
separator between packed documents) and ``mask`` (masked-LM corruption and span-corruption
sentinel). ``special_ids`` lists them; ``regular_ids`` is every other id (what a masked-LM
"random token" is drawn from). ``encode_words`` splits pre-split words into subwords (token
classification puts each word's tag on its first subword). ``train_tokenizer`` trains a
WordPiece, byte-level BPE or Unigram tokenizer with Hugging Face ``tokenizers`` and saves the
``tokenizer.json`` that ``get_tokenizer("hf:PATH")`` loads.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from unitscale_jax.paths import existing_file, output_file, write_text_atomic

__all__ = ["Tokenizer", "ByteTokenizer", "SubwordTokenizer", "get_tokenizer", "encode_words",
           "train_tokenizer", "TOKENIZER_KINDS", "HF_SPECIAL_TOKENS"]


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

    def encode_words(self, words: Sequence[str]) -> list[np.ndarray]:
        """The bytes of each word, a space after every word but the last: together they are
        ``encode(" ".join(words))``, running text as in pretraining, and each word's first
        byte is its own first character."""
        last = len(words) - 1
        return [self.encode(w if i == last else w + " ") for i, w in enumerate(words)]

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
                 "mask": ("[MASK]", "<mask>"), "unk": ("[UNK]", "<unk>")}

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
        unk = self._backend_special(backend, "unk")
        self.unk_id = unk if unk is not None and 0 <= unk < base else None

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

    def encode_words(self, words: Sequence[str]) -> list[np.ndarray]:
        """The subword ids of each word. An HF ``tokenizers`` backend encodes the words in one
        call (``is_pretokenized=True``) and groups its ids by ``Encoding.word_ids``; other
        backends encode each word alone."""
        words = list(words)
        try:
            enc = self.backend.encode(words, is_pretokenized=True, add_special_tokens=False)
            word_ids = enc.word_ids
        except (TypeError, AttributeError):
            return [self.encode(w) for w in words]
        out: list[list[int]] = [[] for _ in words]
        for token_id, w in zip(enc.ids, word_ids):
            if w is not None:
                out[w].append(token_id)
        return [np.asarray(ids, np.int32) for ids in out]

    def __repr__(self) -> str:
        return f"SubwordTokenizer({self.name}, vocab_size={self.vocab_size})"


def encode_words(tokenizer: Tokenizer, words: Sequence[str]) -> list[np.ndarray]:
    """Subword ids per word (int32 arrays), at least one per word.

    Uses ``tokenizer.encode_words`` when it has one (``ByteTokenizer``, ``SubwordTokenizer``),
    else encodes each word alone. A word the tokenizer maps to nothing (e.g. a lone character
    its normalizer removes) becomes one unknown token, ``unk_id`` when the tokenizer has one and
    ``mask_id`` otherwise, so that every word has a position to carry its tag.
    """
    method = getattr(tokenizer, "encode_words", None)
    pieces = method(words) if callable(method) else [tokenizer.encode(w) for w in words]
    unk = getattr(tokenizer, "unk_id", None)
    unk = tokenizer.mask_id if unk is None else unk
    return [np.asarray(p, np.int32).reshape(-1) if len(p) else np.asarray([unk], np.int32)
            for p in pieces]


def _import(module: str, hint: str):  # (importlib caches modules in sys.modules)
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
      ValueError: an unknown spec, or a file that is not a tokenizer of the named kind.
      PathError: the path is a directory (``unitscale_jax.paths``; a ``ValueError``).
      FileNotFoundError: a missing model file (``paths.MissingPathError``). ImportError: the
        named package is not installed.
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
    existing_file(path, "--tokenizer", "the tokenizer's file (tokenizer.json for hf:, "
                  "the .model file for sentencepiece:)")
    if kind == "sentencepiece":
        spm = _import("sentencepiece", "pip install sentencepiece")
        try:
            backend = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({_first_line(e)}); pass the "
                             ".model file that spm_train wrote.") from None
        return SubwordTokenizer(backend, name=spec)
    tokenizers = _import("tokenizers", "pip install tokenizers")
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({_first_line(e)}); "
                         "train one with 'unitscale-jax tokenizer train' or pass a "
                         "tokenizer.json saved by the tokenizers library.") from None
    return SubwordTokenizer(backend, name=spec)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


TOKENIZER_KINDS = ("wordpiece", "bpe", "unigram")
HF_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens of a trained tokenizer (ids 0-4): pad, unknown, bos, eos, mask, named as
``SubwordTokenizer`` looks them up."""


def _read_lines(files: Sequence[str]) -> Iterable[str]:
    for path in files:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            try:
                yield from f
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); "
                                 "convert it to UTF-8 first.") from None


def train_tokenizer(files: Sequence[str | os.PathLike] | str, *, kind: str = "wordpiece",
                    vocab_size: int = 8000, out_path: str | os.PathLike = "tokenizer.json",
                    lowercase: bool = False, min_frequency: int = 2,
                    texts: Iterable[str] | None = None) -> SubwordTokenizer:
    """Trains a subword tokenizer on local text with Hugging Face ``tokenizers`` and saves it.

    - ``wordpiece``: BERT's: Unicode normalisation (optionally lower-casing), split on
      whitespace and punctuation, ``##`` continuation pieces, ``[UNK]`` for unseen characters.
    - ``bpe``: GPT-2's byte-level BPE (every byte in the alphabet, so nothing is unknown; a
      leading space is part of a word's first piece, so ``decode`` gives the text back after a
      space).
    - ``unigram``: SentencePiece's unigram model over ``▁``-marked words (NFKC normalisation).

    The special tokens are ``HF_SPECIAL_TOKENS`` (ids 0-4); no post-processor is set (the data
    pipeline adds its own). The file is written atomically (a temporary file renamed).

    Args:
      files: text files or globs (``expand_paths``); read line by line.
      kind: ``wordpiece``, ``bpe`` or ``unigram``.
      vocab_size: the target vocabulary size, special tokens included (the trained vocabulary
        is smaller when the text has fewer distinct pieces; WordPiece keeps every character).
      out_path: where to save ``tokenizer.json``.
      lowercase: lower-case the text first.
      min_frequency: least count of a merged pair (WordPiece, BPE).
      texts: more training text (or instead of ``files`` when those are empty).

    Returns:
      The trained tokenizer, as ``get_tokenizer(f"hf:{out_path}")`` loads it.

    Raises:
      ValueError: an unknown kind, a vocabulary too small, no text. FileNotFoundError: a
        missing file. PathError: ``out_path`` is a directory, its directory is missing, or
        nothing can be written there (``unitscale_jax.paths``).
    """
    from unitscale_jax.data.corpus import expand_paths
    tk = _import("tokenizers", "pip install tokenizers")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of "
                         f"{', '.join(TOKENIZER_KINDS)}.")
    least = len(HF_SPECIAL_TOKENS) + (256 if kind == "bpe" else 1)
    if vocab_size < least:
        why = " (the 256 bytes and 5 special tokens)" if kind == "bpe" else ""
        raise ValueError(f"--vocab-size {vocab_size} is too small for {kind}; use at least "
                         f"{least}{why}.")
    out = output_file(out_path, "--out", example="tokenizer.json")
    paths = expand_paths(files) if files else []
    extra = list(texts) if texts is not None else []
    if not paths and not extra:
        raise ValueError("no training text; pass text files with --data.")
    specials = list(HF_SPECIAL_TOKENS)
    common = dict(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    norm = [tk.normalizers.NFKC()] + ([tk.normalizers.Lowercase()] if lowercase else [])
    if kind == "wordpiece":
        tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False)
        tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        tok.decoder = tk.decoders.WordPiece()
        trainer = tk.trainers.WordPieceTrainer(min_frequency=min_frequency, **common)
    elif kind == "bpe":
        tok = tk.Tokenizer(tk.models.BPE())
        if lowercase:
            tok.normalizer = tk.normalizers.Lowercase()
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(min_frequency=min_frequency, **common,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = tk.Tokenizer(tk.models.Unigram())
        tok.normalizer = tk.normalizers.Sequence(norm)
        tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
        tok.decoder = tk.decoders.Metaspace()
        trainer = tk.trainers.UnigramTrainer(unk_token="[UNK]", **common)

    def lines():
        yield from _read_lines(paths)
        yield from extra

    try:
        tok.train_from_iterator(lines(), trainer=trainer)
    except ValueError:
        raise
    except Exception as e:  # the Rust trainer's errors are bare Exceptions
        raise ValueError(f"training the {kind} tokenizer failed: {_first_line(e)}.") from None
    if tok.get_vocab_size() <= len(specials):
        raise ValueError("the training text is empty (no pieces learnt); pass files with text.")
    write_text_atomic(out, tok.to_str(pretty=True))
    return SubwordTokenizer(tk.Tokenizer.from_file(str(out)), name=f"hf:{out}")
