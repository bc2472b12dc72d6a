"""kd_lightning.report.statistics against independent computations: scikit-learn, scipy, slow
Python loops written from the formulas, hand-computed examples and simulations with a known
truth (coverage of the bootstrap intervals, false-positive rates of the paired tests)."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy import special, stats
from sklearn.metrics import brier_score_loss, confusion_matrix, f1_score, roc_auc_score

from kd_lightning.report import statistics as st

MODULE = Path(st.__file__)


def _binary_data(
    n_pos: int, n_neg: int, d: float, seed: int, decimals: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Binormal scores (positives N(d, 1), negatives N(0, 1)) squashed to (0, 1); rounding
    creates ties on purpose."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n_neg, dtype=np.int64)]
    latent = rng.normal(size=labels.size) + d * labels
    scores = special.expit(latent)
    if decimals is not None:
        scores = np.round(scores, decimals)
    perm = rng.permutation(labels.size)
    return labels[perm], scores[perm]


def _logits_data(n: int, k: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true logits): the true logits are perfectly calibrated."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(n, k))
    probs = special.softmax(logits, axis=1)
    labels = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    return labels.astype(np.int64), logits


# ----------------------------------------------------------------------------------------------
# The module stays torch-free


def test_module_imports_only_numpy_scipy_and_stdlib() -> None:
    roots = set()
    for file in sorted(MODULE.parent.glob("*.py")):  # the statistics package, file by file
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if not module.startswith("kd_lightning.report.statistics"):
                    roots.add(module.split(".")[0])
    assert roots <= {"__future__", "math", "collections", "typing", "numpy", "scipy"}, roots


def test_import_pulls_in_no_torch_or_sklearn() -> None:
    code = (
        "import sys, kd_lightning.report.statistics; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'lightning', 'torchmetrics', 'sklearn')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# AUROC and threshold metrics


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed: int) -> None:
    labels, scores = _binary_data(40 + seed, 30, 1.0, seed, decimals=1)
    assert len(np.unique(scores)) < scores.size / 4  # heavily tied
    assert st.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_extremes() -> None:
    labels = np.array([0, 0, 1, 1])
    assert st.auroc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert st.auroc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert st.auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert st.auroc(labels.astype(bool), [0.1, 0.2, 0.3, 0.4]) == 1.0


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.7, 0.6])
def test_threshold_metrics_equal_sklearn_confusion_matrix(threshold: float) -> None:
    labels, scores = _binary_data(60, 45, 1.0, 3, decimals=1)  # scores hit 0.3, 0.5, ...
    assert np.any(scores == threshold)  # exercises the strict inequality
    pred = (scores > threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    got = st.threshold_metrics(labels, scores, threshold)
    assert set(got) == {"acc", "sensitivity", "specificity", "f1"}
    assert got["acc"] == pytest.approx((tp + tn) / labels.size)
    assert got["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["f1"] == pytest.approx(f1_score(labels, pred, zero_division=0))


def test_threshold_metrics_undefined_ratios_are_zero() -> None:
    got = st.threshold_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)  # no positives, none predicted
    assert got == {"acc": 1.0, "sensitivity": 0.0, "specificity": 1.0, "f1": 0.0}


# ----------------------------------------------------------------------------------------------
# Operating points


def _brute_candidates(labels: np.ndarray, scores: np.ndarray) -> list[tuple[float, int, int]]:
    """(threshold, TP, TN) by a loop, from the definition of the candidate thresholds."""
    distinct = sorted(set(scores.tolist()))
    thresholds = [float(np.nextafter(distinct[0], -np.inf))]
    thresholds += [(lo + hi) / 2 for lo, hi in zip(distinct, distinct[1:], strict=False)]
    rows = []
    for t in thresholds:
        tp = sum(1 for y, s in zip(labels, scores, strict=True) if y == 1 and s > t)
        tn = sum(1 for y, s in zip(labels, scores, strict=True) if y == 0 and not s > t)
        rows.append((t, tp, tn))
    return rows


def _brute_youden(labels: np.ndarray, scores: np.ndarray) -> float:
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    rows = [
        (Fraction(tp, n_pos) + Fraction(tn, n_neg) - 1, t)
        for t, tp, tn in _brute_candidates(labels, scores)
    ]
    best = max(j for j, _ in rows)
    tied = [t for j, t in rows if j == best]
    return min(tied, key=lambda t: (abs(t - 0.5), -t))


def _brute_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    # The target as the decimal it was written as (0.9 means 9/10, not the double above it).
    n_pos = int(labels.sum())
    ok = [
        t
        for t, tp, _ in _brute_candidates(labels, scores)
        if Fraction(tp, n_pos) >= Fraction(repr(target))
    ]
    return max(ok)


@pytest.mark.parametrize("seed", range(6))
def test_youden_threshold_equals_brute_force(seed: int) -> None:
    labels, scores = _binary_data(50 + 7 * seed, 40, 0.5 + 0.3 * seed, seed, decimals=2)
    t = st.youden_threshold(labels, scores)
    assert t == _brute_youden(labels, scores)
    # No threshold at all, not only the candidates, does better.
    m = st.threshold_metrics(labels, scores, t)
    grid = np.linspace(-0.01, 1.01, 2001)
    best = max(
        sum(st.threshold_metrics(labels, scores, g)[k] for k in ("sensitivity", "specificity"))
        for g in grid[::20]
    )
    assert m["sensitivity"] + m["specificity"] >= best - 1e-12


def test_youden_ties_go_to_the_threshold_closest_to_half_then_the_larger() -> None:
    # J = 0.5 at t = 0.2 and at t = 0.75; 0.75 is closer to 0.5.
    assert st.youden_threshold([0, 1, 0, 1], [0.1, 0.3, 0.6, 0.9]) == 0.75
    # J = 0.5 at t = 0.25 and at t = 0.75, both 0.25 from 0.5 (exact in binary): the larger.
    assert st.youden_threshold([0, 1, 0, 1], [0.125, 0.375, 0.625, 0.875]) == 0.75


@pytest.mark.parametrize("target", [0.95, 0.9, 0.8, 1.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_sensitivity_threshold_equals_brute_force(target: float, seed: int) -> None:
    labels, scores = _binary_data(40, 60, 1.2, 10 + seed, decimals=2)
    t = st.sensitivity_threshold(labels, scores, target)
    assert t == _brute_sensitivity(labels, scores, target)
    assert st.threshold_metrics(labels, scores, t)["sensitivity"] >= target
    # The next larger distinct score as threshold already misses the target.
    above = np.unique(scores)[np.unique(scores) > t]
    if above.size:
        assert st.threshold_metrics(labels, scores, above[0])["sensitivity"] < target


def test_sensitivity_threshold_meets_an_exact_fraction() -> None:
    # 20 positives: 19/20 = 0.95 exactly must count as meeting the 0.95 target.
    labels = np.r_[np.ones(20, int), np.zeros(5, int)]
    scores = np.r_[np.arange(1, 21) / 100 + 0.5, np.full(5, 0.1)]
    t = st.sensitivity_threshold(labels, scores, 0.95)
    assert st.threshold_metrics(labels, scores, t)["sensitivity"] == 0.95
    assert t == pytest.approx(0.515)


def test_thresholds_come_from_validation_only() -> None:
    val_labels, val_logits = _logits_data(300, 2, 0)
    test_labels, test_logits = _logits_data(320, 2, 1)
    shuffled = np.random.default_rng(5).permutation(test_labels)
    kwargs = {"n_resamples": 200, "seed": 0}
    first = st.run_statistics(val_labels, val_logits, test_labels, test_logits, **kwargs)
    second = st.run_statistics(val_labels, val_logits, shuffled, test_logits, **kwargs)
    assert first["thresholds"] == second["thresholds"]
    assert first["val_at_thresholds"] == second["val_at_thresholds"]
    assert first["calibration"]["temperature"] == second["calibration"]["temperature"]
    assert first["test"]["auroc"]["value"] != second["test"]["auroc"]["value"]
    assert first["test"]["youden"]["acc"]["value"] != second["test"]["youden"]["acc"]["value"]


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals


def test_stratified_indices_keep_class_counts() -> None:
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 2, 2])
    idx = st.stratified_bootstrap_indices(labels, 50, seed=3)
    assert idx.shape == (50, labels.size)
    assert np.all(labels[idx] == np.sort(labels))
    assert np.array_equal(idx, st.stratified_bootstrap_indices(labels, 50, seed=3))
    assert not np.array_equal(idx, st.stratified_bootstrap_indices(labels, 50, seed=4))


def test_bootstrap_values_are_the_direct_metrics() -> None:
    labels, scores = _binary_data(70, 50, 1.0, 7, decimals=2)
    thresholds = {"0.5": 0.5, "low": 0.3}
    got = st.bootstrap_intervals(labels, scores, thresholds, n_resamples=100, seed=1)
    assert got["auroc"]["value"] == st.auroc(labels, scores)
    for name, t in thresholds.items():
        direct = st.threshold_metrics(labels, scores, t)
        assert {k: v["value"] for k, v in got[name].items()} == direct
    assert (got["n_resamples"], got["level"], got["seed"]) == (100, 0.95, 1)
    assert got["method"] == "stratified percentile bootstrap"


def test_bootstrap_equals_a_slow_loop_over_the_same_indices() -> None:
    labels, scores = _binary_data(45, 35, 0.8, 8, decimals=2)
    thresholds = {"0.5": 0.5, "youden": st.youden_threshold(labels, scores)}
    n, level, seed = 300, 0.9, 11
    got = st.bootstrap_intervals(labels, scores, thresholds, n_resamples=n, level=level, seed=seed)
    idx = st.stratified_bootstrap_indices(labels, n, seed)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    aucs = [roc_auc_score(labels[row], scores[row]) for row in idx]
    assert [got["auroc"]["low"], got["auroc"]["high"]] == pytest.approx(np.percentile(aucs, q))
    for name, t in thresholds.items():
        per_row = [st.threshold_metrics(labels[row], scores[row], t) for row in idx]
        for metric in ("acc", "sensitivity", "specificity", "f1"):
            expected = np.percentile([m[metric] for m in per_row], q)
            assert [got[name][metric]["low"], got[name][metric]["high"]] == pytest.approx(expected)


def test_bootstrap_is_fast() -> None:
    labels, scores = _binary_data(390, 234, 1.5, 9)
    thresholds = {"0.5": 0.5, "youden": 0.6, "sens95": 0.3}
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        st.bootstrap_intervals(labels, scores, thresholds, n_resamples=2000)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0


def test_bootstrap_auroc_interval_covers_the_truth() -> None:
    true_auroc = 0.8
    d = math.sqrt(2) * stats.norm.ppf(true_auroc)  # AUROC of N(d, 1) vs N(0, 1) = Phi(d / sqrt 2)
    covered = []
    for seed in range(200):
        labels, scores = _binary_data(150, 150, d, 1000 + seed)
        ci = st.bootstrap_intervals(labels, scores, {}, n_resamples=500, seed=seed)["auroc"]
        covered.append(ci["low"] <= true_auroc <= ci["high"])
    assert 0.90 <= np.mean(covered) <= 0.99


# ----------------------------------------------------------------------------------------------
# Calibration


def test_ece_hand_computed() -> None:
    # 5 bins of width 0.2. Confidences (max prob) and correctness:
    #   0.90 right, 0.70 wrong, 0.65 right, 1.00 right (last bin), 0.55 right, 0.85 wrong.
    # bin [0.4, 0.6): n=1, acc 1,   conf 0.55           -> |gap| * n = 0.45
    # bin [0.6, 0.8): n=2, acc 1/2, conf 0.675          -> 2 * 0.175 = 0.35
    # bin [0.8, 1.0]: n=3, acc 2/3, conf 2.75/3         -> 3 * 0.25  = 0.75
    # ECE = (0.45 + 0.35 + 0.75) / 6 = 1.55 / 6
    probs = np.array([[0.1, 0.9], [0.3, 0.7], [0.35, 0.65], [0.0, 1.0], [0.55, 0.45], [0.85, 0.15]])
    labels = np.array([1, 0, 1, 1, 0, 1])
    assert st.expected_calibration_error(labels, probs, n_bins=5) == pytest.approx(1.55 / 6)
    bins = st.reliability(labels, probs, n_bins=5)
    assert bins["count"].tolist() == [0, 0, 1, 2, 3]
    assert bins["bin_lower"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert bins["bin_upper"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["accuracy"][2:] == pytest.approx([1, 0.5, 2 / 3])
    assert bins["confidence"][2:] == pytest.approx([0.55, 0.675, 2.75 / 3])
    assert np.isnan(bins["accuracy"][:2]).all()


def test_ece_equals_guo_loop() -> None:
    labels, logits = _logits_data(500, 3, 2)
    probs = special.softmax(1.7 * logits, axis=1)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    ece = 0.0
    for lower, upper in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:], strict=True):
        in_bin = (conf > lower) & (conf <= upper)  # Guo et al.'s code; no confidence on an edge
        if in_bin.any():
            ece += in_bin.mean() * abs(
                (pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean()
            )
    assert st.expected_calibration_error(labels, probs) == pytest.approx(ece)


def test_brier_binary_equals_sklearn() -> None:
    labels, scores = _binary_data(30, 40, 1.0, 4)
    probs = np.c_[1 - scores, scores]
    assert st.brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, scores))


def test_brier_multiclass_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    # (0.3^2 + 0.2^2 + 0.1^2) + (0.1^2 + 0.7^2 + 0.6^2) = 0.14 + 0.86 -> mean 0.5
    assert st.brier_score([0, 1], probs) == pytest.approx(0.5)


def test_softmax_is_stable_and_matches_scipy() -> None:
    logits = np.array([[1000.0, 0.0], [-1000.0, -1001.0], [1.0, 2.0]])
    probs = st.softmax(logits)
    assert np.all(np.isfinite(probs))
    assert probs == pytest.approx(special.softmax(logits, axis=1))
    assert st.softmax(logits, 2.0) == pytest.approx(special.softmax(logits / 2, axis=1))


def test_temperature_recovers_overconfidence() -> None:
    labels, true_logits = _logits_data(5000, 3, 6)
    logits = 3 * true_logits  # over-confident by a factor of 3
    t = st.fit_temperature(labels, logits)
    assert t == pytest.approx(3, rel=0.1)
    nll = st.negative_log_likelihood
    assert nll(labels, logits, t) <= nll(labels, logits, t * 1.1)
    assert nll(labels, logits, t) <= nll(labels, logits, t / 1.1)
    reference = np.mean(-np.log(special.softmax(logits / t, axis=1)[np.arange(5000), labels]))
    assert nll(labels, logits, t) == pytest.approx(reference)


def test_calibration_of_calibrated_data() -> None:
    val_labels, val_logits = _logits_data(4000, 3, 12)
    test_labels, test_logits = _logits_data(4000, 3, 13)
    got = st.calibration(val_labels, val_logits, test_labels, test_logits)
    assert set(got) >= {"ece", "brier", "temperature", "ece_scaled", "brier_scaled", "n_bins"}
    assert got["ece"] < 0.03 and got["ece_scaled"] < 0.03
    assert got["temperature"] == pytest.approx(1, rel=0.1)
    assert got["n_bins"] == 15


def test_calibration_scaling_helps_overconfident_models() -> None:
    val_labels, val_logits = _logits_data(2000, 2, 14)
    test_labels, test_logits = _logits_data(2000, 2, 15)
    got = st.calibration(val_labels, 4 * val_logits, test_labels, 4 * test_logits)
    assert got["ece_scaled"] < got["ece"]
    assert got["brier_scaled"] < got["brier"]
    assert got["nll_scaled"] < got["nll"]


# ----------------------------------------------------------------------------------------------
# Paired tests


def _slow_delong_variance(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Var(AUROC_a - AUROC_b) from DeLong et al. (1988), by loops over all pairs."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    m, n = pos.size, neg.size

    def psi(x: float, y: float) -> float:
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10, v01, aucs = [], [], []
    for s in (a, b):
        table = [[psi(s[i], s[j]) for j in neg] for i in pos]
        v10.append([sum(row) / n for row in table])
        v01.append([sum(table[i][j] for i in range(m)) / m for j in range(n)])
        aucs.append(sum(map(sum, table)) / (m * n))
    s10 = [[0.0, 0.0], [0.0, 0.0]]
    s01 = [[0.0, 0.0], [0.0, 0.0]]
    for r in range(2):
        for q in range(2):
            s10[r][q] = sum((v10[r][i] - aucs[r]) * (v10[q][i] - aucs[q]) for i in range(m)) / (
                m - 1
            )
            s01[r][q] = sum((v01[r][j] - aucs[r]) * (v01[q][j] - aucs[q]) for j in range(n)) / (
                n - 1
            )
    return (s10[0][0] + s10[1][1] - 2 * s10[0][1]) / m + (s01[0][0] + s01[1][1] - 2 * s01[0][1]) / n


def _paired_scores(n_pos: int, n_neg: int, seed: int, null: bool) -> tuple[np.ndarray, ...]:
    """Two noisy copies of one latent score (null: equal true AUROC), or A informative and B
    pure noise (a planted difference)."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n_neg, dtype=np.int64)]
    if null:
        latent = labels + rng.normal(size=labels.size)
        a = latent + rng.normal(size=labels.size)
        b = latent + rng.normal(size=labels.size)
    else:
        a = 2 * labels + rng.normal(size=labels.size)
        b = rng.normal(size=labels.size)
    return labels, a, b


@pytest.mark.parametrize("seed", range(3))
def test_delong_matches_the_slow_formula(seed: int) -> None:
    labels, a, b = _paired_scores(40, 30, seed, null=True)
    a, b = np.round(a, 1), np.round(b, 1)  # ties
    got = st.delong_test(labels, a, b)
    assert got["auroc_a"] == pytest.approx(roc_auc_score(labels, a))
    assert got["diff"] == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))
    var = _slow_delong_variance(labels, a, b)
    assert got["se"] ** 2 == pytest.approx(var, rel=1e-9)
    z = got["diff"] / math.sqrt(var)
    assert got["z"] == pytest.approx(z)
    assert got["p"] == pytest.approx(2 * stats.norm.sf(abs(z)))
    half = stats.norm.ppf(0.975) * got["se"]
    assert [got["low"], got["high"]] == pytest.approx([got["diff"] - half, got["diff"] + half])


def test_delong_identical_predictions() -> None:
    labels, a, _ = _paired_scores(50, 50, 0, null=True)
    got = st.delong_test(labels, a, a.copy())
    assert (got["diff"], got["se"], got["z"], got["p"]) == (0.0, 0.0, 0.0, 1.0)


def test_delong_flags_a_planted_difference() -> None:
    labels, a, b = _paired_scores(300, 300, 1, null=False)
    got = st.delong_test(labels, a, b)
    assert got["diff"] > 0.3 and got["p"] < 0.001 and got["low"] > 0


def test_delong_false_positive_rate_under_the_null() -> None:
    rejected = [
        st.delong_test(*_paired_scores(150, 150, 2000 + s, null=True))["p"] < 0.05
        for s in range(200)
    ]
    assert 0.01 <= np.mean(rejected) <= 0.10


def test_mcnemar_counts_and_exact_p() -> None:
    labels, a, b = _paired_scores(60, 60, 3, null=True)
    pa, pb = (a > 0.5).astype(int), (b > 0.5).astype(int)
    got = st.mcnemar_test(labels, pa, pb)
    a_only = sum(1 for y, x, z in zip(labels, pa, pb, strict=True) if x == y and z != y)
    b_only = sum(1 for y, x, z in zip(labels, pa, pb, strict=True) if x != y and z == y)
    assert (got["a_only"], got["b_only"]) == (a_only, b_only)
    assert got["p"] == pytest.approx(stats.binomtest(a_only, a_only + b_only).pvalue)
    assert got["diff"] == pytest.approx(np.mean(pa == labels) - np.mean(pb == labels))


def test_mcnemar_identical_and_planted() -> None:
    labels, a, b = _paired_scores(300, 300, 4, null=False)
    pa, pb = (a > 1).astype(int), (b > 0).astype(int)
    same = st.mcnemar_test(labels, pa, pa)
    assert (same["a_only"], same["b_only"], same["p"], same["diff"]) == (0, 0, 1.0, 0.0)
    planted = st.mcnemar_test(labels, pa, pb)
    assert planted["diff"] > 0.2 and planted["p"] < 0.001


def test_mcnemar_false_positive_rate_under_the_null() -> None:
    rejected = []
    for s in range(200):
        labels, a, b = _paired_scores(150, 150, 3000 + s, null=True)
        rejected.append(st.mcnemar_test(labels, a > 0.5, b > 0.5)["p"] < 0.05)
    assert 0.01 <= np.mean(rejected) <= 0.10


def test_paired_bootstrap_auroc_identical_and_planted() -> None:
    labels, a, b = _paired_scores(300, 300, 5, null=False)
    same = st.paired_bootstrap_auroc(labels, a, a.copy())
    assert (same["diff"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    planted = st.paired_bootstrap_auroc(labels, a, b)
    assert planted["diff"] == pytest.approx(st.auroc(labels, a) - st.auroc(labels, b))
    assert planted["p"] < 0.001 and planted["low"] > 0


def test_paired_bootstrap_auroc_false_positive_rate_under_the_null() -> None:
    rejected = [
        st.paired_bootstrap_auroc(*_paired_scores(150, 150, 4000 + s, null=True), n_resamples=500)[
            "p"
        ]
        < 0.05
        for s in range(200)
    ]
    assert 0.01 <= np.mean(rejected) <= 0.10


def test_paired_bootstrap_generic_equals_the_fast_paths() -> None:
    labels, a, b = _paired_scores(40, 50, 6, null=True)
    a, b = np.round(a, 1), np.round(b, 1)
    kwargs = {"n_resamples": 300, "level": 0.9, "seed": 7}
    assert st.paired_bootstrap(labels, a, b, st.auroc, **kwargs) == st.paired_bootstrap_auroc(
        labels, a, b, **kwargs
    )
    pa, pb = (a > 0.5).astype(int), (b > 0.5).astype(int)

    def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
        return float(np.mean(pred == y))

    assert st.paired_bootstrap(labels, pa, pb, accuracy, **kwargs) == st.paired_bootstrap_accuracy(
        labels, pa, pb, **kwargs
    )


def test_paired_bootstrap_p_value_convention() -> None:
    labels, a, b = _paired_scores(30, 30, 8, null=True)
    got = st.paired_bootstrap_auroc(labels, a, b, n_resamples=400, seed=2)
    idx = st.stratified_bootstrap_indices(labels, 400, 2)
    d = np.array([roc_auc_score(labels[r], a[r]) - roc_auc_score(labels[r], b[r]) for r in idx])
    assert got["p"] == pytest.approx(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


# ----------------------------------------------------------------------------------------------
# Across seeds and multiple comparisons


def test_t_interval_equals_scipy() -> None:
    values = [0.91, 0.93, 0.88, 0.95, 0.9]
    got = st.t_interval(values, level=0.9)
    sem = np.std(values, ddof=1) / math.sqrt(5)
    low, high = stats.t.interval(0.9, df=4, loc=np.mean(values), scale=sem)
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    assert got["mean"] == pytest.approx(np.mean(values))
    assert got["std"] == pytest.approx(np.std(values, ddof=1))
    assert got["n"] == 5


def test_t_interval_small_and_constant() -> None:
    one = st.t_interval([0.9])
    assert (one["mean"], one["std"], one["low"], one["high"], one["n"]) == (0.9, 0.0, None, None, 1)
    flat = st.t_interval([0.5, 0.5, 0.5])
    assert (flat["low"], flat["high"]) == (0.5, 0.5)


def test_seed_test_equals_scipy() -> None:
    diffs = [0.01, -0.004, 0.02, 0.013, 0.0]
    got = st.seed_test(diffs)
    ref = stats.ttest_1samp(diffs, 0.0)
    assert got["t"] == pytest.approx(ref.statistic)
    assert got["p"] == pytest.approx(ref.pvalue)
    assert (got["n"], got["wins"]) == (5, 3)
    assert got["std"] == pytest.approx(np.std(diffs, ddof=1))


def test_seed_test_degenerate_cases() -> None:
    single = st.seed_test([0.02])
    assert (single["t"], single["p"], single["std"], single["wins"]) == (None, None, 0.0, 1)
    assert st.seed_test([0.01, 0.01, 0.01])["p"] == 0.0
    assert st.seed_test([0.01, 0.01, 0.01])["t"] is None
    assert st.seed_test([0.0, 0.0])["p"] == 1.0


def test_holm_textbook_example() -> None:
    # Four hypotheses with p = 0.01, 0.04, 0.03, 0.005 (the Wikipedia Holm-Bonferroni example):
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06.
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_none_and_cap() -> None:
    assert st.holm([None, 0.01, None, 0.04]) == [None, pytest.approx(0.02), None, 0.04]
    assert st.holm([0.5, 0.6]) == [1.0, 1.0]
    assert st.holm([]) == []
    assert st.holm([None]) == [None]


def test_holm_equals_the_step_down_procedure() -> None:
    """The adjusted p-value is the smallest alpha at which Holm's step-down rejects."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random(6) ** 3
        m = p.size
        expected = []
        for i in range(m):
            # Reject H_i at alpha iff every smaller-or-equal p_(j) up to H_i passes
            # p_(j) <= alpha / (m - j + 1): the smallest such alpha.
            order = np.argsort(p, kind="stable")
            rank = int(np.flatnonzero(order == i)[0])
            expected.append(min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1))))
        assert st.holm(p.tolist()) == pytest.approx(expected)


def test_verdict() -> None:
    assert st.verdict(0.02, 0.01) == "better"
    assert st.verdict(-0.02, 0.01) == "worse"
    assert st.verdict(0.02, 0.2) == "not distinguishable"
    assert st.verdict(0.02, None) == "not distinguishable"
    assert st.verdict(0.02, 0.05) == "not distinguishable"


# ----------------------------------------------------------------------------------------------
# MedMNIST's definitions


def _medmnist_reference_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return roc_auc_score(labels, probs[:, -1])
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(probs.shape[1])]))


@pytest.mark.parametrize("k", [2, 3])
def test_medmnist_definitions(k: int) -> None:
    labels, logits = _logits_data(200, k, 20 + k)
    probs = np.round(special.softmax(logits, axis=1), 2)  # ties and exact 0.5
    assert st.medmnist_auc(labels, probs) == pytest.approx(_medmnist_reference_auc(labels, probs))
    expected_acc = (
        np.mean((probs[:, -1] > 0.5) == labels) if k == 2 else np.mean(probs.argmax(1) == labels)
    )
    assert st.medmnist_acc(labels, probs) == pytest.approx(expected_acc)
    assert st.medmnist_acc(labels[:, None], probs) == st.medmnist_acc(labels, probs)


# ----------------------------------------------------------------------------------------------
# Everything one run reports


def _intervals(tree: object) -> list[dict]:
    found = []
    if isinstance(tree, dict):
        if {"value", "low", "high"} <= set(tree):
            found.append(tree)
        for value in tree.values():
            found += _intervals(value)
    return found


@pytest.mark.parametrize("k", [2, 3])
def test_run_statistics(k: int) -> None:
    val_labels, val_logits = _logits_data(300, k, 30 + k)
    test_labels, test_logits = _logits_data(330, k, 40 + k)
    got = st.run_statistics(
        val_labels, val_logits, test_labels, test_logits, n_resamples=300, seed=1
    )
    json.dumps(got, allow_nan=False)
    assert list(got["thresholds"]) == ["0.5", "youden", "sens95"]
    assert set(got) >= {
        "thresholds", "test", "val_at_thresholds", "calibration", "target_sensitivity",
        "n_test", "n_val", "class_counts_test", "class_counts_val",
    }  # fmt: skip
    assert set(got["test"]) >= {"auroc", "0.5", "youden", "sens95", "n_resamples", "level"}
    assert set(got["calibration"]) >= {"ece", "brier", "temperature", "ece_scaled"}
    assert (got["n_val"], got["n_test"]) == (300, 330)
    assert got["class_counts_test"] == np.bincount(test_labels, minlength=k).tolist()
    intervals = _intervals(got)
    assert len(intervals) >= 1 + 3 * 4 + (2 if k > 2 else 0)
    for ci in intervals:
        assert ci["low"] <= ci["value"] <= ci["high"]
    val_score = 1 - special.softmax(val_logits, axis=1)[:, 0]
    sens = st.threshold_metrics(val_labels != 0, val_score, got["thresholds"]["sens95"])
    assert sens["sensitivity"] >= 0.95
    assert got["val_at_thresholds"]["sens95"]["sensitivity"] == sens["sensitivity"]
    test_probs = special.softmax(test_logits, axis=1)
    assert got["test"]["auroc"]["value"] == pytest.approx(
        roc_auc_score(test_labels != 0, test_probs[:, 1:].sum(axis=1))
    )
    if k == 2:
        assert "multiclass" not in got
        assert got["test"]["auroc"]["value"] == pytest.approx(
            st.medmnist_auc(test_labels, test_probs)
        )
    else:
        mc = got["multiclass"]
        assert mc["acc"]["value"] == pytest.approx(st.medmnist_acc(test_labels, test_probs))
        assert mc["auroc_macro"]["value"] == pytest.approx(st.medmnist_auc(test_labels, test_probs))


def test_run_statistics_multiclass_bootstrap_equals_a_loop() -> None:
    val_labels, val_logits = _logits_data(150, 3, 50)
    test_labels, test_logits = _logits_data(160, 3, 51)
    got = st.run_statistics(val_labels, val_logits, test_labels, test_logits, n_resamples=100)
    probs = special.softmax(test_logits, axis=1)
    idx = st.stratified_bootstrap_indices(test_labels, 100, 0)
    macro = [_medmnist_reference_auc(test_labels[r], probs[r]) for r in idx]
    low, high = np.percentile(macro, [2.5, 97.5])
    assert [got["multiclass"]["auroc_macro"][q] for q in ("low", "high")] == pytest.approx(
        [low, high]
    )


# ----------------------------------------------------------------------------------------------
# Bad input


LABELS = np.array([0, 1, 0, 1, 1, 0])
SCORES = np.array([0.1, 0.8, 0.3, 0.6, 0.9, 0.2])
PROBS = np.c_[1 - SCORES, SCORES]


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: st.auroc(LABELS, SCORES[:-1]), "scores"),
        (lambda: st.auroc(np.ones(6, int), SCORES), "labels"),
        (lambda: st.auroc([0, 1, 2, 1, 0, 1], SCORES), "labels"),
        (lambda: st.auroc(LABELS, np.r_[SCORES[:-1], np.nan]), "scores"),
        (lambda: st.threshold_metrics(LABELS, SCORES, float("nan")), "threshold"),
        (lambda: st.bootstrap_intervals(LABELS, SCORES, {}, n_resamples=0), "n_resamples"),
        (lambda: st.bootstrap_intervals(LABELS, SCORES, {}, level=1.0), "level"),
        (lambda: st.bootstrap_intervals(LABELS, SCORES, {"auroc": 0.5}), "thresholds"),
        (lambda: st.sensitivity_threshold(LABELS, SCORES, 0.0), "target"),
        (lambda: st.sensitivity_threshold(LABELS, SCORES, 1.2), "target"),
        (lambda: st.expected_calibration_error(LABELS, SCORES), "probs"),
        (lambda: st.brier_score(LABELS, PROBS[:, :1]), "probs"),
        (lambda: st.brier_score(LABELS, PROBS * 2), "probs"),
        (lambda: st.expected_calibration_error(LABELS, PROBS, n_bins=0), "n_bins"),
        (lambda: st.softmax(PROBS, temperature=0.0), "temperature"),
        (lambda: st.delong_test(LABELS, SCORES, SCORES[:-1]), "scores_b"),
        (lambda: st.delong_test(LABELS, SCORES, SCORES, level=0.0), "level"),
        (lambda: st.mcnemar_test(LABELS, LABELS, LABELS[:-1]), "pred_b"),
        (lambda: st.paired_bootstrap_auroc(LABELS, SCORES, SCORES, n_resamples=0), "n_resamples"),
        (lambda: st.t_interval([]), "values"),
        (lambda: st.t_interval([1.0, 2.0], level=95), "level"),
        (lambda: st.seed_test([0.1, float("inf")]), "diffs"),
        (lambda: st.holm([0.1, 1.5]), "pvalues"),
        (lambda: st.verdict(0.1, 0.01, alpha=0), "alpha"),
        (lambda: st.medmnist_auc(LABELS, SCORES), "probs"),
        (
            lambda: st.run_statistics(LABELS, PROBS, LABELS, PROBS, target_sensitivity=0.0),
            "target_sensitivity",
        ),
        (
            lambda: st.run_statistics(LABELS, PROBS, LABELS, PROBS, target_sensitivity=1.5),
            "target_sensitivity",
        ),
        (lambda: st.run_statistics(LABELS, PROBS, LABELS, SCORES), "test_logits"),
        (lambda: st.run_statistics(LABELS, PROBS, LABELS[:-1], PROBS), "test_logits"),
        (lambda: st.run_statistics(LABELS, PROBS, LABELS, PROBS, n_resamples=0), "n_resamples"),
    ],
)
def test_bad_input_raises_one_line_value_error(call: Callable[[], object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b") as err:
        call()
    assert "\n" not in str(err.value)
