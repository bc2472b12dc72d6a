"""Stratified percentile bootstrap intervals over test images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kd_lightning.report.statistics._checks import (
    _RESERVED,
    _binary_labels,
    _both_classes,
    _check_level,
    _check_n_resamples,
    _check_seed,
    _check_threshold,
    _float_1d,
    _int_labels,
)
from kd_lightning.report.statistics.discrimination import (
    THRESHOLD_METRICS,
    _auroc_rows,
    _rates,
    auroc,
    threshold_metrics,
)

# ----------------------------------------------------------------------------------------------
# Bootstrap


BOOTSTRAP_METHOD = "stratified percentile bootstrap"


def stratified_bootstrap_indices(labels: Any, n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_resamples, N) index matrix of a stratified bootstrap over images.

    Each class's images are drawn with replacement from that class only, keeping its count; the
    columns are grouped by class in ascending class order (for binary labels: negatives, then
    positives), so ``labels[idx[b]]`` is the sorted labels for every row b. Deterministic given
    `seed` (numpy's default_rng; the classes are drawn in ascending order). Every bootstrap in
    this module draws through here, so a paired comparison and a slow reference loop can reuse
    exactly the same resamples.
    """
    y = _int_labels(labels)
    n = _check_n_resamples(n_resamples)
    rng = np.random.default_rng(_check_seed(seed))
    blocks = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        blocks.append(members[rng.integers(0, members.size, size=(n, members.size))])
    return np.concatenate(blocks, axis=1)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _interval(value: float, resampled: np.ndarray, level: float) -> dict[str, float]:
    low, high = _percentiles(resampled, level)
    return {"value": float(value), "low": low, "high": high}


def _macro_auroc_rows(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(n_resamples,) macro one-vs-rest AUROC (medmnist.Evaluator's multi-class AUC) of every
    row of `idx`, a stratified_bootstrap_indices matrix of `labels` (every class present)."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)])
    per_class = []
    for c in range(k):
        # Move class c's block to the end so _auroc_rows sees it as the positives.
        cols = np.r_[0 : starts[c], starts[c + 1] : starts[-1], starts[c] : starts[c + 1]]
        per_class.append(_auroc_rows(probs[:, c][idx[:, cols]], labels.size - counts[c]))
    return np.mean(per_class, axis=0)


def bootstrap_intervals(
    labels: Any,
    scores: Any,
    thresholds: Mapping[str, float],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Test-set AUROC and threshold metrics with stratified percentile bootstrap intervals.

    Resampling unit: the image (the test images are the only source of randomness for one
    trained model). Positives and negatives are resampled separately with replacement, keeping
    their counts (stratified), so AUROC, sensitivity and specificity are defined in every
    resample and the fixed class balance is not treated as random. The interval is the
    percentile interval: the (1-level)/2 and (1+level)/2 quantiles (numpy's linear
    interpolation) of the statistic over resamples; `value` is the point estimate on the
    original data. Percentile intervals assume the bootstrap distribution approximates that of
    the estimator around the truth; they are transformation-respecting and stay inside [0, 1].

    Returns {"auroc": {"value", "low", "high"}, name: {"acc"|"sensitivity"|"specificity"|"f1":
    {"value", "low", "high"}} for each named threshold, "n_resamples", "level", "seed",
    "method"}.

    Vectorised numpy on an (n_resamples, N) index matrix (AUROC from per-row midranks) rather
    than torchmetrics' BootStrapper: BootStrapper resamples without stratification (AUROC can be
    undefined in a resample), runs one metric update per resample, and needs torch, while the
    report must stay torch-free. Runs in ~0.2 s for N = 624, 2000 resamples, 3 thresholds.
    """
    y = _binary_labels(labels)
    s = _float_1d(scores, y.size, "scores")
    n_pos, n_neg = _both_classes(y)
    level = _check_level(level)
    if not isinstance(thresholds, Mapping):
        raise ValueError(
            f"thresholds={thresholds!r}; expected a mapping of names to thresholds, e.g. "
            "{'0.5': 0.5}"
        )
    checked = {}
    for name, t in thresholds.items():
        if not isinstance(name, str) or name in _RESERVED:
            raise ValueError(
                f"thresholds has the name {name!r}; expected strings other than {list(_RESERVED)}"
            )
        checked[name] = _check_threshold(t, f"thresholds[{name!r}]")
    idx = stratified_bootstrap_indices(y, n_resamples, seed)
    resampled = s[idx]
    out: dict[str, Any] = {
        "auroc": _interval(auroc(y, s), _auroc_rows(resampled, n_neg), level),
    }
    for name, t in checked.items():
        positive = resampled > t
        fp = positive[:, :n_neg].sum(axis=1)
        tp = positive[:, n_neg:].sum(axis=1)
        rates = _rates(tp, fp, n_neg - fp, n_pos - tp)
        point = threshold_metrics(y, s, t)
        out[name] = {k: _interval(point[k], rates[k], level) for k in THRESHOLD_METRICS}
    out.update(n_resamples=int(n_resamples), level=level, seed=int(seed), method=BOOTSTRAP_METHOD)
    return out
