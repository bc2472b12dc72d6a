"""AUROC, metrics at a threshold, thresholds chosen on validation, medmnist's definitions."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from kd_lightning.report.statistics._checks import (
    _binary_labels,
    _both_classes,
    _check_threshold,
    _float_1d,
    _int_labels,
    _preview,
)

# ----------------------------------------------------------------------------------------------
# Discrimination and operating points


THRESHOLD_METRICS = ("acc", "sensitivity", "specificity", "f1")


def _auroc_rows(scores: np.ndarray, n_neg: int) -> np.ndarray:
    """AUROC of each row of `scores` (B, N) whose first n_neg columns are negatives and the rest
    positives. Midranks are multiples of 1/2, so the rank sums (and therefore U) are exact in
    float64 whatever the summation order: every path through here gives bit-identical AUROCs."""
    n_pos = scores.shape[1] - n_neg
    ranks = stats.rankdata(scores, axis=1)
    u = ranks[:, n_neg:].sum(axis=1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _binary_order(labels: np.ndarray) -> np.ndarray:
    # Negatives first: the layout _auroc_rows and the stratified index matrix share.
    return np.argsort(labels, kind="stable")


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic with midranks.

    AUROC = P(score of a random positive > score of a random negative), a tied pair counting
    1/2; computed from the rank sum of the positives, U = R_pos - n_pos (n_pos + 1) / 2,
    AUROC = U / (n_pos n_neg). This equals sklearn.metrics.roc_auc_score (the trapezoidal area
    under the empirical ROC curve) and needs no threshold. Both classes must be present.
    """
    y = _binary_labels(labels)
    s = _float_1d(scores, y.size, "scores")
    _, n_neg = _both_classes(y)
    order = _binary_order(y)
    return float(_auroc_rows(s[order][None, :], n_neg)[0])


def _rates(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """acc, sensitivity, specificity and F1 from confusion counts (arrays broadcast); a ratio
    with a zero denominator is 0.0, torchmetrics' zero_division default."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)

    return {
        "acc": ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_metrics(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity and F1 at one operating point.

    A case is predicted positive iff score > threshold (strictly, as torchmetrics and
    medmnist.Evaluator). acc = (TP+TN)/N, sensitivity = TP/(TP+FN) (pneumonia recall),
    specificity = TN/(TN+FP) (normal recall), F1 = 2TP/(2TP+FP+FN) of the positive class. A
    ratio whose denominator is zero (e.g. F1 with no positives at all) is 0.0, like torchmetrics,
    so the function is total; single-class labels are allowed here.
    """
    y = _binary_labels(labels)
    s = _float_1d(scores, y.size, "scores")
    t = _check_threshold(threshold)
    pred = s > t
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    return {k: float(v) for k, v in _rates(tp, fp, tn, fn).items()}


def _candidate_thresholds(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds with their true- and false-positive counts under score > t.

    Midpoints between consecutive distinct scores realise every ROC point except "all
    negative" (J = 0, sensitivity 0, never wanted); the largest float below the minimum realises
    "all positive". Counts are measured at each candidate rather than assumed, so a midpoint
    that rounds onto a neighbouring score still reports the ROC point it actually realises.
    """
    distinct = np.unique(scores)
    below = np.nextafter(distinct[0], -np.inf)
    mids = (distinct[:-1] + distinct[1:]) / 2
    candidates = np.concatenate([[below], mids])
    pos = np.sort(scores[labels == 1])
    neg = np.sort(scores[labels == 0])
    tp = pos.size - np.searchsorted(pos, candidates, side="right")
    fp = neg.size - np.searchsorted(neg, candidates, side="right")
    return candidates, tp, fp


def youden_threshold(labels: Any, scores: Any) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 on these data.

    Candidates are the midpoints between consecutive distinct sorted scores plus the largest
    float below the minimum, so `score > t` realises each point of the empirical ROC curve and
    the threshold sits halfway between the two scores it separates (no bias toward either
    class). J is compared exactly, as the integer TP * n_neg - FP * n_pos. Ties in J are broken
    toward the candidate closest to 0.5 (the default operating point, so a flat optimum does not
    move the threshold for nothing), then toward the larger candidate. Call it on validation
    predictions only: it reads nothing but the arrays it is given.
    """
    y = _binary_labels(labels)
    s = _float_1d(scores, y.size, "scores")
    n_pos, n_neg = _both_classes(y)
    candidates, tp, fp = _candidate_thresholds(y, s)
    j = tp.astype(np.int64) * n_neg - fp.astype(np.int64) * n_pos
    best = candidates[j == j.max()]
    # lexsort's last key is primary: distance to 0.5 first, then the larger threshold.
    return float(best[np.lexsort((-best, np.abs(best - 0.5)))[0]])


def sensitivity_threshold(labels: Any, scores: Any, target: float = 0.95) -> float:
    """The largest candidate threshold whose sensitivity on these data is >= target.

    Same candidates as youden_threshold. Sensitivity falls and specificity rises with the
    threshold, so the largest threshold meeting the target is the one with the highest
    specificity among them: the usual "specificity at 95% sensitivity" screening operating
    point. The candidate below the minimum has sensitivity 1, so one always exists. Call it on
    validation predictions only: it reads nothing but the arrays it is given.
    """
    y = _binary_labels(labels)
    s = _float_1d(scores, y.size, "scores")
    if isinstance(target, bool) or not isinstance(target, (int, float, np.floating)):
        raise ValueError(f"target={target!r}; expected a sensitivity in (0, 1], e.g. 0.95")
    if not 0 < target <= 1:
        raise ValueError(f"target={target!r}; expected a sensitivity in (0, 1], e.g. 0.95")
    n_pos, _ = _both_classes(y)
    candidates, tp, _ = _candidate_thresholds(y, s)
    # tp / n_pos and target are both correctly rounded, so equal fractions compare equal.
    return float(candidates[tp / n_pos >= target].max())


# ----------------------------------------------------------------------------------------------
# MedMNIST's definitions


def _medmnist_inputs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:  # medmnist stores labels as (N, 1)
        arr = arr[:, 0]
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probs has shape {p.shape}; expected (N, K) class scores")
    y = _int_labels(arr, n_classes=max(p.shape[1], 2))
    if p.shape[0] != y.size:
        raise ValueError(f"probs has {p.shape[0]} rows; expected the length of labels, {y.size}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs holds {_preview(p[~np.isfinite(p)])}; expected finite values")
    return y, p


def medmnist_acc(labels: Any, probs: Any, threshold: float = 0.5) -> float:
    """medmnist.Evaluator's ACC: binary (K <= 2) mean(probs[:, -1] > threshold == label);
    multi-class mean(argmax == label). Labels (N,) or medmnist's (N, 1)."""
    y, p = _medmnist_inputs(labels, probs)
    t = _check_threshold(threshold)
    if p.shape[1] <= 2:
        return float(np.mean((p[:, -1] > t).astype(np.int64) == y))
    return float(np.mean(p.argmax(axis=1) == y))


def medmnist_auc(labels: Any, probs: Any) -> float:
    """medmnist.Evaluator's AUC: binary (K <= 2) roc_auc of probs[:, -1]; multi-class the mean
    over classes of the one-vs-rest roc_auc of probs[:, k] (each class must be present)."""
    y, p = _medmnist_inputs(labels, probs)
    if p.shape[1] <= 2:
        return auroc(y, p[:, -1])
    return float(np.mean([auroc((y == k).astype(np.int64), p[:, k]) for k in range(p.shape[1])]))
