"""The statistics behind every number the project reports, in numpy and scipy only.

Torch-free on purpose: the report recomputes everything from predictions copied off a cluster
(summary.json, predictions/*.csv) on machines without torch, and one implementation serves both
the run (which stores the results in summary.json) and the report, so the two cannot disagree.

Conventions
-----------
Binary: `labels` (N,) of 0/1 with 1 = positive = pneumonia; `scores` (N,) = probability of the
positive class; a case is predicted positive iff ``score > threshold`` (strictly greater, as
torchmetrics and medmnist.Evaluator do). Multi-class: `labels` (N,) in 0..K-1, `probs` and
`logits` (N, K). In both the 2- and the 3-class task class 0 is "normal", so the pneumonia score
is 1 - softmax(logits)[:, 0] (= p1 for K = 2).

What is estimated, and why this way
-----------------------------------
- AUROC is the Mann-Whitney statistic with midranks (a tied positive/negative pair counts 1/2),
  which is exactly the trapezoidal area under the empirical ROC curve (sklearn's roc_auc_score).
- Operating points are chosen on validation predictions only (Youden's J and a target
  sensitivity) and then applied unchanged to the test set, so test metrics at those thresholds
  are not optimistically biased by choosing the threshold on the data they are measured on.
- Uncertainty over test images is a stratified percentile bootstrap: positives and negatives
  are resampled separately with their counts kept, so every resample has both classes (AUROC,
  sensitivity and specificity are always defined) and the class balance of the fixed test set
  is not itself treated as random. All resamples are evaluated at once on an
  (n_resamples, N) index matrix.
- Two models on the same test images are compared with paired tests: DeLong's test for AUROC,
  the exact McNemar test for accuracy, and a paired bootstrap applying one index matrix to both.
- Across training seeds, the per-seed paired differences are summarised with a Student t
  interval and a one-sample t-test; several comparisons are adjusted with Holm's step-down.
- Calibration is the top-label ECE (Guo et al. 2017), the Brier score and one temperature
  fitted on validation logits by minimum negative log-likelihood.

Every function checks its input and raises ValueError with one line naming the argument, the
value received and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, special, stats

THRESHOLD_METRICS = ("acc", "sensitivity", "specificity", "f1")
BOOTSTRAP_METHOD = "stratified percentile bootstrap"
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


# ----------------------------------------------------------------------------------------------
# Discrimination and operating points


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
# Bootstrap


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


# ----------------------------------------------------------------------------------------------
# Across training seeds, and multiple comparisons


def _finite_values(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}={values!r}; expected a 1-D sequence of numbers") from err
    arr = _array_1d(arr, name)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds {_preview(arr[~np.isfinite(arr)])}; expected finite values")
    return arr


def t_interval(values: Any, level: float = 0.95) -> dict[str, Any]:
    """Mean over seeds with a Student t confidence interval.

    mean ± t_{(1+level)/2, n-1} * std / sqrt(n), std the sample standard deviation (ddof = 1).
    Assumes the values are independent replicates (one per training seed) from a roughly normal
    distribution; t rather than normal because n is a handful of seeds. std = 0 for n = 1, and
    low/high are None for n < 2 (no spread to estimate). Returns mean, std, low, high, n, level.
    """
    x = _finite_values(values, "values")
    level = _check_level(level)
    n = int(x.size)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "std": 0.0, "low": None, "high": None, "n": n, "level": level}
    std = float(x.std(ddof=1))
    # Computed directly rather than with stats.t.interval, which returns NaN for a zero std.
    half = float(stats.t.ppf((1 + level) / 2, df=n - 1)) * std / math.sqrt(n)
    return {
        "mean": mean,
        "std": std,
        "low": mean - half,
        "high": mean + half,
        "n": n,
        "level": level,
    }


def seed_test(diffs: Any) -> dict[str, Any]:
    """One-sample t-test of per-seed paired differences (method - base) against 0.

    The seeds are replicates of the training procedure evaluated on one fixed test set, so this
    tests whether the mean difference over training randomness is non-zero on this test set
    (two-sided scipy.stats.ttest_1samp, df = n - 1; assumes roughly normal, independent
    per-seed differences). Per-seed DeLong / McNemar tests instead answer a different question:
    test-image sampling for one trained pair. Combining per-seed p-values by Fisher or Stouffer
    would assume independent test sets, which the seeds do not have (the same 624 images), so
    that is not done.

    Returns n, mean, std (ddof = 1; 0 for n = 1), wins (seeds with diff > 0), t and p. t and p
    are None for n < 2. When all differences are equal t is None (zero variance) and p is 0.0
    if they are non-zero (every seed moved the same way by the same amount), 1.0 if all zero.
    """
    x = _finite_values(diffs, "diffs")
    n = int(x.size)
    out: dict[str, Any] = {
        "n": n,
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if n > 1 else 0.0,
        "wins": int(np.sum(x > 0)),
        "t": None,
        "p": None,
    }
    if n < 2:
        return out
    if np.all(x == x[0]):
        out["p"] = 0.0 if x[0] != 0 else 1.0
        return out
    result = stats.ttest_1samp(x, 0.0)
    out["t"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    With the m non-None p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value is
    max_{j <= i} min(1, (m - j + 1) p_(j)): monotone in the sorted order and capped at 1.
    Rejecting where the adjusted p < alpha controls the family-wise error rate at alpha under
    any dependence between the tests (the methods share a base and a test set), and is never
    less powerful than Bonferroni. None entries (tests that could not be run) are passed through
    and not counted in m.
    """
    if isinstance(pvalues, (str, bytes)) or not isinstance(pvalues, Sequence | np.ndarray):
        raise ValueError(f"pvalues={pvalues!r}; expected a sequence of p-values or None")
    present = []
    for i, p in enumerate(pvalues):
        if p is None:
            continue
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 <= p <= 1:
            raise ValueError(f"pvalues[{i}]={p!r}; expected a p-value in [0, 1] or None")
        present.append((i, float(p)))
    out: list[float | None] = [None] * len(pvalues)
    m = len(present)
    running = 0.0
    for rank, (i, p) in enumerate(sorted(present, key=lambda item: item[1])):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(diff: float, p_adjusted: float | None, alpha: float = 0.05) -> str:
    """The word for one comparison of a method (A) with base (B).

    Returns "better" or "worse" (by the sign of diff = A - B) when p_adjusted < alpha, else
    "not distinguishable" (also when p_adjusted is None or diff is 0). A non-significant
    difference is reported as not distinguishable rather than "equal": the test cannot show
    equality, only fail to detect a difference.
    """
    alpha = _check_level(alpha, "alpha", 0.05)
    if p_adjusted is None or p_adjusted >= alpha or diff == 0:
        return "not distinguishable"
    return "better" if diff > 0 else "worse"


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
    starts = np.concatenate([[0], np.cumsum(counts)])
    per_class = []
    for c in range(k):
        # Move class c's block to the end so _auroc_rows sees it as the positives.
        cols = np.r_[0 : starts[c], starts[c + 1] : starts[-1], starts[c] : starts[c + 1]]
        per_class.append(_auroc_rows(probs[:, c][idx[:, cols]], labels.size - counts[c]))
    point_auc = medmnist_auc(labels, probs)
    return {
        "acc": _interval(float(right.mean()), right[idx].mean(axis=1), level),
        "auroc_macro": _interval(point_auc, np.mean(per_class, axis=0), level),
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
