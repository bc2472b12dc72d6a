"""A study's rows: one per student method (and configuration), one per teacher/TA, and the
seed-level paired differences against Base."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kd_lightning.artifacts import BASE_METHOD, PAPER_METHODS
from kd_lightning.report.headline import run_value
from kd_lightning.report.reading import REPLICATE_KEYS, _override_key

PAPER_ORDER = PAPER_METHODS  # declared once, beside the other method labels the chain checks
METRICS = ("acc", "auroc", "sensitivity", "specificity", "f1")
# Two-sided 5% critical values of Student's t for df = 1..30; beyond 30 the df=30 value is used,
# which is slightly conservative. A table keeps scipy out of a file-reading tool.
T_CRIT_05 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the paper's methods in its order, then the rest alphabetically."""
    if method in PAPER_ORDER:
        return (PAPER_ORDER.index(method), "")
    return (len(PAPER_ORDER), method)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def _variants(students: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Each student run's configuration beyond its method: the overrides (other than seed and
    experiment) that not all runs of its method share, so a swept weight gets its own rows."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in students:
        by_method.setdefault(run["method"], []).append(run)
    variants = {}
    for runs in by_method.values():
        # A study's axis values (summary.json's variant, set by chain.axes) count as overrides.
        sets = [
            {o for o in run["overrides"] if _override_key(o) not in REPLICATE_KEYS}
            | {f"{k}={v}" for k, v in (run["summary"].get("variant") or {}).items()}
            for run in runs
        ]
        common = set.intersection(*sets)
        for run, own in zip(runs, sets, strict=True):
            variants[id(run)] = " ".join(sorted(own - common))
    return variants


def student_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, configuration, arch) of the student runs, in the paper's order."""
    students = [r for r in runs if r["role"] == "student"]
    variants = _variants(students)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in students:
        groups.setdefault((run["method"], variants[id(run)], run["arch"]), []).append(run)
    rows = []
    for (method, config, arch), members in groups.items():
        row = _aggregate(members)
        row.update(method=method, config=config, arch=arch)
        rows.append(row)
    rows.sort(key=lambda r: (method_rank(r["method"]), r["config"], r["arch"]))
    return rows


def teacher_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (name, arch) of the teacher and TA runs: teachers first, bigger models first,
    as the paper lists them (ResNet152 98.67, ResNet101 97.54, ...)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if run["role"] in ("teacher", "ta"):
            groups.setdefault((run["name"], run["arch"]), []).append(run)
    rows = []
    for (name, arch), members in groups.items():
        row = _aggregate(members)
        roles = sorted({m["role"] for m in members}, key=("teacher", "ta").index)
        methods = sorted({m["method"] for m in members})
        row.update(name=name, arch=arch, role="/".join(roles), method="/".join(methods))
        rows.append(row)
    rows.sort(key=lambda r: (r["role"] != "teacher", -(r["parameters"] or 0), r["name"]))
    return rows


def _aggregate(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    seeds = [m["seed"] for m in members]
    row: dict[str, Any] = {
        "n": len(members),
        "seeds": seeds,
        "runs": list(members),
        "parameters": next((m["parameters"] for m in members if m["parameters"]), None),
        "model_mb": next((m["model_file_mb"] for m in members if m["model_file_mb"]), None),
    }
    for metric in METRICS:
        # Value and interval of one statistic (headline.run_value): for K > 2 ACC is top-1 and
        # AUROC the macro one-vs-rest AUROC, never a binary collapse's interval beside them.
        picked = [p for p in (run_value(m, metric) for m in members) if p[0] is not None]
        values = [value for value, _ in picked]
        row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        row[f"{metric}_low"], row[f"{metric}_high"] = _t_interval(values)
        if len(picked) == 1 and picked[0][1]:
            # One seed: the interval over test images of that run (bootstrap, trust.py).
            interval = picked[0][1]
            row[f"{metric}_low"], row[f"{metric}_high"] = interval["low"], interval["high"]
    return row


def _t_interval(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Student-t 95% interval of the mean over seeds (None below 2 values)."""
    n = len(values)
    if n < 2:
        return None, None
    mean, std = _mean_std(values)
    half = T_CRIT_05[min(n - 1, len(T_CRIT_05)) - 1] * std / math.sqrt(n)
    # Every metric here is a proportion: the interval is clipped to [0, 1].
    return max(0.0, mean - half), min(1.0, mean + half)


def paired_differences(
    rows: Sequence[dict[str, Any]], metric: str = "test/auroc"
) -> list[dict[str, Any]]:
    """Each student row against base (same arch if base has one) over the seeds both ran.

    Rows with fewer than 2 shared seeds are left out: one pair cannot separate a method from
    seed noise, which on this data is as large as the method effects (experiments/paper_cpu/
    README.md: one method's per-seed ΔAUROC against Base changes sign from seed to seed).
    """
    metrics = list(dict.fromkeys(["test/acc", "test/auroc", metric]))
    bases = [r for r in rows if r["method"] == BASE_METHOD]
    out = []
    for row in rows:
        if row["method"] == BASE_METHOD or not bases:
            continue
        candidates = base_candidates(row, bases)
        if len(candidates) != 1:
            continue  # several base configurations: no single reference to pair with
        base = candidates[0]
        result: dict[str, Any] = {
            "method": row["method"],
            "config": row["config"],
            "arch": row["arch"],
            "base_arch": base["arch"],
        }
        for name in metrics:
            ours, theirs = _by_seed(row["runs"], name), _by_seed(base["runs"], name)
            shared = sorted(set(ours) & set(theirs), key=str)
            diffs = np.array([ours[s] - theirs[s] for s in shared], dtype=float)
            result[name] = _paired_stats(diffs)
        result["pairs"] = result[metric]["n"]
        if result["pairs"] >= 2:
            out.append(result)
    return out


def base_candidates(row: dict[str, Any], bases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Base rows a row is compared with: same architecture and configuration (e.g. the
    same label fraction), else same architecture, else every Base row."""
    same_arch = [b for b in bases if b["arch"] == row["arch"]]
    same_config = [b for b in same_arch if b["config"] == row["config"]]
    return same_config or same_arch or list(bases)


def _by_seed(runs: Sequence[dict[str, Any]], metric: str) -> dict[Any, float]:
    # A seed rerun twice counts once, as the mean of its runs, so it cannot dominate the pairing.
    values: dict[Any, list[float]] = {}
    for run in runs:
        if run["seed"] is not None and metric in run["test"]:
            values.setdefault(run["seed"], []).append(run["test"][metric])
    return {seed: float(np.mean(v)) for seed, v in values.items()}


def _paired_stats(diffs: np.ndarray) -> dict[str, Any]:
    n = int(diffs.size)
    if n < 2:
        return {"n": n, "mean": float(diffs.mean()) if n else None, "std": None, "t": None}
    mean, std = float(diffs.mean()), float(diffs.std(ddof=1))
    # Identical differences on every seed leave float noise (~1e-17) as the std; call that 0
    # rather than print a t of 1e14.
    if std <= 1e-12 * max(1.0, abs(mean)):
        std = 0.0
    if std > 0:
        t = mean / (std / math.sqrt(n))
    else:
        t = math.copysign(math.inf, mean) if mean != 0 else 0.0
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "t": t,
        "significant": abs(t) > T_CRIT_05[min(n - 1, len(T_CRIT_05)) - 1],
        "better": int((diffs > 0).sum()),
    }
