"""Tokenizers: byte round trip, specials, the subword adapter and get_tokenizer."""

import numpy as np
import pytest

from unitscale_jax.data import (
    ByteTokenizer,
    SubwordTokenizer,
    Tokenizer,
    get_tokenizer,
    regular_ids,
    special_ids,
)


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "Grüße, 世界! — naïve café 🙂\nΩ≈ç√"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert ids.min() >= 0 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text


def test_byte_specials_and_vocab():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 260
    assert sorted([tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id]) == [256, 257, 258, 259]
    np.testing.assert_array_equal(special_ids(tok), [256, 257, 258, 259])
    np.testing.assert_array_equal(regular_ids(tok), np.arange(256))
    ids = np.concatenate([[tok.bos_id], tok.encode("hé"), [tok.eos_id, tok.pad_id, tok.mask_id]])
    assert tok.decode(ids) == "hé"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # half a character: replaced, no error
    assert tok.encode("").shape == (0,)


class _FakeSentencePiece:
    """SentencePiece's interface: unk=0, bos=1, eos=2, no pad (-1), ids from encode(str)."""

    words = ["<unk>", "<s>", "</s>", "hello", "world", "again"]

    def get_piece_size(self):
        return len(self.words)

    def pad_id(self):
        return -1

    def bos_id(self):
        return 1

    def eos_id(self):
        return 2

    def encode(self, text):
        return [self.words.index(w) if w in self.words else 0 for w in text.split()]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class _FakeHFTokenizers:
    """HF `tokenizers.Tokenizer`'s interface: Encoding objects, token_to_id, get_vocab_size."""

    vocab = {"[PAD]": 0, "[MASK]": 1, "a": 2, "b": 3}

    def get_vocab_size(self):
        return len(self.vocab)

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # the adapter must not let the backend add specials
        return _Encoding([self.vocab[c] for c in text])

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_subword_adapter_sentencepiece_like():
    tok = SubwordTokenizer(_FakeSentencePiece())
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # taken from the backend
    assert (tok.pad_id, tok.mask_id) == (6, 7)  # appended after the base vocabulary
    assert tok.vocab_size == 8
    ids = tok.encode("hello world again")
    np.testing.assert_array_equal(ids, [3, 4, 5])
    assert ids.dtype == np.int32
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == \
        "hello world again"
    np.testing.assert_array_equal(regular_ids(tok), [0, 3, 4, 5])


def test_subword_adapter_hf_tokenizers_like():
    tok = SubwordTokenizer(_FakeHFTokenizers())
    assert (tok.pad_id, tok.mask_id) == (0, 1)
    assert (tok.bos_id, tok.eos_id) == (4, 5)
    assert tok.vocab_size == 6
    assert tok.decode(tok.encode("abba")) == "abba"


def test_subword_adapter_explicit_ids_and_errors():
    tok = SubwordTokenizer(_FakeSentencePiece(), pad_id=0, mask_id=0)
    assert tok.pad_id == 0 and tok.vocab_size == 6
    with pytest.raises(TypeError, match="encode"):
        SubwordTokenizer(object())


def test_get_tokenizer(tmp_path):
    assert isinstance(get_tokenizer(None), ByteTokenizer)
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    tok = SubwordTokenizer(_FakeSentencePiece())
    assert get_tokenizer(tok) is tok
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece:x")
    with pytest.raises(FileNotFoundError, match="no such file"):
        get_tokenizer(f"sentencepiece:{tmp_path / 'missing.model'}")


def test_get_tokenizer_optional_package_missing(tmp_path, monkeypatch):
    model = tmp_path / "tokenizer.json"
    model.write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import fails
    with pytest.raises(ImportError, match="pip install tokenizers"):
        get_tokenizer(f"hf:{model}")
