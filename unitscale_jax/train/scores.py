"""Task metrics of fine-tuning: classification scores and entity-level tagging scores.

- ``classification_scores``: accuracy, macro-F1, per-class precision / recall / F1 / support
  and the confusion matrix (rows: true class, columns: predicted), as scikit-learn computes
  them (a class with no prediction has precision 0; macro-F1 averages the classes that occur
  in the true or predicted labels).
- ``tagging_scores``: entity-level precision, recall and F1 per entity type and micro-averaged
  (plus macro and support-weighted averages), as ``seqeval`` computes them in strict mode
  (``classification_report(y_true, y_pred, mode="strict", scheme=IOB2)``; IOB1 and IOBES too):
  an entity counts only when its type, start and end all match, and ill-formed predicted
  sequences (an ``I-`` after ``O`` in IOB2) yield no entity. ``entities`` is the extraction.

``TASK_METRICS`` names the number that selects the best checkpoint; ``format_*_report`` print
the tables ``evaluate`` shows; the confusion-matrix PNG is ``plotting.plot_confusion``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from unitscale_jax.data.labelled import TAG_SCHEMES

__all__ = ["TASK_METRICS", "confusion_matrix", "classification_scores", "entities",
           "tagging_scores", "format_classification_report", "format_tagging_report"]

TASK_METRICS = {"classify": "accuracy", "tag": "f1"}
"""Task -> the score (higher is better) that picks the best checkpoint."""


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _prf(tp: np.ndarray, pred: np.ndarray, true: np.ndarray):
    precision, recall = _divide(tp, pred), _divide(tp, true)
    f1 = _divide(2 * precision * recall, precision + recall)
    return precision, recall, f1


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     n_classes: int) -> np.ndarray:
    """Counts ``[n_classes, n_classes]`` (int64): row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}.")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and not (0 <= y.min() and y.max() < n_classes):
            raise ValueError(f"{name} holds ids outside [0, {n_classes}).")
    out = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(out, (y_true.reshape(-1), y_pred.reshape(-1)), 1)
    return out


def classification_scores(y_true: Sequence[int] | np.ndarray,
                          y_pred: Sequence[int] | np.ndarray,
                          labels: Sequence[str]) -> dict[str, Any]:
    """Scores of class ids against the true ids.

    Args:
      y_true: the true class ids (``LabelVocab`` ids), one per example.
      y_pred: the predicted class ids, one per example.
      labels: the class names in id order (``LabelVocab.labels``).

    Returns:
      ``{"accuracy", "macro_f1", "n_examples", "per_class": {label: {"precision", "recall",
      "f1", "support"}}, "labels": [...], "confusion": [[...]]}``: JSON-ready (floats, ints,
      lists). ``per_class`` lists every class of ``labels``; ``macro_f1`` averages those that
      occur in ``y_true`` or ``y_pred``.
    """
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    n = int(matrix.sum())
    if n == 0:
        raise ValueError("no examples to score.")
    tp, pred, true = np.diag(matrix), matrix.sum(0), matrix.sum(1)
    precision, recall, f1 = _prf(tp, pred, true)
    present = (pred + true) > 0
    return {
        "accuracy": float(tp.sum() / n),
        "macro_f1": float(f1[present].mean()),
        "n_examples": n,
        "per_class": {str(label): {"precision": float(precision[i]), "recall": float(recall[i]),
                                   "f1": float(f1[i]), "support": int(true[i])}
                      for i, label in enumerate(labels)},
        "labels": [str(label) for label in labels],
        "confusion": matrix.tolist(),
    }


# Entity extraction: seqeval's strict mode, pattern for pattern (seqeval/scheme.py, v1.2).
# A pattern (prev prefixes, current prefixes, same type?) -- None: any type.
_PATTERNS: dict[str, tuple[tuple, tuple, tuple]] = {
    "iob1": (  # start, inside, end
        (("O", "I", None), ("I", "I", False), ("B", "I", None), ("I", "B", True),
         ("B", "B", True)),
        (("B", "I", True), ("I", "I", True)),
        (("I", "I", False), ("I", "O", None), ("I", "B", None), ("B", "O", None),
         ("B", "I", False), ("B", "B", True)),
    ),
    "iob2": (
        (("BIOES", "B", None),),
        (("B", "I", True), ("I", "I", True)),
        (("I", "O", None), ("I", "I", False), ("I", "B", None), ("B", "O", None),
         ("B", "I", False), ("B", "B", None)),
    ),
    "iobes": (
        (("BIOES", "B", None), ("BIOES", "S", None)),
        (("B", "I", True), ("B", "E", True), ("I", "I", True), ("I", "E", True)),
        (("S", "BIOES", None), ("E", "BIOES", None)),
    ),
}


def _parse(tag: str, allowed: str) -> tuple[str, str]:
    if not tag or tag[0] not in allowed:
        raise ValueError(f"tag {tag!r} is not in the scheme (allowed prefixes: "
                         f"{', '.join(allowed)}).")
    return tag[0], tag[1:].strip("-") or "_"


def _match(prev: tuple[str, str], cur: tuple[str, str], patterns) -> bool:
    return any(prev[0] in p and cur[0] in c and (same is None or (prev[1] == cur[1]) == same)
               for p, c, same in patterns)


def entities(tags: Sequence[str], scheme: str = "iob2") -> list[tuple[str, int, int]]:
    """The entities of one sentence's tags, as ``(type, start, end)`` (end exclusive).

    Strict mode: an entity starts with the scheme's start pattern, continues while the tags
    continue it, and is kept only when it ends by the scheme's end pattern; tags that start
    nothing (an ``I-X`` after ``O`` in IOB2) are skipped.

    Raises:
      ValueError: an unknown scheme, or a tag whose prefix the scheme does not have.
    """
    if scheme not in _PATTERNS:
        raise ValueError(f"unknown tag scheme {scheme!r}; use one of {', '.join(_PATTERNS)}.")
    start_p, inside_p, end_p = _PATTERNS[scheme]
    allowed = "O" + "".join(TAG_SCHEMES[scheme])
    toks = [_parse(t, allowed) for t in tags] + [("O", "_")]
    out, i, prev = [], 0, ("O", "_")
    while i < len(toks):
        if _match(prev, toks[i], start_p):
            end, last = i + 1, toks[i]
            while end < len(toks) and _match(last, toks[end], inside_p):
                last, end = toks[end], end + 1
            if _match(toks[end - 1], toks[end], end_p):
                out.append((toks[i][1], i, end))
            i = end
        else:
            i += 1
        prev = toks[i - 1]
    return out


def tagging_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]], *,
                   scheme: str = "iob2") -> dict[str, Any]:
    """Entity-level scores of predicted tag sequences, as ``seqeval``'s strict mode.

    Args:
      y_true: per sentence, its true tags (one per word).
      y_pred: per sentence, its predicted tags (the same lengths as ``y_true``).
      scheme: ``iob2``, ``iob1`` or ``iobes``.

    Returns:
      ``{"precision", "recall", "f1"}`` micro-averaged over all entities, ``"per_type":
      {type: {"precision", "recall", "f1", "support"}}`` (types of the true or predicted
      entities, sorted), ``"macro"`` and ``"weighted"`` averages (as seqeval's report),
      ``"support"`` (true entities) and ``"n_examples"`` (sentences). A score with a zero
      denominator is 0, as seqeval's default.

    Raises:
      ValueError: sequences of different lengths, or tags outside the scheme.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true and {len(y_pred)} predicted sentences.")
    true_set, pred_set = set(), set()
    for s, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {s}: {len(t)} true tags and {len(p)} predicted tags.")
        true_set.update((s,) + e for e in entities(t, scheme))
        pred_set.update((s,) + e for e in entities(p, scheme))
    types = sorted({e[1] for e in true_set | pred_set})
    tp = np.asarray([len({e for e in true_set & pred_set if e[1] == k}) for k in types], np.int64)
    pred = np.asarray([sum(e[1] == k for e in pred_set) for k in types], np.int64)
    true = np.asarray([sum(e[1] == k for e in true_set) for k in types], np.int64)
    precision, recall, f1 = _prf(tp, pred, true)
    micro = _prf(tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True))
    total = int(true.sum())

    def average(weights):
        if not types:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        if weights is not None and weights.sum() == 0:  # no true entity: seqeval's convention
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        return {name: float(np.average(v, weights=weights))
                for name, v in (("precision", precision), ("recall", recall), ("f1", f1))}

    return {
        "precision": float(micro[0][0]), "recall": float(micro[1][0]), "f1": float(micro[2][0]),
        "support": total, "n_examples": len(y_true),
        "per_type": {k: {"precision": float(precision[i]), "recall": float(recall[i]),
                         "f1": float(f1[i]), "support": int(true[i])}
                     for i, k in enumerate(types)},
        "macro": average(None), "weighted": average(true),
    }


def _table(rows: list[tuple[str, dict]], extra: list[str]) -> str:
    width = max([len(name) for name, _ in rows] + [12])
    lines = [f"{'':<{width}}  precision  recall      f1  support"]
    for name, r in rows:
        support = f"{r['support']:>8d}" if "support" in r else f"{'':>8}"
        lines.append(f"{name:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  "
                     f"{r['f1']:>6.4f} {support}")
    return "\n".join(lines + [""] + extra)


def format_classification_report(scores: dict[str, Any]) -> str:
    """The per-class table, accuracy and macro-F1 of ``classification_scores`` as text."""
    rows = list(scores["per_class"].items())
    return _table(rows, [f"accuracy  {scores['accuracy']:.4f}  ({scores['n_examples']} examples)",
                         f"macro-F1  {scores['macro_f1']:.4f}"])


def format_tagging_report(scores: dict[str, Any]) -> str:
    """The per-type table and micro / macro / weighted averages of ``tagging_scores``."""
    rows = list(scores["per_type"].items()) + [
        ("micro avg", {**{k: scores[k] for k in ("precision", "recall", "f1")},
                       "support": scores["support"]}),
        ("macro avg", {**scores["macro"], "support": scores["support"]}),
        ("weighted avg", {**scores["weighted"], "support": scores["support"]})]
    return _table(rows, [f"{scores['n_examples']} sentences, {scores['support']} entities"])
