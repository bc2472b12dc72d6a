"""Two models on the same test images: DeLong, McNemar, paired bootstrap."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from kd_lightning.report.statistics._checks import (
    _SE_ZERO,
    _binary_labels,
    _both_classes,
    _check_level,
    _float_1d,
    _int_labels,
)
from kd_lightning.report.statistics.bootstrap import (
    _macro_auroc_rows,
    _percentiles,
    stratified_bootstrap_indices,
)
from kd_lightning.report.statistics.discrimination import _auroc_rows, auroc, medmnist_auc

# ----------------------------------------------------------------------------------------------
# Paired comparisons of two models on the same test images


def _paired_scores(labels: Any, scores_a: Any, scores_b: Any) -> tuple[np.ndarray, ...]:
    y = _binary_labels(labels)
    a = _float_1d(scores_a, y.size, "scores_a")
    b = _float_1d(scores_b, y.size, "scores_b")
    return y, a, b


def delong_test(labels: Any, scores_a: Any, scores_b: Any, level: float = 0.95) -> dict[str, Any]:
    """DeLong's test for the difference of two correlated AUROCs (A - B) on the same images.

    DeLong, DeLong & Clarke-Pearson (1988): each AUROC is a two-sample U-statistic; its variance
    and the covariance between the two models follow from the structural components
    (placements) V10_i = fraction of negatives a positive i outranks and V01_j = fraction of
    positives that outrank negative j (ties 1/2), computed from midranks as in Sun & Xu (2014)
    in O(N log N) instead of O(n_pos n_neg). Var(diff) = s2(V10_a - V10_b) / n_pos +
    s2(V01_a - V01_b) / n_neg (sample variances), z = diff / se is referred to N(0, 1)
    (two-sided p) and the interval is diff -/+ z_{(1+level)/2} se. Assumes independent images
    and large enough classes for the normal approximation; it is the standard test for paired
    ROC curves and, unlike the bootstrap, needs no resampling.

    se = 0 (e.g. identical inputs): z = 0 and p = 1 when diff = 0, else z = +/-inf and p = 0.
    Returns auroc_a, auroc_b, diff, se, low, high, z, p, level.
    """
    y, a, b = _paired_scores(labels, scores_a, scores_b)
    n_pos, n_neg = _both_classes(y, minimum=2)
    level = _check_level(level)
    pos, neg = np.vstack([a[y == 1], b[y == 1]]), np.vstack([a[y == 0], b[y == 0]])
    ranks_all = stats.rankdata(np.hstack([pos, neg]), axis=1)
    v10 = (ranks_all[:, :n_pos] - stats.rankdata(pos, axis=1)) / n_neg
    v01 = 1.0 - (ranks_all[:, n_pos:] - stats.rankdata(neg, axis=1)) / n_pos
    # The variance of the differenced components equals the covariance form
    # S_aa + S_bb - 2 S_ab, and is exactly 0 for identical inputs (no cancellation).
    var = np.var(v10[0] - v10[1], ddof=1) / n_pos + np.var(v01[0] - v01[1], ddof=1) / n_neg
    se = math.sqrt(max(float(var), 0.0))
    auroc_a, auroc_b = auroc(y, a), auroc(y, b)
    diff = auroc_a - auroc_b
    if se < _SE_ZERO:
        se = 0.0
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0 else 0.0
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = float(stats.norm.ppf((1 + level) / 2)) * se
    return {
        "auroc_a": auroc_a,
        "auroc_b": auroc_b,
        "diff": diff,
        "se": se,
        "low": diff - half,
        "high": diff + half,
        "z": float(z),
        "p": min(1.0, p),
        "level": level,
    }


def mcnemar_test(labels: Any, pred_a: Any, pred_b: Any) -> dict[str, Any]:
    """Exact McNemar test: do A and B have the same accuracy on the same images?

    Only discordant images carry information: a_only = A right and B wrong, b_only = the
    reverse. Under H0 each discordant image is equally likely either way, so a_only ~
    Binomial(a_only + b_only, 1/2); p is the exact two-sided binomial test
    (scipy.stats.binomtest), chosen over the chi-square approximation because the number of
    discordant images between two similar models is often small. p = 1 when there are no
    discordant images. diff = acc A - acc B = (a_only - b_only) / N. Works for any class labels
    (predictions compared with labels for equality).
    Returns a_only, b_only, n_discordant, p, diff, acc_a, acc_b.
    """
    y = _int_labels(labels)
    pa = _int_labels(pred_a, "pred_a")
    pb = _int_labels(pred_b, "pred_b")
    for name, pred in (("pred_a", pa), ("pred_b", pb)):
        if pred.size != y.size:
            raise ValueError(
                f"{name} has length {pred.size}; expected the length of labels, {y.size}"
            )
    right_a, right_b = pa == y, pb == y
    a_only = int(np.sum(right_a & ~right_b))
    b_only = int(np.sum(~right_a & right_b))
    n = a_only + b_only
    p = float(stats.binomtest(a_only, n, 0.5).pvalue) if n > 0 else 1.0
    return {
        "a_only": a_only,
        "b_only": b_only,
        "n_discordant": n,
        "p": min(1.0, p),
        "diff": (a_only - b_only) / y.size,
        "acc_a": float(right_a.mean()),
        "acc_b": float(right_b.mean()),
    }


def _paired_summary(
    point: float, diffs: np.ndarray, level: float, n_resamples: int, seed: int
) -> dict[str, Any]:
    """diff, percentile interval and two-sided bootstrap p-value of resampled differences.

    p = 2 min(P*(d <= 0), P*(d >= 0)), capped at 1: twice the smaller tail of the bootstrap
    distribution beyond 0, i.e. the smallest two-sided level at which the percentile interval
    would exclude 0. Its resolution is 1 / n_resamples; p = 0 means no resample crossed 0.
    """
    low, high = _percentiles(diffs, level)
    tail = min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
    return {
        "diff": float(point),
        "low": low,
        "high": high,
        "p": min(1.0, 2 * tail),
        "n_resamples": n_resamples,
        "level": level,
        "seed": seed,
    }


def paired_bootstrap(
    labels: Any,
    scores_a: Any,
    scores_b: Any,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired stratified bootstrap of statistic(A) - statistic(B) on the same images.

    The same resample indices (stratified by label, see stratified_bootstrap_indices) are
    applied to both models, so the image-level correlation between A and B is kept and cancels
    in the difference; `statistic(labels, scores) -> float` is called once per model and
    resample (a Python loop: use paired_bootstrap_auroc / paired_bootstrap_accuracy for speed).
    `scores_a` and `scores_b` are indexed along their first axis (N,) or (N, K). Returns diff
    (on the original data), low/high (percentile interval) and p = 2 min(P*(d <= 0),
    P*(d >= 0)) capped at 1 (resolution 1 / n_resamples), plus n_resamples, level and seed.
    """
    y = _int_labels(labels)
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    for name, arr in (("scores_a", a), ("scores_b", b)):
        if arr.ndim < 1 or arr.shape[0] != y.size:
            raise ValueError(
                f"{name} has shape {arr.shape}; expected the length of labels, {y.size}, first"
            )
    if not callable(statistic):
        raise ValueError(f"statistic={statistic!r}; expected a function (labels, scores) -> float")
    level = _check_level(level)
    idx = stratified_bootstrap_indices(y, n_resamples, seed)
    diffs = np.array(
        [float(statistic(y[row], a[row])) - float(statistic(y[row], b[row])) for row in idx]
    )
    point = float(statistic(y, a)) - float(statistic(y, b))
    return _paired_summary(point, diffs, level, int(n_resamples), int(seed))


def paired_bootstrap_auroc(
    labels: Any,
    scores_a: Any,
    scores_b: Any,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """paired_bootstrap for AUROC(A) - AUROC(B), vectorised over resamples (midranks per row of
    the shared index matrix); the same numbers as paired_bootstrap(..., auroc) with the same
    seed, bit for bit, at a fraction of the time."""
    y, a, b = _paired_scores(labels, scores_a, scores_b)
    _, n_neg = _both_classes(y)
    level = _check_level(level)
    idx = stratified_bootstrap_indices(y, n_resamples, seed)
    diffs = _auroc_rows(a[idx], n_neg) - _auroc_rows(b[idx], n_neg)
    return _paired_summary(auroc(y, a) - auroc(y, b), diffs, level, int(n_resamples), int(seed))


def paired_bootstrap_macro_auroc(
    labels: Any,
    probs_a: Any,
    probs_b: Any,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """paired_bootstrap for macro AUROC(A) - macro AUROC(B) of two (N, K) probability matrices,
    K > 2: the mean over classes of the one-vs-rest AUROC of probs[:, k] (medmnist.Evaluator's
    multi-class AUC, medmnist_auc). Vectorised over resamples; the same numbers as
    paired_bootstrap(..., medmnist_auc) with the same seed. Every class must be present (the
    resamples are stratified by class, so then it is in every resample). There is no DeLong
    test for a mean of K correlated one-vs-rest AUROCs, hence the bootstrap."""
    y = _int_labels(labels)
    arrays = []
    for name, arr in (("probs_a", probs_a), ("probs_b", probs_b)):
        p = np.asarray(arr, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != y.size or p.shape[1] < 3:
            raise ValueError(
                f"{name} has shape {p.shape}; expected ({y.size}, K) with K > 2 classes"
            )
        arrays.append(p)
    a, b = arrays
    if a.shape != b.shape:
        raise ValueError(f"probs_b has shape {b.shape}; expected the shape of probs_a, {a.shape}")
    counts = np.bincount(y, minlength=a.shape[1])
    if counts.size != a.shape[1] or np.any(counts == 0):
        raise ValueError(
            f"labels have class counts {counts.tolist()}; expected every one of the "
            f"{a.shape[1]} classes"
        )
    level = _check_level(level)
    idx = stratified_bootstrap_indices(y, n_resamples, seed)
    diffs = _macro_auroc_rows(y, a, idx) - _macro_auroc_rows(y, b, idx)
    point = medmnist_auc(y, a) - medmnist_auc(y, b)
    return _paired_summary(point, diffs, level, int(n_resamples), int(seed))


def paired_bootstrap_accuracy(
    labels: Any,
    pred_a: Any,
    pred_b: Any,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """paired_bootstrap for accuracy(A) - accuracy(B) from hard predictions (e.g. 0/1 from
    score > threshold, or argmax classes), vectorised over resamples; resamples are stratified
    by label as everywhere else."""
    y = _int_labels(labels)
    pa = _int_labels(pred_a, "pred_a")
    pb = _int_labels(pred_b, "pred_b")
    for name, pred in (("pred_a", pa), ("pred_b", pb)):
        if pred.size != y.size:
            raise ValueError(
                f"{name} has length {pred.size}; expected the length of labels, {y.size}"
            )
    level = _check_level(level)
    idx = stratified_bootstrap_indices(y, n_resamples, seed)
    right_a, right_b = pa == y, pb == y
    diffs = right_a[idx].mean(axis=1) - right_b[idx].mean(axis=1)
    point = float(right_a.mean()) - float(right_b.mean())
    return _paired_summary(point, diffs, level, int(n_resamples), int(seed))
