"""Input checks shared by the statistics: one-line ValueErrors naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Keys of bootstrap_intervals' result besides the thresholds; a threshold may not reuse them.
_RESERVED = ("auroc", "n_resamples", "level", "seed", "method")
# Search range of the temperature: wide enough for any network seen in practice (T = 20 makes
# almost every prediction uniform), and bounded so a degenerate validation set cannot diverge.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# A probability matrix whose rows miss 1 by more than this is not a probability matrix; float32
# softmax outputs written with 9 significant digits are within ~1e-7.
_ROW_SUM_TOL = 1e-3
# Below this a standard error of an AUROC difference (a number in [-1, 1]) is rounding noise.
_SE_ZERO = 1e-12
# run_statistics reports 95% intervals; its signature is fixed by the run code, so no `level`.
LEVEL = 0.95


# ----------------------------------------------------------------------------------------------
# Input checks


def _preview(values: np.ndarray, limit: int = 6) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if values.size > limit else ''}]"


def _array_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} has shape {arr.shape}; expected a 1-D array (N,)")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; expected at least one value")
    return arr


def _int_labels(labels: Any, name: str = "labels", n_classes: int | None = None) -> np.ndarray:
    arr = _array_1d(labels, name)
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected integer class labels")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)) or arr.min() < 0:
        bad = np.unique(arr[~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0)])
        raise ValueError(f"{name} holds {_preview(bad)}; expected integer class labels >= 0")
    arr = arr.astype(np.int64)
    if n_classes is not None and arr.max() >= n_classes:
        raise ValueError(
            f"{name} holds class {arr.max()}; expected labels in 0..{n_classes - 1} "
            f"for {n_classes} classes"
        )
    return arr


def _binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    arr = _array_1d(labels, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1))):
        values = np.unique(arr) if np.issubdtype(arr.dtype, np.number) else arr
        raise ValueError(
            f"{name} holds {_preview(values)}; expected 0/1 labels (1 = positive = pneumonia)"
        )
    return arr.astype(np.int64)


def _both_classes(labels: np.ndarray, name: str = "labels", minimum: int = 1) -> tuple[int, int]:
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos < minimum or n_neg < minimum:
        raise ValueError(
            f"{name} has {n_pos} positives and {n_neg} negatives; expected at least {minimum} "
            "of each class"
        )
    return n_pos, n_neg


def _float_1d(x: Any, n: int, name: str, against: str = "labels") -> np.ndarray:
    arr = _array_1d(x, name)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected real numbers")
    arr = arr.astype(np.float64)
    if arr.size != n:
        raise ValueError(f"{name} has length {arr.size}; expected the length of {against}, {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds {_preview(arr[~np.isfinite(arr)])}; expected finite values")
    return arr


def _matrix(x: Any, n: int | None, name: str, against: str = "labels") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"{name} has shape {arr.shape}; expected (N, K) with K >= 2 classes")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected real numbers")
    arr = arr.astype(np.float64)
    if n is not None and arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} rows (shape {arr.shape}); expected the length of "
            f"{against}, {n}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has shape {arr.shape}; expected at least one row")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds {_preview(arr[~np.isfinite(arr)])}; expected finite values")
    return arr


def _probs(x: Any, n: int, name: str = "probs") -> np.ndarray:
    arr = _matrix(x, n, name)
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(
            f"{name} holds values in [{arr.min():.6g}, {arr.max():.6g}]; expected probabilities "
            "in [0, 1]"
        )
    sums = arr.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > _ROW_SUM_TOL:
        raise ValueError(
            f"{name} row {worst} sums to {sums[worst]:.6g}; expected rows of class "
            "probabilities summing to 1 (pass softmax(logits))"
        )
    return arr


def _labels_and_probs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    # The shape of probs first: it fixes K, against which the labels are then checked.
    k = _matrix(probs, None, "probs").shape[1]
    y = _int_labels(labels, n_classes=k)
    return y, _probs(probs, y.size)


def _check_level(level: Any, name: str = "level", example: float = 0.95) -> float:
    if (
        isinstance(level, bool)
        or not isinstance(level, (int, float, np.floating))
        or not 0 < level < 1
    ):
        raise ValueError(f"{name}={level!r}; expected a number in (0, 1), e.g. {example}")
    return float(level)


def _check_n_resamples(n_resamples: Any) -> int:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise ValueError(f"n_resamples={n_resamples!r}; expected an integer >= 1, e.g. 2000")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r}; expected an integer >= 1, e.g. 2000")
    return int(n_resamples)


def _check_seed(seed: Any) -> int:
    # An int, not a Generator: the seed is recorded next to the results so they can be rebuilt.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected an integer >= 0")
    return int(seed)


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}; expected an integer >= 1, e.g. 15")
    return int(n_bins)


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise ValueError(f"{name}={threshold!r}; expected a real number, e.g. 0.5")
    if math.isnan(float(threshold)):
        raise ValueError(f"{name}={threshold!r}; expected a real number, e.g. 0.5")
    return float(threshold)
