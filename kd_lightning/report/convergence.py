"""Convergence: test AUROC and accuracy after every training epoch, per method and study-axis value.

The values come from EpochTestEvaluation (``+callbacks=epoch_test``): a test pass after each
epoch, written to epoch_test.json and copied into summary.json["epoch_test"]. It is never used to
pick the model (checkpoints are chosen on validation); here it only shows how fast each method
gets where it ends.

Per student row (method x configuration, e.g. labeled_fraction=0.03; see aggregate.student_rows)
and per epoch: the mean over seeds with a Student t 95% interval (statistics.t_interval; no
interval with one seed). Epochs to a target test AUROC, per seed: the number of epochs trained
(1-based) after which test AUROC first reached the target; a seed that never reaches it within its
epochs is "not reached". Aggregated as the mean and t interval over the seeds that reached it,
with "k/n reached" beside it: with k < n the mean leaves out the slowest seeds (a lower bound).
Targets: Base's final test AUROC (mean over its seeds of the last epoch's per-epoch test AUROC)
at the same configuration and architecture (aggregate.base_candidates), so "epochs to Base's end
point"; and a fixed FIXED_TARGET.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kd_lightning.artifacts import BASE_METHOD
from kd_lightning.report.aggregate import base_candidates
from kd_lightning.report.figures import axis_values, study_axes
from kd_lightning.report.statistics import t_interval

FIXED_TARGET = 0.90
CONVERGENCE_TITLE = "per-epoch test pass (EpochTestEvaluation), never used to pick the model"
_TOL = 1e-12  # a seed at exactly the target (Base's own final value) reaches it


def epochs_to(curve: dict[int, dict[str, float]], target: float) -> int | None:
    """Epochs trained (1-based) after which test AUROC first is >= target; None if never."""
    for epoch in sorted(curve):
        if curve[epoch]["auroc"] >= target - _TOL:
            return epoch + 1
    return None


def _interval(values: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Mean and t interval, clipped to the quantity's range (a metric in [0, 1], epochs in
    [1, last epoch]) as the study tables clip theirs: with 2-3 seeds the t quantile is large."""
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    stats = t_interval(values)
    out = {k: stats[k] for k in ("mean", "low", "high", "n")}
    for key in ("low", "high"):
        if out[key] is not None:
            out[key] = min(max(out[key], bounds[0]), bounds[1])
    return out


def _final(curve: dict[int, dict[str, float]]) -> float:
    return curve[max(curve)]["auroc"]


def convergence_rows(students: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per student row whose runs have per-epoch test metrics (others are skipped).

    Each entry: method, config, arch, label (method, plus the configuration beyond the study
    axes), panel (((axis, value), ...) on the study axes), n (seeds with a curve), epochs
    (1-based), auroc / acc ({mean, low, high, n}: lists per epoch), first / last (t interval of
    test AUROC after epoch 1 / after each seed's last epoch), last_epoch, targets
    ({name: {target, mean, low, high, reached, n}}: epochs to reach it, see the module docstring).
    """
    axes = study_axes(students)
    with_curves = []
    for row in students:
        curves = [run["epoch_test"] for run in row["runs"] if run.get("epoch_test")]
        if curves:
            with_curves.append((row, curves))
    bases = [row for row, _ in with_curves if row["method"] == BASE_METHOD]
    base_curves = {id(row): curves for row, curves in with_curves}
    entries = []
    for row, curves in with_curves:
        panel = tuple((axis, axis_values(row, axis)) for axis in axes)
        own = [o for o in row["config"].split() if o.split("=", 1)[0] not in axes]
        epochs = sorted(set().union(*curves))
        entry: dict[str, Any] = {
            "method": row["method"],
            "config": row["config"],
            "arch": row["arch"],
            "label": row["method"] + (f" [{' '.join(own)}]" if own else ""),
            "panel": panel,
            "n": len(curves),
            "epochs": [e + 1 for e in epochs],
            "first": _interval([c[0]["auroc"] for c in curves if 0 in c]),
            "last": _interval([_final(c) for c in curves]),
            "last_epoch": max(epochs) + 1,
        }
        for metric in ("auroc", "acc"):
            per_epoch = [
                _interval([c[e][metric] for c in curves if metric in c.get(e, {})]) for e in epochs
            ]
            entry[metric] = {k: [p[k] for p in per_epoch] for k in ("mean", "low", "high", "n")}
        targets: dict[str, float] = {}
        candidates = base_candidates(row, bases) if bases else []
        if len(candidates) == 1:
            finals = [_final(c) for c in base_curves[id(candidates[0])]]
            targets["base_final"] = sum(finals) / len(finals)
        targets[f"{FIXED_TARGET:.2f}"] = FIXED_TARGET
        entry["targets"] = {}
        for name, target in targets.items():
            reached = [x for x in (epochs_to(c, target) for c in curves) if x is not None]
            stats = _interval([float(x) for x in reached], (1.0, float(max(epochs) + 1)))
            entry["targets"][name] = {
                **stats,
                "target": target,
                "reached": len(reached),
                "n": len(curves),
            }
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------------
# results.md and convergence.csv


def _pct(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "—"
    cell = f"{100 * stats['mean']:.2f}"
    if stats["low"] is not None:
        cell += f" [{100 * stats['low']:.2f}, {100 * stats['high']:.2f}]"
    return cell


def _epochs(stats: dict[str, Any]) -> str:
    if not stats["reached"]:
        return f"not reached (0/{stats['n']})"
    cell = f"{stats['mean']:.2f}"
    if stats["low"] is not None:
        cell += f" [{stats['low']:.2f}, {stats['high']:.2f}]"
    return cell + f" ({stats['reached']}/{stats['n']} reached)"


def convergence_markdown(
    entries: Sequence[dict[str, Any]],
    md_table: Callable[[Sequence[str], Any], list[str]],
    figure: str = "convergence.png",
) -> list[str]:
    if not entries:
        return []
    with_config = any(e["config"] for e in entries)
    lines = [
        "",
        f"## Convergence ({CONVERGENCE_TITLE})",
        "",
        "Test AUROC after every training epoch from a test pass at each epoch's end "
        "(`+callbacks=epoch_test`, epoch_test.json); never used to pick the model (checkpoints "
        "are chosen on validation). AUROC in %, mean over seeds [Student t 95% interval over "
        "seeds]. Epochs to a target: per seed, the number of epochs after which test AUROC first "
        "reached the target; mean [t interval] over the seeds that reached it, with how many did "
        "(a seed that never reaches it is 'not reached' and is left out of the mean, so with "
        "k/n < n/n the mean is a lower bound). Targets: Base's final test AUROC at the same "
        f"configuration (mean over its seeds of the last epoch), and a fixed "
        f"{100 * FIXED_TARGET:.0f}%.",
        "",
    ]
    header = ["method", *(["config"] if with_config else []), "arch", "n", "epochs"]
    header += ["epochs to Base's final AUROC (target %)", f"epochs to {100 * FIXED_TARGET:.0f}%"]
    header += ["AUROC after epoch 1 (%)", "AUROC after the last epoch (%)"]
    body = []
    fixed = f"{FIXED_TARGET:.2f}"
    for e in entries:
        base = e["targets"].get("base_final")
        base_cell = (
            "— (no single Base)"
            if base is None
            else (f"≥ {100 * base['target']:.2f}: {_epochs(base)}")
        )
        body.append(
            [e["label"], *([e["config"] or "—"] if with_config else []), e["arch"], e["n"]]
            + [e["last_epoch"], base_cell, _epochs(e["targets"][fixed])]
            + [_pct(e["first"]), _pct(e["last"])]
        )
    lines += md_table(header, body)
    lines += ["", f"![{CONVERGENCE_TITLE}]({figure})", ""]
    return lines


def convergence_csv_rows(
    entries: Sequence[dict[str, Any]],
) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of convergence.csv: one row per entry, fractions (not %)."""
    targets = list(dict.fromkeys(name for e in entries for name in e["targets"]))
    header = ["method", "config", "arch", "n", "last_epoch"]
    for name in targets:
        header += [f"epochs_to_{name}_{k}" for k in ("target", "mean", "low", "high", "reached")]
    for which in ("first", "last"):
        header += [f"auroc_{which}_{k}" for k in ("mean", "low", "high")]
    rows = []
    for e in entries:
        row: list[Any] = [e["method"], e["config"], e["arch"], e["n"], e["last_epoch"]]
        for name in targets:
            t = e["targets"].get(name) or {}
            row += [t.get(k) for k in ("target", "mean", "low", "high", "reached")]
        for which in ("first", "last"):
            row += [e[which][k] for k in ("mean", "low", "high")]
        rows.append(row)
    return header, rows
