"""Scoring a classifier: accuracy, macro-F1, and the score that ranks epochs."""

from __future__ import annotations

import numpy as np

TIE_BREAK = 1e-6  # weight of validation cross-entropy in the epoch score


def classification_metrics(logits: np.ndarray, label_ids: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (as scikit-learn: mean F1 over labels present in truth or prediction)."""
    pred = np.asarray(logits).argmax(-1)  # [rows]
    true = np.asarray(label_ids)  # [rows]
    f1s = []
    for c in np.union1d(true, pred):
        tp = float(np.sum((pred == c) & (true == c)))
        fp = float(np.sum((pred == c) & (true != c)))
        fn = float(np.sum((pred != c) & (true == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": float(np.mean(pred == true)), "macro_f1": float(np.mean(f1s))}


def selection_metrics(logits: np.ndarray, label_ids: np.ndarray) -> dict[str, float]:
    """Validation metrics plus ``selection``, the score that ranks epochs: macro-F1 first, ties
    broken by lower cross-entropy. The penalty (at most 1e-5) is below any macro-F1 step, but it
    matters: a small validation split drawn from the training distribution often reaches
    macro-F1 1.0 within a few epochs, and Trainer would otherwise keep the first, least trained
    epoch of the tie (on the demo data, held-out accuracy still rises for several epochs)."""
    logits = np.asarray(logits, dtype=np.float64)  # [rows, labels]
    true = np.asarray(label_ids)  # [rows]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # [rows, labels]
    cross_entropy = float(-log_probs[np.arange(len(true)), true].mean())
    metrics = classification_metrics(logits, true)
    return metrics | {"selection": metrics["macro_f1"] - TIE_BREAK * min(cross_entropy, 10.0)}


def score(true: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted, both
    in ``labels`` order) of predicted label names against the true ones."""
    ids = {name: i for i, name in enumerate(labels)}
    t = np.array([ids[x] for x in true])
    p = np.array([ids[x] for x in pred])
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(confusion, (t, p), 1)
    metrics = classification_metrics(np.eye(len(labels))[p], t)
    return {k: round(v, 4) for k, v in metrics.items()} | {"rows": len(t), "confusion": confusion.tolist()}


def majority(train_labels: list[str]) -> str:
    """The most frequent training label (ties: the first in sorted order): the simplest baseline."""
    names, counts = np.unique(np.array(train_labels), return_counts=True)
    return str(names[int(np.argmax(counts))])
