"""Expected calibration error, Brier score, reliability bins, temperature scaling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, special

from kd_lightning.report.statistics._checks import (
    TEMPERATURE_BOUNDS,
    _check_n_bins,
    _int_labels,
    _labels_and_probs,
    _matrix,
)

# ----------------------------------------------------------------------------------------------
# Calibration


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, stable: the row maximum is subtracted before
    exponentiating, so no logit overflows exp and the largest class keeps probability > 0."""
    z = _matrix(logits, None, "logits")
    t = _check_temperature(temperature)
    if t != 1.0:
        z = z / t
    shifted = z - z.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
        raise ValueError(f"temperature={temperature!r}; expected a finite number > 0")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r}; expected a finite number > 0")
    return float(temperature)


def _bins(confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    # Bins are [lower, upper) on n_bins + 1 equal-width edges, the last one closed so that a
    # confidence of exactly 1.0 (a saturated softmax) lands in it rather than outside.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.searchsorted(edges[1:-1], confidence, side="right")


def reliability(labels: Any, probs: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin data of a (top-label) reliability diagram.

    Confidence = max class probability, prediction = argmax (first class on ties); n_bins
    equal-width bins [lower, upper) on [0, 1], the last bin closed at 1. Returns arrays of
    length n_bins: bin_lower, bin_upper, count, accuracy (fraction of correct predictions) and
    confidence (mean confidence); accuracy and confidence are NaN in empty bins.
    """
    y, p = _labels_and_probs(labels, probs)
    n_bins = _check_n_bins(n_bins)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges, which = _bins(confidence, n_bins)
    count = np.bincount(which, minlength=n_bins)
    hit = np.bincount(which, weights=correct, minlength=n_bins)
    conf = np.bincount(which, weights=confidence, minlength=n_bins)
    full = count > 0
    nan = np.full(n_bins, np.nan)
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "count": count,
        "accuracy": np.divide(hit, count, out=nan.copy(), where=full),
        "confidence": np.divide(conf, count, out=nan.copy(), where=full),
    }


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017).

    ECE = sum over bins b of |b| / N * |accuracy(b) - mean confidence(b)|, with confidence = max
    class probability, accuracy = fraction of argmax predictions that are right, and n_bins
    equal-width bins [lower, upper) on [0, 1] (the last closed, so 1.0 falls in it). The
    standard definition, so values are comparable with the literature; it is a binned,
    slightly biased estimate (a perfectly calibrated model scores > 0 on finite data), which is
    why the Brier score is reported next to it.
    """
    bins = reliability(labels, probs, n_bins)
    count = bins["count"]
    full = count > 0
    gap = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    return float(np.sum(count[full] * gap) / count.sum())


def brier_score(labels: Any, probs: Any) -> float:
    """Brier score; lower is better.

    Binary (K = 2): mean over images of (p1 - y)^2, the positive-class form that equals
    sklearn.metrics.brier_score_loss (range [0, 1]). K > 2: mean over images of
    sum_k (p_k - onehot_k)^2, Brier's original multi-class form (range [0, 2]); for K = 2 that
    form would be exactly twice the binary one, which is why the binary case uses p1. A proper
    scoring rule: unlike ECE it needs no binning and rewards sharpness as well as calibration.
    """
    y, p = _labels_and_probs(labels, probs)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _nll(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    return float(np.mean(special.logsumexp(z, axis=1) - z[np.arange(labels.size), labels]))


def negative_log_likelihood(labels: Any, logits: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy, nats) of softmax(logits / temperature)."""
    z = _matrix(logits, None, "logits")
    y = _int_labels(labels, n_classes=z.shape[1])
    if y.size != z.shape[0]:
        raise ValueError(f"logits has {z.shape[0]} rows; expected the length of labels, {y.size}")
    return _nll(y, z, _check_temperature(temperature))


def fit_temperature(labels: Any, logits: Any) -> float:
    """Temperature scaling (Guo et al. 2017): the one scalar T > 0 minimising the mean negative
    log-likelihood of softmax(logits / T) on the given (validation) data.

    Dividing all logits by one T > 0 keeps every argmax, so accuracy is untouched (and for
    K = 2 the ranking of p1, hence AUROC); only the confidence is rescaled, and one parameter
    hardly overfits a validation set of a few hundred images. The NLL is convex in 1/T, hence
    unimodal in log T, so a bounded scalar search (scipy.optimize.minimize_scalar, method
    "bounded", on log T over T in [0.05, 20]) finds the global minimum in the range; searching
    log T makes the step sizes relative.
    """
    z = _matrix(logits, None, "logits")
    y = _int_labels(labels, n_classes=z.shape[1])
    if y.size != z.shape[0]:
        raise ValueError(f"logits has {z.shape[0]} rows; expected the length of labels, {y.size}")
    result = optimize.minimize_scalar(
        lambda log_t: _nll(y, z, math.exp(log_t)),
        bounds=tuple(math.log(b) for b in TEMPERATURE_BOUNDS),
        method="bounded",
        options={"xatol": 1e-7},
    )
    return float(math.exp(result.x))


def calibration(
    val_labels: Any,
    val_logits: Any,
    test_labels: Any,
    test_logits: Any,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Test-set calibration before and after temperature scaling fitted on validation only.

    Returns ece, brier, nll (test, T = 1), temperature (fitted on val_labels / val_logits),
    ece_scaled, brier_scaled, nll_scaled (test, softmax(test_logits / T)) and n_bins. Fitting T
    on validation keeps the after-scaling numbers honest estimates on unseen data.
    """
    n_bins = _check_n_bins(n_bins)
    val_z = _matrix(val_logits, None, "val_logits")
    test_z = _matrix(test_logits, None, "test_logits")
    if val_z.shape[1] != test_z.shape[1]:
        raise ValueError(
            f"test_logits has {test_z.shape[1]} classes; expected the {val_z.shape[1]} of "
            "val_logits"
        )
    val_y = _int_labels(val_labels, "val_labels", val_z.shape[1])
    test_y = _int_labels(test_labels, "test_labels", test_z.shape[1])
    _matrix(val_z, val_y.size, "val_logits", "val_labels")
    _matrix(test_z, test_y.size, "test_logits", "test_labels")
    temperature = fit_temperature(val_y, val_z)
    raw, scaled = softmax(test_z), softmax(test_z, temperature)
    return {
        "ece": expected_calibration_error(test_y, raw, n_bins),
        "brier": brier_score(test_y, raw),
        "nll": _nll(test_y, test_z, 1.0),
        "temperature": temperature,
        "ece_scaled": expected_calibration_error(test_y, scaled, n_bins),
        "brier_scaled": brier_score(test_y, scaled),
        "nll_scaled": _nll(test_y, test_z, temperature),
        "n_bins": n_bins,
    }
