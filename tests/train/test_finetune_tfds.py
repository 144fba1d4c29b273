"""``finetune --data tfds:NAME``: a tfds dataset read through the same code as labelled files,
on builders registered here (no download), and its bad input (one line, exit 2)."""

import json
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unitscale_jax import data
from unitscale_jax.cli import main
from unitscale_jax.train.finetune import LabelledData
from unitscale_jax.train.flags import parse_finetune_args

from .finetune_helpers import TINY, fails

_POS, _NEG, _FILLER = ["good", "great", "fine"], ["bad", "awful", "dull"], ["the", "film", "was"]


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        label = r.randint(0, 1)
        words = [r.choice(_FILLER) for _ in range(r.randint(1, 3))]
        words.insert(r.randint(0, len(words)), r.choice(_POS if label else _NEG))
        out.append((" ".join(words), label))
    return out


SPLITS = {"train": _sentences(40, 0), "validation": _sentences(12, 1),
          "test": [(s, -1) for s, _ in _sentences(6, 2)]}
"""The sentiment builder's records; its test split is unlabelled, as GLUE's is."""


class UnitscaleTestSentiment(tfds.core.GeneratorBasedBuilder):
    """SST-2's layout: ``sentence`` (Text), ``label`` (ClassLabel negative/positive), ``idx``."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(), "idx": tfds.features.Scalar(np.int32),
            "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

    def _split_generators(self, dl_manager):
        return {k: self._generate_examples(v) for k, v in SPLITS.items()}

    def _generate_examples(self, rows):
        for i, (sentence, label) in enumerate(rows):
            yield i, {"sentence": sentence, "idx": i, "label": label}


class UnitscaleTestUnlabelled(tfds.core.GeneratorBasedBuilder):
    """Two Text features and a float score: no layout, no label feature."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "title": tfds.features.Text(), "body": tfds.features.Text(),
            "score": tfds.features.Scalar(np.float32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(8), "validation": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"title": f"t{i}", "body": f"body {i}", "score": i / 2}


class UnitscaleTestNoDev(tfds.core.GeneratorBasedBuilder):
    """A labelled dataset with a train split only."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (s, label) in enumerate(SPLITS["train"]):
            yield i, {"text": s, "label": label}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_tfds_reads_like_the_same_tsv_files(tfds_dir, tmp_path):
    notes = []
    cfg = parse_finetune_args(["--data", "tfds:unitscale_test_sentiment", "--data-dir", tfds_dir,
                               "--seq-len", "16"])
    got = LabelledData(cfg, log=notes.append)
    assert got.vocab.labels == ("negative", "positive")  # the ClassLabel names, in id order
    assert set(got.splits) == {"train", "dev"}  # the unlabelled test split is left out...
    assert any("split(s) test carry no labels" in n for n in notes), notes  # ...and said so
    assert str(got.splits["dev"].path) == "tfds:unitscale_test_sentiment[validation]"

    # The same records written as TSV files (labels as names) encode to the same arrays.
    for split, rows in (("train", SPLITS["train"]), ("dev", SPLITS["validation"])):
        lines = ["sentence\tlabel"] + [f"{s}\t{['negative', 'positive'][y]}" for s, y in rows]
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    files = LabelledData(parse_finetune_args(["--data", str(tmp_path), "--seq-len", "16"]),
                         log=lambda m: None)
    assert files.vocab == got.vocab
    for split in ("train", "dev"):
        a, b = got.splits[split].encoded.arrays, files.splits[split].encoded.arrays
        order = np.argsort([s for s, in got.splits[split].examples.texts])
        ref = np.argsort([s for s, in files.splits[split].examples.texts])
        for k in ("ids", "mask", "labels"):
            np.testing.assert_array_equal(a[k][order], b[k][ref], err_msg=f"{split} {k}")


def test_tfds_finetune_end_to_end(tfds_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["finetune", *TINY, "--data", "tfds:unitscale_test_sentiment", "--data-dir",
               tfds_dir, "--steps", "3", "--eval-every", "3", "--run-dir", str(run)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads((run / "labels.json").read_text())["labels"] == ["negative", "positive"]
    report = json.loads((run / "dev_report.json").read_text())
    assert report["n_examples"] == len(SPLITS["validation"])
    assert report["data"] == "tfds:unitscale_test_sentiment[validation]"
    assert not (run / "test_report.json").exists()


@pytest.mark.parametrize("args, needles", [
    (["--data", "tfds:unitscale_test_sentimnt"],
     ["unknown tfds dataset 'unitscale_test_sentimnt'", "unitscale_test_sentiment"]),
    (["--data", "tfds:unitscale_test_unlabelled"],
     ["cannot tell the text feature(s)", "'title' (Text)", "--text-column"]),
    (["--data", "tfds:unitscale_test_unlabelled", "--text-column", "body"],
     ["tfds:unitscale_test_unlabelled: no label feature", "'score' (Scalar)", "--label-column"]),
    (["--data", "tfds:unitscale_test_unlabelled", "--text-column", "body", "--label-column",
      "score"], ["feature 'score' (Scalar) is not a class label"]),
    (["--data", "tfds:unitscale_test_sentiment", "--text-column", "text"],
     ["no text column 'text'", "'sentence'"]),
    (["--data", "tfds:unitscale_test_no_dev"],
     ["no validation / dev / valid split (it has train)"]),
    (["--data", "tfds:unitscale_test_sentiment", "--task", "tag"],
     ["tfds datasets are read for --task classify", "CoNLL"]),
    (["--data", "tfds:unitscale_test_sentiment", "--dev", "dev.tsv"],
     ["names every split; drop --dev"]),
])
def test_tfds_bad_input(tfds_dir, tmp_path, capsys, args, needles):
    fails(capsys, ["finetune", *TINY, "--steps", "1", "--data-dir", tfds_dir, "--run-dir",
                    str(tmp_path / "r"), *args], *needles)
    run = tmp_path / "r"
    assert not run.exists() or not any(run.iterdir())  # nothing written


def test_read_tfds_classification_labels_are_the_class_names(tfds_dir):
    ds = data.read_tfds_classification("unitscale_test_sentiment", data_dir=tfds_dir,
                                       text_columns=["sentence"], label_column="label")
    assert ds.name == "tfds:unitscale_test_sentiment" and ds.unlabelled == ("test",)
    train = ds.splits["train"]
    assert sorted(zip(train.texts, train.labels)) == sorted(
        ((s,), ["negative", "positive"][y]) for s, y in SPLITS["train"])
