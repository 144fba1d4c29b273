"""Training subword tokenizers (HF ``tokenizers``), loading them as ``hf:PATH``, subwords per
word for tagging, and the ``unitscale-jax tokenizer train`` command."""

import numpy as np
import pytest

from unitscale_jax.cli import main
from unitscale_jax.data import ByteTokenizer, get_tokenizer, regular_ids
from unitscale_jax.data.labelled import LabelVocab, encode_tagged, read_conll, tags_from_subwords
from unitscale_jax.data.tokenizers import HF_SPECIAL_TOKENS, encode_words, train_tokenizer
from unitscale_jax.paths import PathError

TEXT = ("the quick brown fox jumps over the lazy dog , again and again .\n"
        "Peter Blackburn visits New York City with the brown dog .\n") * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_train_save_and_load(corpus, tmp_path, kind):
    out = tmp_path / "tok.json"
    trained = train_tokenizer([corpus], kind=kind, vocab_size=300, out_path=out)
    tok = get_tokenizer(f"hf:{out}")
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["tok.json"]
    assert tok.vocab_size == trained.vocab_size == tok.backend.get_vocab_size()
    assert tok.vocab_size <= 300
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.backend.id_to_token(i) for i in range(5)] == list(HF_SPECIAL_TOKENS)
    assert 1 in regular_ids(tok) and 0 not in regular_ids(tok)
    text = "the lazy fox visits York"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) >= 5 and not np.isin(ids, [0, 2, 3, 4]).any()
    expected = " " + text if kind == "bpe" else text  # byte-level BPE adds a prefix space
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == expected
    words = text.split()
    pieces = encode_words(tok, words)  # grouped by HF's word_ids: the same ids as running text
    assert len(pieces) == len(words) and all(len(p) >= 1 for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), ids)


def test_wordpiece_splits_words_and_tags_align(corpus, tmp_path):
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=120, out_path=tmp_path / "t.json")
    words = ["Blackburnian", "visits", "York"]
    pieces = encode_words(tok, words)
    assert len(pieces[0]) > 1  # an unseen word: several subwords
    assert tok.backend.id_to_token(int(pieces[0][1])).startswith("##")
    conll = tmp_path / "t.conll"
    conll.write_text("Blackburnian\tB-PER\nvisits\tO\nYork\tB-LOC\n", encoding="utf-8")
    s = read_conll(conll)
    vocab = LabelVocab.for_tags(s.tags[0])
    enc = encode_tagged(s, tok, 32, vocab=vocab)
    starts = 1 + np.cumsum([0] + [len(p) for p in pieces[:-1]])
    np.testing.assert_array_equal(np.flatnonzero(enc.arrays["where"][0]), starts)
    np.testing.assert_array_equal(enc.arrays["labels"][0][starts], vocab.encode(s.tags[0]))
    assert enc.arrays["labels"][0].sum() == vocab.encode(s.tags[0]).sum()  # nothing elsewhere
    assert tags_from_subwords(enc.arrays["labels"], enc.arrays["word_index"], enc.n_words,
                              vocab) == [list(s.tags[0])]


def test_encode_words_fallbacks(corpus, tmp_path):
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=120, out_path=tmp_path / "t.json")
    pieces = encode_words(tok, ["dog", "\x00", "dog"])  # a control character normalises away
    assert [p.tolist() for p in pieces][1] == [tok.unk_id]
    assert pieces[0].tolist() == pieces[2].tolist() == tok.encode("dog").tolist()
    byte_pieces = encode_words(ByteTokenizer(), ["ab", "c"])
    assert [p.tolist() for p in byte_pieces] == [[97, 98, 32], [99]]  # " ".join(words)

    class NoWords:  # a tokenizer without encode_words nor unk_id
        vocab_size, pad_id, bos_id, eos_id, mask_id = 10, 0, 1, 2, 3

        def encode(self, text):
            return np.asarray([5] * len(text.strip()), np.int32)

        def decode(self, ids):
            return ""

    assert [p.tolist() for p in encode_words(NoWords(), ["ab", " "])] == [[5, 5], [3]]


def test_train_tokenizer_bad_input(corpus, tmp_path):
    out = tmp_path / "t.json"
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        train_tokenizer([corpus], kind="sentencepiece", out_path=out)
    with pytest.raises(ValueError, match=r"--vocab-size 200 is too small for bpe; use at least "
                                         r"261"):
        train_tokenizer([corpus], kind="bpe", vocab_size=200, out_path=out)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        train_tokenizer([tmp_path / "missing.txt"], out_path=out)
    with pytest.raises(PathError, match="--out .* does not exist; create that directory"):
        train_tokenizer([corpus], out_path=tmp_path / "no" / "t.json")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"b\.txt is not UTF-8 text"):
        train_tokenizer([binary], out_path=out)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="training text is empty"):
        train_tokenizer([blank], out_path=out)
    assert not out.exists()  # nothing half-written


def test_get_tokenizer_not_a_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        get_tokenizer(f"hf:{tmp_path / 'missing.json'}")
    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"junk\.json is not a Hugging Face tokenizer\.json") as e:
        get_tokenizer(f"hf:{junk}")
    assert "\n" not in str(e.value)


def test_cli_tokenizer_train(corpus, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert main(["tokenizer", "train", "--data", str(corpus), "--kind", "unigram",
                 "--vocab-size", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"--tokenizer hf:{out}" in printed and "unigram" in printed
    assert get_tokenizer(f"hf:{out}").vocab_size <= 200
    for argv, message in [
        (["tokenizer", "train", "--data", str(tmp_path / "nope.txt"), "--out", str(out)],
         "data file not found"),
        (["tokenizer", "train", "--data", str(corpus), "--kind", "chars", "--out", str(out)],
         "invalid choice: 'chars'"),
        (["tokenizer", "train", "--data", str(corpus), "--vocab-size", "3", "--out", str(out)],
         "--vocab-size 3 is too small"),
        (["tokenizer", "train", "--data", str(corpus)], "--out"),
        (["tokenizer", "fit"], "unknown unitscale-jax tokenizer command 'fit'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("unitscale-jax: error: "), err
        assert err.count("\n") == 1 and "Traceback" not in err
