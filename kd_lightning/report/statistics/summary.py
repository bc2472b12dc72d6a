"""run_statistics: everything summary.json records about one run, from its predictions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kd_lightning.report.statistics._checks import (
    LEVEL,
    _both_classes,
    _check_n_bins,
    _check_n_resamples,
    _check_seed,
    _int_labels,
    _matrix,
)
from kd_lightning.report.statistics.bootstrap import (
    _interval,
    _macro_auroc_rows,
    bootstrap_intervals,
    stratified_bootstrap_indices,
)
from kd_lightning.report.statistics.calibration import calibration, reliability, softmax
from kd_lightning.report.statistics.discrimination import (
    auroc,
    medmnist_auc,
    sensitivity_threshold,
    threshold_metrics,
    youden_threshold,
)

# ----------------------------------------------------------------------------------------------
# Everything one run reports


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays to Python floats, ints and lists (NaN to None) for JSON."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    return obj


def _threshold_key(target: float) -> str:
    percent = target * 100
    if abs(percent - round(percent)) < 1e-9:
        return f"sens{int(round(percent))}"
    return f"sens{percent:g}"


def _multiclass_intervals(
    labels: np.ndarray, probs: np.ndarray, n_resamples: int, level: float, seed: int
) -> dict[str, Any]:
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    if np.any(counts == 0):
        raise ValueError(
            f"test_labels has class counts {counts.tolist()}; expected every one of the {k} "
            "classes for the macro AUROC"
        )
    idx = stratified_bootstrap_indices(labels, n_resamples, seed)
    right = probs.argmax(axis=1) == labels
    point_auc = medmnist_auc(labels, probs)
    return {
        "acc": _interval(float(right.mean()), right[idx].mean(axis=1), level),
        "auroc_macro": _interval(point_auc, _macro_auroc_rows(labels, probs, idx), level),
        "auroc_per_class": [auroc((labels == c).astype(np.int64), probs[:, c]) for c in range(k)],
    }


def run_statistics(
    val_labels: Any,
    val_logits: Any,
    test_labels: Any,
    test_logits: Any,
    target_sensitivity: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Everything one run reports, as JSON-serialisable plain floats, ints, lists and dicts.

    Works for the binary (K = 2) and the 3-class task. The pneumonia score is
    1 - softmax(logits)[:, 0] (class 0 is normal in both; p1 for K = 2) against labels != 0.
    Operating points are chosen on validation only: thresholds = {"0.5": 0.5, "youden": ...,
    "sens95": ...} (key "sens<target * 100>"), and applied unchanged to the test set.

    Keys: thresholds; test (bootstrap_intervals of the test scores at those thresholds: AUROC
    and acc / sensitivity / specificity / F1 with stratified percentile 95% intervals);
    val_at_thresholds (validation threshold_metrics at each threshold); val_auroc; calibration
    (calibration(): test ECE / Brier / NLL before and after temperature scaling fitted on
    validation); reliability ({"raw", "scaled"}: test reliability-diagram bins, None in empty
    bins); for K > 2 multiclass ({"acc": argmax accuracy, "auroc_macro": mean one-vs-rest
    AUROC, each {"value", "low", "high"} from a bootstrap stratified by class, and
    "auroc_per_class"}); target_sensitivity, n_resamples, level, seed, n_bins, n_classes,
    n_val, n_test, class_counts_val, class_counts_test, positive_score.
    """
    val_z = _matrix(val_logits, None, "val_logits")
    test_z = _matrix(test_logits, None, "test_logits")
    k = val_z.shape[1]
    if test_z.shape[1] != k:
        raise ValueError(
            f"test_logits has {test_z.shape[1]} classes; expected the {k} of val_logits"
        )
    val_y = _int_labels(val_labels, "val_labels", k)
    test_y = _int_labels(test_labels, "test_labels", k)
    _matrix(val_z, val_y.size, "val_logits", "val_labels")
    _matrix(test_z, test_y.size, "test_logits", "test_labels")
    if isinstance(target_sensitivity, bool) or not isinstance(
        target_sensitivity, (int, float, np.floating)
    ):
        raise ValueError(
            f"target_sensitivity={target_sensitivity!r}; expected a number in (0, 1], e.g. 0.95"
        )
    if not 0 < target_sensitivity <= 1:
        raise ValueError(
            f"target_sensitivity={target_sensitivity!r}; expected a number in (0, 1], e.g. 0.95"
        )
    n_resamples = _check_n_resamples(n_resamples)
    seed = _check_seed(seed)
    n_bins = _check_n_bins(n_bins)

    val_p, test_p = softmax(val_z), softmax(test_z)
    val_bin, test_bin = (val_y != 0).astype(np.int64), (test_y != 0).astype(np.int64)
    val_score, test_score = 1.0 - val_p[:, 0], 1.0 - test_p[:, 0]
    for name, y in (("val_labels", val_bin), ("test_labels", test_bin)):
        _both_classes(y, name)
    thresholds = {
        "0.5": 0.5,
        "youden": youden_threshold(val_bin, val_score),
        _threshold_key(float(target_sensitivity)): sensitivity_threshold(
            val_bin, val_score, float(target_sensitivity)
        ),
    }
    temperature_stats = calibration(val_y, val_z, test_y, test_z, n_bins)
    out: dict[str, Any] = {
        "thresholds": thresholds,
        "test": bootstrap_intervals(test_bin, test_score, thresholds, n_resamples, LEVEL, seed),
        "val_at_thresholds": {
            name: threshold_metrics(val_bin, val_score, t) for name, t in thresholds.items()
        },
        "val_auroc": auroc(val_bin, val_score),
        "calibration": temperature_stats,
        "reliability": {
            "raw": reliability(test_y, test_p, n_bins),
            "scaled": reliability(
                test_y, softmax(test_z, temperature_stats["temperature"]), n_bins
            ),
        },
    }
    if k > 2:
        out["multiclass"] = _multiclass_intervals(test_y, test_p, n_resamples, LEVEL, seed)
    out.update(
        target_sensitivity=float(target_sensitivity),
        n_resamples=n_resamples,
        level=LEVEL,
        seed=seed,
        n_bins=n_bins,
        n_classes=k,
        n_val=int(val_y.size),
        n_test=int(test_y.size),
        class_counts_val=np.bincount(val_y, minlength=k).tolist(),
        class_counts_test=np.bincount(test_y, minlength=k).tolist(),
        positive_score="1 - softmax(logits)[:, 0]",
    )
    return _plain(out)
