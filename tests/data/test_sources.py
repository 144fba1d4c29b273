"""tfds builders (array_record, no TensorFlow), --data resolution, corpus stats, bad input."""

import glob
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unitscale_jax import data
from unitscale_jax.data import corpus

from .conftest import write_corpus


class UnitscaleTestArticles(tfds.core.GeneratorBasedBuilder):
    """A registered tfds builder standing in for a downloadable dataset: two Text features,
    splits train and test (no validation)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"title": tfds.features.Text(), "body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 36)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"title": f"title {i}", "body": f"Article {i}: " + "lorem ipsum " * 20}


class UnitscaleTestTrainOnly(tfds.core.GeneratorBasedBuilder):
    """A registered builder with one Text feature and only a train split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(40):
            yield i, {"content": f"doc {i} " * 10, "label": i}


def _all_text(source, split):
    return list(source.documents(split))


def test_local_text_builds_array_record_and_splits(corpus_files, data_dir):
    assert "tensorflow" not in sys.modules
    src = data.resolve_source(str(corpus_files[0].parent / "*.txt"), data_dir=data_dir,
                              validation_fraction=0.1)
    assert set(src.splits) == {"train", "validation"}
    shards = glob.glob(os.path.join(data_dir, "unitscale_local_text", "*", "1.1.0",
                                    "*.array_record-*"))
    assert {os.path.basename(s).split(".")[0].rsplit("-", 1)[1] for s in shards} == \
        {"train", "validation"}
    assert type(src.splits["train"]).__name__ == "ArrayRecordDataSource"
    n_train, n_val = len(src.splits["train"]), len(src.splits["validation"])
    assert n_val == max(1, round((n_train + n_val) * 0.1))
    # Chunks of each file, both splits together, rebuild the file exactly: no text lost or shared.
    by_doc = {}
    for split in ("train", "validation"):
        for i in range(len(src.splits[split])):
            r = src.splits[split][i]
            by_doc.setdefault(r["document"].decode(), []).append((int(r["chunk"]),
                                                                  src.text(r)))
    assert sorted(by_doc) == sorted(str(p) for p in corpus_files)
    for path, chunks in by_doc.items():
        assert "".join(t for _, t in sorted(chunks)) == open(path, encoding="utf-8").read()
    assert "tensorflow" not in sys.modules


def test_local_text_is_deterministic_and_cached(corpus_files, data_dir, tmp_path):
    a = data.resolve_source([str(p) for p in corpus_files], data_dir=data_dir)
    config_dirs = glob.glob(os.path.join(data_dir, "unitscale_local_text", "*"))
    b = data.resolve_source([str(p) for p in reversed(corpus_files)], data_dir=data_dir)
    assert glob.glob(os.path.join(data_dir, "unitscale_local_text", "*")) == config_dirs
    for split in ("train", "validation"):
        assert _all_text(a, split) == _all_text(b, split)
    # Another data_dir gives the same records; a changed file gives a new dataset.
    c = data.resolve_source([str(p) for p in corpus_files], data_dir=str(tmp_path / "other"))
    assert _all_text(a, "validation") == _all_text(c, "validation")
    corpus_files[0].write_text("changed text\n" * 50, encoding="utf-8")
    data.resolve_source([str(p) for p in corpus_files], data_dir=data_dir)
    assert len(glob.glob(os.path.join(data_dir, "unitscale_local_text", "*"))) == 2


def test_record_order_does_not_depend_on_where_the_files_live(corpus_files, tmp_path):
    # tfds orders a split by a hash of the record keys: keyed by path, the same files in another
    # directory (a copy, a symlink, another checkout) came out in another order, and the same
    # seed trained on other batches.
    copy = write_corpus(tmp_path / "elsewhere" / "deeper", lines_per_file=400)
    original = write_corpus(tmp_path / "corpus", lines_per_file=400)
    link = tmp_path / "linked"
    link.symlink_to(tmp_path / "corpus", target_is_directory=True)
    orders = []
    for i, files in enumerate([original, copy, [link / p.name for p in original]]):
        src = data.resolve_source([str(p) for p in files], data_dir=str(tmp_path / f"tfds{i}"),
                                  chunk_chars=256)
        orders.append({split: [(int(r["chunk"]), src.text(r)) for r in
                               (src.splits[split][j] for j in range(len(src.splits[split])))]
                       for split in ("train", "validation")})
    assert len(orders[0]["train"]) > 20
    assert orders[1] == orders[0] and orders[2] == orders[0]
    assert [c for c, _ in orders[0]["train"]] != sorted(c for c, _ in orders[0]["train"])


def test_validation_fraction_zero_and_split_errors(corpus_files, data_dir):
    src = data.resolve_source(str(corpus_files[0]), data_dir=data_dir, validation_fraction=0)
    assert set(src.splits) == {"train"}
    with pytest.raises(ValueError, match="no split 'validation'"):
        src.split("validation")
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 0.5\]"):
        data.resolve_source(str(corpus_files[0]), data_dir=data_dir, validation_fraction=0.7)


def test_split_chunks_is_even_and_exact():
    assert corpus.split_chunks(20, 0.1) .count("validation") == 2
    s = corpus.split_chunks(100, 0.05)
    val = [i for i, x in enumerate(s) if x == "validation"]
    assert len(val) == 5 and np.all(np.diff(val) == 20)
    assert corpus.split_chunks(3, 0.05).count("validation") == 1
    with pytest.raises(ValueError, match="only 1 chunk"):
        corpus.split_chunks(1, 0.05)
    text = "line one\n" * 100 + "x" * 700
    pieces = corpus.chunk_text(text, 256)
    assert "".join(pieces) == text and all(len(p) <= 256 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:3])


def test_builtin_corpus(data_dir):
    src = data.resolve_source(None, data_dir=data_dir)
    assert src.name == "builtin:pydoc_data.topics"
    stats = data.corpus_stats(src)
    total = sum(len(t.encode()) for _, t in corpus.builtin_documents())
    assert stats["train"].bytes + stats["validation"].bytes == total > 100_000
    assert 0.03 < stats["validation"].bytes / total < 0.08
    line = data.describe_corpus(src, stats)
    assert line.startswith("builtin:pydoc_data.topics: train ")
    assert f"{stats['train'].tokens:,} tokens; validation" in line and " kB, " in line
    assert any("if_stmt" in t for t in src.documents("train"))
    # It is also a registered tfds dataset, loadable by name with tfds' own loader.
    assert "unitscale_pydoc_topics" in tfds.list_builders(with_community_datasets=False)


def test_builtin_corpus_missing_says_pass_data(monkeypatch, data_dir):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(RuntimeError, match=r"pydoc_data.topics.*--data PATH"):
        data.resolve_source(None, data_dir=data_dir)


def test_tfds_name_uses_tfds_loading(data_dir):
    with pytest.raises(ValueError, match=r"has 2 text features \['body', 'title'\]"):
        data.resolve_source("tfds:unitscale_test_articles", data_dir=data_dir)
    src = data.resolve_source("tfds:unitscale_test_articles", data_dir=data_dir, text_key="body")
    assert src.name == "tfds:unitscale_test_articles" and src.text_key == "body"
    assert (len(src.split("train")), len(src.split("validation"))) == (30, 6)  # test -> validation
    assert all(t.startswith("Article 3") for t in src.documents("validation"))
    prepared = glob.glob(os.path.join(data_dir, "unitscale_test_articles", "1.0.0", "*"))
    assert any(".array_record-" in p for p in prepared)
    # Only a train split: the validation split is the tail of train, cut with tfds slicing.
    src = data.resolve_source("tfds:unitscale_test_train_only", data_dir=data_dir,
                              validation_fraction=0.1)
    assert src.text_key == "content"
    assert (len(src.split("train")), len(src.split("validation"))) == (36, 4)
    train, val = set(src.documents("train")), set(src.documents("validation"))
    assert len(train | val) == 40 and not train & val
    it = data.make_iterator(src, "train", seq_len=16, batch_size=2)
    assert next(it)["inputs"].shape == (2, 16)


def test_tfds_bad_names(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown tfds dataset 'unitscale_test_artcles'.*"
                                         r"Did you mean unitscale_test_articles"):
        data.resolve_source("tfds:unitscale_test_artcles", data_dir=data_dir)
    with pytest.raises(ValueError, match="empty tfds dataset name"):
        data.resolve_source("tfds:", data_dir=data_dir)
    with pytest.raises(ValueError, match="no feature 'text'"):
        data.resolve_source("tfds:unitscale_test_train_only", data_dir=data_dir, text_key="text")
    with pytest.raises(ValueError, match="not prepared"):
        data.resolve_source("tfds:unitscale_test_train_only", data_dir=str(tmp_path / "empty"),
                            download=False)


def test_bad_local_paths(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.txt"):
        data.resolve_source(str(tmp_path / "nope.txt"), data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.resolve_source(str(tmp_path / "*.md"), data_dir=data_dir)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.txt is empty \(0 bytes\)"):
        data.resolve_source(str(tmp_path / "empty.txt"), data_dir=data_dir)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        data.resolve_source(str(tmp_path / "blank.txt"), data_dir=data_dir)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        data.resolve_source(str(tmp_path / "latin1.txt"), data_dir=data_dir)
    with pytest.raises(ValueError, match="is a directory"):
        data.resolve_source(str(tmp_path), data_dir=data_dir)
    (tmp_path / "tiny.txt").write_text("tiny corpus\n")
    with pytest.raises(ValueError, match=r"has 12 characters, which make 1 chunk\(s\) of up to "
                                         r"256: too few.*validation_fraction=0"):
        data.resolve_source(str(tmp_path / "tiny.txt"), data_dir=data_dir)
    with pytest.raises(ValueError, match="no data path"):
        data.resolve_source([], data_dir=data_dir)


def test_corpus_stats_counts(tmp_path, data_dir):
    paths = write_corpus(tmp_path / "c", n_files=2, lines_per_file=10)
    src = data.resolve_source([str(p) for p in paths], data_dir=data_dir)
    stats = data.corpus_stats(src)
    n_bytes = sum(os.path.getsize(p) for p in paths)
    assert stats["train"].bytes + stats["validation"].bytes == n_bytes
    assert stats["train"].tokens == stats["train"].bytes  # byte tokenizer
    n_chars = sum(len(p.read_text(encoding="utf-8")) for p in paths)
    chars = data.SubwordTokenizer(_CharTokenizer(), vocab_size=0x30000)
    sub = data.corpus_stats(src, chars)
    assert sub["train"].tokens + sub["validation"].tokens == n_chars
    assert sub["train"].bytes_per_token > 1


class _CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_tinyshakespeare(data_dir):
    from tests.shared_data import TINYSHAKESPEARE
    path = str(TINYSHAKESPEARE)
    src = data.resolve_source(path, data_dir=data_dir)
    stats = data.corpus_stats(src)
    assert stats["train"].bytes + stats["validation"].bytes == os.path.getsize(path)
    assert stats["validation"].documents == round(
        (stats["train"].documents + stats["validation"].documents) * 0.05)
    batch = next(data.make_lm_iterator(src, "validation", 128, 4))
    assert batch["inputs"].shape == (4, 128) and batch["where"].all()
    text = open(path, encoding="utf-8").read()
    row = data.ByteTokenizer().decode(batch["inputs"][0][:64])
    assert row in text and row in "".join(src.documents("validation"))


def test_builtin_corpus_in_a_clean_process_without_tf_or_importlib_resources(tmp_path):
    """The main command's default path on a fresh machine: no TensorFlow, and without the
    importlib_resources package that tfds 4.9.10 needs but does not declare."""
    import subprocess
    code = (
        "import sys; sys.modules['importlib_resources'] = None\n"
        "from unitscale_jax import data\n"
        f"src = data.resolve_source(None, data_dir={str(tmp_path)!r})\n"
        "b = next(data.make_lm_iterator(src, 'train', 64, 2))\n"
        "print(sorted(src.splits), b['inputs'].shape, 'tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['train', 'validation'] (2, 64) False"


def test_tfds_missing_package_is_one_clear_error(data_dir, monkeypatch):
    def prepare(self, **kwargs):
        import tensorflow  # noqa: F401  (not installed here: the dataset "needs" it)

    monkeypatch.setattr(UnitscaleTestTrainOnly, "download_and_prepare", prepare)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(RuntimeError, match=r"needs the Python package 'tensorflow'.*pip install"):
        data.resolve_source("tfds:unitscale_test_train_only", data_dir=data_dir)
