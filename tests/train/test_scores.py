"""Fine-tuning metrics against the reference packages: scikit-learn for classification,
seqeval (strict mode) for entity-level tagging scores; the confusion-matrix PNG."""

import random
import warnings

import numpy as np
import pytest
from seqeval.metrics import classification_report
from seqeval.scheme import IOB1, IOB2, IOBES
from sklearn import metrics as skm

from unitscale_jax.train.plotting import plot_confusion
from unitscale_jax.train.scores import (
    classification_scores,
    confusion_matrix,
    entities,
    format_classification_report,
    format_tagging_report,
    tagging_scores,
)

SCHEMES = {"iob2": (IOB2, "BI"), "iob1": (IOB1, "BI"), "iobes": (IOBES, "BIES")}


def _seqeval(y_true, y_pred, scheme):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision/recall -> 0, as ours
        return classification_report(y_true, y_pred, mode="strict", scheme=SCHEMES[scheme][0],
                                     output_dict=True)


def _assert_same_as_seqeval(y_true, y_pred, scheme):
    ours = tagging_scores(y_true, y_pred, scheme=scheme)
    ref = _seqeval(y_true, y_pred, scheme)
    averages = {"micro avg", "macro avg", "weighted avg"}
    assert list(ours["per_type"]) == sorted(set(ref) - averages)
    names = (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))
    for kind, row in ours["per_type"].items():
        for a, b in names + (("support", "support"),):
            assert row[a] == pytest.approx(ref[kind][b], abs=1e-12), (kind, a)
    for a, b in names:
        assert ours[a] == pytest.approx(ref["micro avg"][b], abs=1e-12), a
        assert ours["macro"][a] == pytest.approx(ref["macro avg"][b], abs=1e-12), a
        assert ours["weighted"][a] == pytest.approx(ref["weighted avg"][b], abs=1e-12), a
    assert ours["support"] == ref["micro avg"]["support"]
    return ours


@pytest.mark.parametrize("scheme", ["iob2", "iob1", "iobes"])
def test_tagging_matches_seqeval_on_random_predictions(scheme):
    rng = random.Random(list(SCHEMES).index(scheme))
    prefixes = SCHEMES[scheme][1]
    tags = ["O"] * 4 + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC", "creative-work")]
    checked = 0
    for _ in range(150):
        y_true = [[rng.choice(tags) for _ in range(rng.randint(0, 14))]
                  for _ in range(rng.randint(1, 6))]
        if not any(entities(s, scheme) for s in y_true):
            continue  # seqeval's report needs at least one entity
        y_pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in s] for s in y_true]
        _assert_same_as_seqeval(y_true, y_pred, scheme)
        checked += 1
    assert checked > 100


def test_tagging_hand_made_edge_cases():
    y_true = [
        ["O", "B-PER", "I-PER"],  # an entity at the sentence end
        ["B-LOC", "B-LOC", "I-LOC"],  # adjacent entities of one type
        ["B-PER", "I-PER", "O", "B-ORG"],
        ["O", "O"],
    ]
    y_pred = [
        ["O", "B-PER", "I-PER"],  # exact
        ["B-LOC", "I-LOC", "I-LOC"],  # merged: no match
        ["O", "I-PER", "O", "B-ORG"],  # ill-formed I- after O: no entity in strict mode
        ["I-ORG", "O"],  # ill-formed again
    ]
    ours = _assert_same_as_seqeval(y_true, y_pred, "iob2")
    assert ours["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5,
                                       "f1": pytest.approx(2 / 3), "support": 2}
    assert ours["per_type"]["LOC"]["precision"] == 0.0 and ours["per_type"]["LOC"]["support"] == 2
    assert ours["per_type"]["ORG"]["f1"] == 1.0
    assert (ours["precision"], ours["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 5))
    assert ours["n_examples"] == 4 and ours["support"] == 5
    iobes_true = [["S-PER", "B-LOC", "E-LOC", "O", "B-PER", "I-PER", "E-PER"]]
    iobes_pred = [["S-PER", "B-LOC", "I-LOC", "O", "I-PER", "I-PER", "E-PER"]]  # unclosed; no B
    ours = _assert_same_as_seqeval(iobes_true, iobes_pred, "iobes")
    assert ours["precision"] == 1.0 and ours["recall"] == pytest.approx(1 / 3)
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    _assert_same_as_seqeval(iob1, [["I-PER", "B-PER", "B-PER", "O", "B-LOC"]], "iob1")


def test_entities():
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)]
    assert entities(["O", "I-PER", "I-PER", "B-X", "I-Y"]) == [("X", 3, 4)]
    assert entities(["I-PER", "I-PER", "B-PER", "I-LOC"], "iob1") == [
        ("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4)]
    assert entities(["B-A", "E-A", "S-B", "B-C", "O"], "iobes") == [("A", 0, 2), ("B", 2, 3)]
    assert entities([]) == []
    with pytest.raises(ValueError, match="'E-PER' is not in the scheme"):
        entities(["E-PER"], "iob2")
    with pytest.raises(ValueError, match="unknown tag scheme"):
        entities(["O"], "bilou")
    with pytest.raises(ValueError, match="sentence 0: 2 true tags and 1 predicted"):
        tagging_scores([["O", "B-A"]], [["O"]])


def test_classification_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = ["neg", "neutral", "pos", "never"]  # "never" is neither true nor predicted
    y_true = rng.integers(0, 3, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, 3, 500))
    y_pred[y_pred == 1] = np.where(rng.random((y_pred == 1).sum()) < 0.5, 1, 0)
    scores = classification_scores(y_true, y_pred, labels)
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert scores["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3],
                                                     zero_division=0)
    for i, name in enumerate(labels):
        row = scores["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (
            pytest.approx(p[i]), pytest.approx(r[i]), pytest.approx(f[i]), s[i])
    np.testing.assert_array_equal(scores["confusion"],
                                  skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3]))
    assert scores["n_examples"] == 500 and scores["labels"] == labels


def test_classification_hand_made():
    scores = classification_scores([0, 0, 1, 1], [0, 0, 0, 0], ["0", "1"])
    assert scores["accuracy"] == 0.5
    assert scores["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert scores["per_class"]["0"]["f1"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(1 / 3)
    assert scores["confusion"] == [[2, 0], [2, 0]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="no examples"):
        classification_scores([], [], ["0", "1"])


def test_reports_and_confusion_png(tmp_path):
    cls = classification_scores([0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c"])
    text = format_classification_report(cls)
    assert "accuracy  0.7500  (4 examples)" in text and text.count("\n") >= 5
    assert any(line.split()[:1] == ["b"] and line.split()[-1] == "2" for line in text.splitlines())
    tag = tagging_scores([["B-PER", "O"]], [["B-PER", "O"]])
    report = format_tagging_report(tag)
    assert "micro avg" in report and "1 sentences, 1 entities" in report
    png = plot_confusion(cls["confusion"], cls["labels"], tmp_path / "confusion.png",
                         title="dev")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match=r"must be \[2, 2\]"):
        plot_confusion(cls["confusion"], ["a", "b"], tmp_path / "x.png")
