"""What each reported number of a run is, and which interval belongs to it.

Binary task (K = 2): ACC, sensitivity, specificity and F1 at threshold 0.5 and the AUROC of the
positive score, each with its stratified-bootstrap interval (statistics.test).

K > 2 classes: the headline is the set's own, as medmnist.Evaluator and torchmetrics define it:
ACC = top-1 (argmax) accuracy over the K classes and AUROC = the macro one-vs-rest AUROC, each
with its class-stratified bootstrap interval (statistics.multiclass); F1 = macro F1 at argmax
(torchmetrics, summary.json's test/f1; no per-run interval). Sensitivity and specificity are of
the binary collapse "class 0 vs the rest" (score 1 - p(class 0), threshold 0.5): for the Kermany
3-class task that is pneumonia vs normal, for another set it is whatever class 0 is, so every
table names it (`collapse_label`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Interval = dict[str, float]


def run_classes(run: dict[str, Any]) -> int | None:
    """K of a run: its statistics' n_classes, else summary.json's model/data num_classes, else
    None (old summaries; treated as binary, as the report always did)."""
    stats = run.get("stats") or {}
    if stats.get("n_classes"):
        return int(stats["n_classes"])
    summary = run.get("summary") or {}
    for section in ("model", "data"):
        value = (summary.get(section) or {}).get("num_classes")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if "test/auroc_macro" in (run.get("test") or {}):
        return 3  # some K > 2: only multi-class runs log the macro AUROC
    return None


def is_multiclass(run: dict[str, Any]) -> bool:
    return (run_classes(run) or 2) > 2


def study_classes(runs: Sequence[dict[str, Any]]) -> int:
    """The K the study's tables are labelled for: the largest K of its runs (2 if unknown)."""
    return max([run_classes(r) or 2 for r in runs] or [2])


def class_names(run: dict[str, Any]) -> list[str] | None:
    """The run's class names: summary.json's class_names (top level or under data), else the
    names its data file stands for (a MedMNIST flag, or the chest X-ray tasks), else None."""
    summary = run.get("summary") or {}
    data = summary.get("data") or {}
    for names in (summary.get("class_names"), data.get("class_names")):
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    k = run_classes(run)
    if not k or not data.get("path"):
        return None
    try:
        from kd_lightning.data.npz import npz_class_names

        names = npz_class_names(data["path"], k)
    except Exception:  # unknown file name and K: the names are only a label
        return None
    return list(names) if len(names) == k else None


def collapse_label(runs: Sequence[dict[str, Any]]) -> str:
    """'class 0 (normal) vs rest': the binary collapse sensitivity/specificity are of, K > 2."""
    for run in runs:
        names = class_names(run)
        if names and is_multiclass(run):
            return f"class 0 ({names[0]}) vs rest"
    return "class 0 vs rest"


def run_value(run: dict[str, Any], metric: str) -> tuple[float | None, Interval | None]:
    """(value, its own interval {value, low, high} or None) of one table metric of one run.

    With predictions (run["stats"]) value and interval are one statistic of run_statistics, so
    they cannot disagree; without, the summary.json value and no per-run interval.
    """
    stats = run.get("stats")
    test = run.get("test") or {}
    multi = is_multiclass(run)
    if multi and metric in ("acc", "auroc"):
        key = "acc" if metric == "acc" else "auroc_macro"
        if stats and stats.get("multiclass"):
            item = stats["multiclass"][key]
            return item["value"], item
        summary_key = "test/acc" if metric == "acc" else "test/auroc_macro"
        return test.get(summary_key), None
    if multi and metric == "f1":
        return test.get("test/f1"), None  # macro F1 at argmax (torchmetrics)
    if stats:
        item = stats["test"]["auroc"] if metric == "auroc" else stats["test"]["0.5"].get(metric)
        if item:
            return item["value"], item
    return test.get(f"test/{metric}"), None
