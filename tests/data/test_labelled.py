"""Labelled data: split discovery, classification and CoNLL readers, label vocabularies,
encoding for the model, batches, and every bad input the fine-tuning issue lists."""

import json

import numpy as np
import pytest

from tests.shared_data import TINYSHAKESPEARE
from unitscale_jax.data import ByteTokenizer
from unitscale_jax.data.labelled import (
    DataError,
    LabelVocab,
    check_tags,
    encode_tagged,
    encode_texts,
    examples_from_records,
    find_splits,
    make_batch_iterator,
    read_classification,
    read_conll,
    tags_from_subwords,
)

SHARED = TINYSHAKESPEARE.parent.parent  # ../shared/data


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- splits


def test_find_splits(tmp_path):
    for name in ("train.tsv", "dev.tsv", "test.tsv", "README.md", ".train.swp"):
        write(tmp_path / name, "x")
    (tmp_path / "train").mkdir()
    found = find_splits(tmp_path)
    assert found == {"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv",
                     "test": tmp_path / "test.tsv"}
    other = tmp_path / "other"
    other.mkdir()
    write(other / "Train.conll", "x")
    write(other / "validation.conll", "x")
    assert find_splits(other) == {"train": other / "Train.conll",
                                  "dev": other / "validation.conll"}


def test_find_splits_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        find_splits(tmp_path / "missing")
    write(tmp_path / "notes.txt", "x")
    with pytest.raises(DataError, match=r"no train\.\*.*found notes\.txt"):
        find_splits(tmp_path)
    write(tmp_path / "dev.tsv", "x")
    write(tmp_path / "validation.tsv", "x")
    with pytest.raises(DataError, match=r"2 files for the dev split \(dev\.tsv, validation\.tsv\)"):
        find_splits(tmp_path)


# --------------------------------------------------------------------------- classification


def test_read_sst2_style_tsv(tmp_path):
    path = write(tmp_path / "train.tsv", 'sentence\tlabel\na "quoted" film , really \t1\n\n'
                                         "dull\t0\n")
    ex = read_classification(path)
    assert ex.texts == (('a "quoted" film , really ',), ("dull",))  # TSV: no quoting
    assert ex.labels == ("1", "0")
    assert ex.lines == (2, 4)
    assert (ex.text_columns, ex.label_column, ex.header) == (("sentence",), "label",
                                                               ("sentence", "label"))
    assert not ex.is_pair and len(ex) == 2


@pytest.mark.parametrize("header,texts_expected", [
    ("index\tsentence1\tsentence2\tlabel", ("sentence1", "sentence2")),  # RTE / MNLI layout
    ("index\tquestion\tsentence\tlabel", ("question", "sentence")),  # QNLI
])
def test_pair_layouts_by_default(tmp_path, header, texts_expected):
    path = write(tmp_path / "dev.tsv", f"{header}\n0\tA man.\tA person.\tentailment\n")
    ex = read_classification(path)
    assert ex.text_columns == texts_expected and ex.is_pair
    assert ex.texts == (("A man.", "A person."),) and ex.labels == ("entailment",)


def test_columns_by_name_index_and_no_header(tmp_path):
    path = write(tmp_path / "x.tsv", "id\tgood\tbody\n7\tyes\tnice\n8\tno\tbad\n")
    by_name = read_classification(path, text_columns=["body"], label_column="good")
    by_index = read_classification(path, text_columns=[2], label_column="1")
    assert by_name.texts == by_index.texts == (("nice",), ("bad",))
    assert by_name.labels == by_index.labels == ("yes", "no")
    raw = write(tmp_path / "raw.tsv", "great movie\t1\nawful\t0\n")
    ex = read_classification(raw, no_header=True)  # two columns: text, label
    assert ex.texts == (("great movie",), ("awful",)) and ex.labels == ("1", "0")
    assert ex.header is None and ex.lines == (1, 2)
    flipped = read_classification(raw, no_header=True, text_columns=[1], label_column=0)
    assert flipped.texts == (("1",), ("0",))


def test_csv_and_jsonl(tmp_path):
    csv_path = write(tmp_path / "train.csv", 'text,label\n"a, b\nand c",pos\nplain,neg\n')
    ex = read_classification(csv_path)
    assert ex.texts == (("a, b\nand c",), ("plain",)) and ex.labels == ("pos", "neg")
    assert ex.lines == (2, 4)
    jsonl = write(tmp_path / "train.jsonl",
                  '{"sentence": "ok", "label": 1}\n\n{"sentence": "meh", "label": 0.0}\n')
    ex = read_classification(jsonl)
    assert ex.texts == (("ok",), ("meh",)) and ex.labels == ("1", "0") and ex.lines == (1, 3)
    unlabelled = read_classification(jsonl, with_labels=False)
    assert unlabelled.labels is None and unlabelled.label_column is None


def test_examples_from_records_mappings():
    records = [{"sentence": b"caf\xc3\xa9", "label": 1, "idx": 0}]  # tfds gives UTF-8 bytes
    ex = examples_from_records(records, name="tfds:glue/sst2")
    assert ex.texts == (("café",),) and ex.labels == ("1",)


@pytest.mark.parametrize("content,options,message", [
    ("sentence\tlabel\nok\t1\n", dict(label_column="polarity"),
     r"x\.tsv: no label column 'polarity' \(columns found: 'sentence', 'label'\)"),
    ("text\tpolarity\nok\t1\n", {}, r"no label column \(columns found: 'text', 'polarity'\); pass "
     "--label-column"),
    ("review\tlabel\nok\t1\n", {}, r"cannot tell the text column\(s\) \(columns found: 'review', "
     r"'label'\); pass --text-column"),
    ("sentence\tlabel\nok\t1\n", dict(text_columns=[5]),
     r"no text column 5 \(0-based\): the file has 2 column\(s\)"),
    ("a\tb\tc\n", dict(no_header=True), r"without a header and 3 columns"),
    ("ok\t1\n", dict(no_header=True, label_column="label"),
     r"no header row, so pass --label-column as a 0-based index"),
    ("", {}, r"x\.tsv: empty file"),
    ("  \n\n", {}, r"x\.tsv: empty file"),
    ("sentence\tlabel\n", {}, r"only a header row \(sentence, label\), no examples"),
    ("sentence\tlabel\nfine\t1\nbroken line\n", {},
     r"x\.tsv:3: 1 field\(s\), expected 2 \(columns: sentence, label\)"),
    ("sentence\tlabel\nfine\t\n", {}, r"x\.tsv:2: empty label in column 'label'"),
    ("sentence\tlabel\nfine\t1\n", dict(text_columns=["label"], label_column="label"),
     r"both a text and the label column"),
])
def test_classification_bad_input(tmp_path, content, options, message):
    path = write(tmp_path / "x.tsv", content)
    with pytest.raises(DataError, match=message) as info:
        read_classification(path, **options)
    assert "\n" not in str(info.value)


def test_classification_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"no such file"):
        read_classification(tmp_path / "missing.tsv")
    with pytest.raises(DataError, match=r"cannot tell the format .*'\.txt'"):
        read_classification(write(tmp_path / "a.txt", "x"))
    (tmp_path / "bin.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe\t1\n")
    with pytest.raises(DataError, match=r"bin\.tsv: not UTF-8 text \(invalid byte at offset 15\)"):
        read_classification(tmp_path / "bin.tsv")
    bad_json = write(tmp_path / "b.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        read_classification(bad_json)
    missing_key = write(tmp_path / "c.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: no column 'label' in this record "
                                        r"\(columns found: 'sentence'\)"):
        read_classification(missing_key)
    not_object = write(tmp_path / "d.jsonl", '["a", 1]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: a JSON list, not an object"):
        read_classification(not_object)
    float_label = write(tmp_path / "e.jsonl", '{"sentence": "a", "label": 0.5}\n')
    with pytest.raises(DataError, match=r"e\.jsonl:1: label 0\.5 .* not an integer"):
        read_classification(float_label)


# --------------------------------------------------------------------------- label vocabulary


def test_label_vocab_order_json_and_unseen_label(tmp_path):
    ints = LabelVocab.from_labels(["10", "2", "2", "1"])
    assert ints.labels == ("1", "2", "10")  # numeric order, not "1" < "10" < "2"
    names = LabelVocab.from_labels(["pos", "neg", "neutral"])
    assert names.labels == ("neg", "neutral", "pos")
    np.testing.assert_array_equal(names.encode(["pos", "neg"]), [2, 0])
    assert names.decode(np.array([1, 2])) == ["neutral", "pos"]
    assert LabelVocab.from_json(names.to_json()) == names
    assert json.loads(names.to_json()) == {"labels": ["neg", "neutral", "pos"], "scheme": None}
    with pytest.raises(ValueError, match="not a saved label vocabulary"):
        LabelVocab.from_json('{"classes": []}')
    train = read_classification(write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\nb\t1\n"))
    dev = read_classification(write(tmp_path / "dev.tsv", "sentence\tlabel\nc\t1\nd\t2\n"))
    vocab = LabelVocab.from_labels(train.labels)
    with pytest.raises(DataError, match=r"dev\.tsv:3: label '2' never occurs in the training "
                                        r"split \(its labels: 0, 1\)"):
        encode_texts(dev, ByteTokenizer(), 16, vocab=vocab)


def test_tag_vocab_covers_the_scheme():
    vocab = LabelVocab.for_tags(["O", "B-PER", "I-PER", "B-LOC"], "iobes")
    assert vocab.labels == ("O", "B-LOC", "I-LOC", "E-LOC", "S-LOC",
                            "B-PER", "I-PER", "E-PER", "S-PER")
    assert LabelVocab.from_json(vocab.to_json()).scheme == "iobes"
    with pytest.raises(DataError, match=r"t\.conll:4: tag 'B-ORG' never occurs"):
        vocab.encode(["O", "B-ORG"], name="t.conll", lines=[3, 4])


# --------------------------------------------------------------------------- CoNLL


CONLL = """-DOCSTART- -X- O O

EU\tNNP\tB-ORG
rejects\tVBZ\tO
German\tJJ\tB-MISC
\t
Peter\tNNP\tB-PER
Blackburn\tNNP\tI-PER

"""


def test_read_conll_tabs_docstart_and_tag_column(tmp_path):
    path = write(tmp_path / "train.conll", CONLL)
    s = read_conll(path)
    assert s.words == (("EU", "rejects", "German"), ("Peter", "Blackburn"))
    assert s.tags == (("B-ORG", "O", "B-MISC"), ("B-PER", "I-PER"))
    assert s.lines == ((3, 4, 5), (7, 8))
    assert (len(s), s.n_tokens, s.n_columns) == (2, 5, 3)
    with pytest.raises(DataError, match=r"train\.conll:3: tag 'NNP' is not in the IOB2"):
        read_conll(path, tag_column=1)  # the POS column is no tag column
    middle = write(tmp_path / "m.conll", "EU B-ORG NNP\nrejects O VBZ\n")
    assert read_conll(middle, tag_column=1).tags == (("B-ORG", "O"),)
    spaces = write(tmp_path / "s.conll", "a  B-X\nb I-X\n\n\nc O\n")
    assert read_conll(spaces).tags == (("B-X", "I-X"), ("O",))
    words_only = write(tmp_path / "in.conll", "hello\nworld\n\nagain\n")
    unlabelled = read_conll(words_only, with_tags=False)
    assert unlabelled.tags is None and unlabelled.words == (("hello", "world"), ("again",))


def test_check_tags_schemes():
    assert check_tags(["B-X", "I-X", "O", "B-Y", "B-Y"], "iob2") is None
    assert check_tags(["I-X", "I-X", "B-X", "O"], "iob1") is None
    assert check_tags(["B-X", "I-X", "E-X", "S-Y", "O"], "iobes") is None
    assert check_tags(["O", "I-X"], "iob2")[0] == 1
    assert check_tags(["B-X", "I-Y"], "iob2")[0] == 1  # another type continues nothing
    assert check_tags(["B-X", "O"], "iobes")[0] == 1  # not closed by E-X
    assert check_tags(["B-X", "I-X"], "iobes")[0] == 1  # sentence ends inside an entity
    assert check_tags(["E-X"], "iobes")[0] == 0
    assert check_tags(["O", "S-X"], "iob2")[0] == 1
    assert check_tags(["PER"], "iob1")[0] == 0


@pytest.mark.parametrize("content,options,message", [
    ("a\tB-X\nb\tI-X\tjunk\n", {}, r"c\.conll:2: 3 column\(s\) \(tab-separated\), expected 2 as "
     r"on line 1"),
    ("a B-X\nb c I-X\n", {}, r"c\.conll:2: 3 column\(s\) \(whitespace-separated\)"),
    ("a\tO\n\nb\tPER\n", {}, r"c\.conll:3: tag 'PER' is not in the IOB2 scheme \(O, B-TYPE, "
     r"I-TYPE\)"),
    ("a\tO\nb\tS-PER\n", {}, r"c\.conll:2: tag 'S-PER' is not in the IOB2 scheme .*iobes"),
    ("a\tO\nb\tI-PER\n", {}, r"c\.conll:2: tag 'I-PER' continues no entity \(previous tag "
     r"'O'\); in IOB2 an entity starts with B-PER"),
    ("a\tI-PER\n", {}, r"c\.conll:1: tag 'I-PER' continues no entity \(previous tag none"),
    ("a\tB-PER\nb\tO\n", dict(scheme="iobes"), r"c\.conll:2: tag 'O' follows the unfinished "
     r"entity 'B-PER'"),
    ("a\tO\n\nb\tB-PER\n", dict(scheme="iobes"), r"c\.conll:3: the sentence ends inside"),
    ("", {}, r"c\.conll: empty file"),
    ("-DOCSTART- O\n\n", {}, r"c\.conll: no tokens"),
    ("lonely\n", {}, r"c\.conll:1: one column \('lonely'\) and no tag"),
    ("a\tO\n", dict(tag_column=4), r"c\.conll:1: no tag column 4 \(0-based\)"),
    ("a\tO\n", dict(scheme="bilou"), r"unknown tag scheme 'bilou'"),
])
def test_conll_bad_input(tmp_path, content, options, message):
    path = write(tmp_path / "c.conll", content)
    with pytest.raises(DataError, match=message) as info:
        read_conll(path, **options)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- encoding


def test_encode_texts_layout_and_truncation(tmp_path):
    tok = ByteTokenizer()
    single = examples_from_records([["abc", "1"], ["abcdefghij", "0"]], name="m",
                                   columns=["sentence", "label"])
    vocab = LabelVocab.from_labels(single.labels)
    enc = encode_texts(single, tok, 8, vocab=vocab)
    ids, mask = enc.arrays["ids"], enc.arrays["mask"]
    assert ids.dtype == np.int32 and ids.shape == (2, 8) and mask.dtype == bool
    np.testing.assert_array_equal(ids[0], [257, 97, 98, 99, 258, 256, 256, 256])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [257, 97, 98, 99, 100, 101, 102, 258])  # cut to fit
    np.testing.assert_array_equal(enc.arrays["labels"], [1, 0])
    assert enc.truncated == 1 and len(enc) == 2
    pairs = examples_from_records([["abcdef", "xy", "0"]], name="p",
                                  columns=["sentence1", "sentence2", "label"])
    enc = encode_texts(pairs, tok, 8)  # room 5: the longer text loses tokens first
    np.testing.assert_array_equal(enc.arrays["ids"][0], [257, 97, 98, 99, 258, 120, 121, 258])
    assert "labels" not in enc.arrays and enc.truncated == 1
    path = write(tmp_path / "long.tsv", "sentence\tlabel\nshort\t0\nmuch too long\t1\n"
                                        "also far too long\t1\n")
    with pytest.raises(DataError, match=r"long\.tsv:3: 2 example\(s\) longer than --seq-len 10 "
                                        r"\(this one has 15 tokens"):
        encode_texts(read_classification(path), tok, 10, truncate=False)
    with pytest.raises(DataError, match=r"--seq-len 3 leaves no room"):
        encode_texts(pairs, tok, 3)


def test_encode_tagged_first_subword_and_back(tmp_path):
    tok = ByteTokenizer()  # words are their bytes, a space before all but the first
    path = write(tmp_path / "t.conll", "ab\tB-X\ncd\tI-X\ne\tO\n\nxyz\tB-Y\nw\tO\n")
    s = read_conll(path)
    vocab = LabelVocab.for_tags([t for sent in s.tags for t in sent])
    enc = encode_tagged(s, tok, 8, vocab=vocab)
    a = enc.arrays
    # "ab cd e" is 7 bytes + bos + eos = 9 > 8: the last word no longer fits
    np.testing.assert_array_equal(a["ids"][0], [257, 97, 98, 32, 99, 100, 32, 258])
    np.testing.assert_array_equal(a["where"][0], [0, 1, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(a["labels"][0], [0, vocab.labels.index("B-X"), 0, 0,
                                                   vocab.labels.index("I-X"), 0, 0, 0])
    np.testing.assert_array_equal(a["word_index"][0], [-1, 0, -1, -1, 1, -1, -1, -1])
    assert a["mask"][0].all()
    np.testing.assert_array_equal(a["ids"][1], [257, 120, 121, 122, 32, 119, 258, 256])
    np.testing.assert_array_equal(a["mask"][1], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(a["where"][1], [0, 1, 0, 0, 0, 1, 0, 0])
    assert enc.truncated == 1 and enc.n_words.tolist() == [3, 2]
    back = tags_from_subwords(a["labels"], a["word_index"], enc.n_words, vocab)
    assert back == [["B-X", "I-X", "O"], ["B-Y", "O"]]  # the truncated word gets "O"
    wrong = a["labels"].copy()
    wrong[1, 1] = vocab.labels.index("I-Y")
    assert tags_from_subwords(wrong, a["word_index"], enc.n_words, vocab)[1] == ["I-Y", "O"]
    with pytest.raises(DataError, match=r"t\.conll:1: 1 sentence\(s\) longer than --seq-len 8"):
        encode_tagged(s, tok, 8, vocab=vocab, truncate=False)


# --------------------------------------------------------------------------- batches


def test_batch_iterator_epochs_padding_and_resume():
    tok = ByteTokenizer()
    arrays = {"ids": np.arange(10 * 4, dtype=np.int32).reshape(10, 4),
              "labels": np.arange(10, dtype=np.int32)}
    it = make_batch_iterator(arrays, batch_size=4, seed=3, tokenizer=tok)
    batches = [next(it) for _ in range(5)]  # 20 rows: epoch 0, then epoch 1 (drop remainder)
    assert all(b["labels"].shape == (4,) and b["valid"].all() for b in batches)
    first = np.concatenate([b["labels"] for b in batches])
    assert sorted(first[:10]) == sorted(first[10:]) == list(range(10))  # two whole epochs
    assert first[:10].tolist() != list(range(10))  # shuffled...
    assert first[:10].tolist() != first[10:].tolist()  # ...afresh every epoch
    np.testing.assert_array_equal(batches[0]["ids"], arrays["ids"][batches[0]["labels"]])
    again = make_batch_iterator(arrays, batch_size=4, seed=3, tokenizer=tok)
    np.testing.assert_array_equal(np.concatenate([next(again)["labels"] for _ in range(5)]),
                                  first)
    epoch = make_batch_iterator(arrays, batch_size=4, shuffle=True, seed=3, num_epochs=1,
                                tokenizer=tok)
    rows = list(epoch)
    assert len(rows) == 3 and rows[-1]["valid"].tolist() == [True, True, False, False]
    assert sorted(np.concatenate([r["labels"] for r in rows])[:10]) == list(range(10))
    assert (rows[-1]["ids"][2:] == tok.pad_id).all()
    resumed = make_batch_iterator(arrays, batch_size=4, seed=3, tokenizer=tok)
    for _ in range(2):
        next(resumed)
    state = json.loads(json.dumps(resumed.get_state()))
    fresh = make_batch_iterator(arrays, batch_size=4, seed=3, tokenizer=tok)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["labels"], batches[2]["labels"])
    other = make_batch_iterator(arrays, batch_size=4, seed=4, tokenizer=tok)
    with pytest.raises(ValueError, match="other settings"):
        other.set_state(state)
    with pytest.raises(ValueError, match="equal-length"):
        make_batch_iterator({"ids": arrays["ids"], "labels": arrays["labels"][:3]},
                            batch_size=2, tokenizer=tok)


# --------------------------------------------------------------------------- the shared data


def test_shared_sst2_and_wnut17():
    sst2 = find_splits(SHARED / "sst2")
    train, dev = read_classification(sst2["train"]), read_classification(sst2["dev"])
    assert (len(train), len(dev)) == (60614, 6735)
    assert LabelVocab.from_labels(train.labels).labels == ("0", "1")
    assert set(dev.labels) == {"0", "1"} and train.labels.count("1") == 33828
    wnut = find_splits(SHARED / "wnut17")
    train, dev = read_conll(wnut["train"]), read_conll(wnut["dev"])
    assert (len(train), len(dev)) == (3394, 1009)
    assert (train.n_tokens, dev.n_tokens) == (62730, 15733)
    vocab = LabelVocab.for_tags([t for s in train.tags for t in s])
    types = {"person", "location", "group", "creative-work", "corporation", "product"}
    assert len(vocab) == 13 and {t[2:] for t in vocab.labels[1:]} == types
    assert {t for s in dev.tags for t in s} <= set(vocab.labels)
