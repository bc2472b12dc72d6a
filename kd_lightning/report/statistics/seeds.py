"""Across seeds and comparisons: Student-t intervals, the seed t-test, Holm, verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from kd_lightning.report.statistics._checks import _array_1d, _check_level, _preview

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
