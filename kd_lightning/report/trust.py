"""The study's statistics from per-image predictions: per-run intervals and operating points,
per-method summaries over seeds, and every method paired against Base on the same test images.

Tests used (all in kd_lightning.report.statistics, whose docstrings state their assumptions):
- per run: stratified percentile bootstrap (2000 resamples) for AUROC and for ACC, sensitivity,
  specificity and F1 at 0.5 and at the thresholds chosen on validation (Youden's J, and the
  target sensitivity);
- per method over seeds: mean, sample std and a Student-t 95% interval (seeds are replicates of
  training; with one seed the run's bootstrap interval is shown instead);
- per seed against Base: DeLong's test for the AUROC difference (paired, same images: it uses
  the correlation between the two models' scores, which a bootstrap of each model alone
  ignores) and McNemar's exact test for the ACC difference at the Youden threshold (each model
  at its own validation-chosen threshold), with a paired-bootstrap 95% interval; for K > 2
  classes the headline metrics' own tests instead: a paired class-stratified bootstrap of the
  macro one-vs-rest AUROC difference, and McNemar's exact test on top-1 (argmax) correctness;
- across seeds: a one-sample t-test of the per-seed differences against 0 (the question "does
  the method beat Base over training randomness, on this test set"); with one seed, the
  per-seed test. Holm's step-down correction over the methods compared to Base gives the
  verdict: better / not distinguishable / worse at 5% (one family per study-axis value, e.g. per
  label fraction, since each value has its own Base).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.artifacts import (
    BASE_METHOD,
    ArtifactError,
    Predictions,
    has_predictions,
    read_predictions,
)
from kd_lightning.report import statistics as st
from kd_lightning.report.aggregate import base_candidates
from kd_lightning.report.reading import ReportError

THRESHOLD_TITLES = {"0.5": "0.5", "youden": "Youden (val)"}
# The metrics a method is summarized by over seeds: (key in flat stats, title).
PERCENT = ("auroc", "acc", "sensitivity", "specificity", "f1")


def attach_predictions(runs: Sequence[dict[str, Any]], evaluation: dict[str, Any]) -> list[str]:
    """Add `predictions` ({"val", "test"}) and `stats` (run_statistics) to each run that has
    predictions files; returns notes for the runs that have none."""
    notes = []
    missing = []
    settings = {
        "target_sensitivity": float(evaluation.get("target_sensitivity", 0.95)),
        "n_resamples": int(evaluation.get("bootstrap_resamples", 2000)),
        "seed": int(evaluation.get("bootstrap_seed", 0)),
        "n_bins": int(evaluation.get("calibration_bins", 15)),
    }
    for run in runs:
        run_dir = Path(run["dir"])
        if not has_predictions(run_dir):
            run["predictions"], run["stats"] = None, None
            missing.append(run_dir)
            continue
        try:
            val, test = read_predictions(run_dir, "val"), read_predictions(run_dir, "test")
        except ArtifactError as err:
            raise ReportError(str(err)) from err
        run["predictions"] = {"val": val, "test": test}
        run["stats"] = _stored_statistics(run, settings) or st.run_statistics(
            val.label, val.logits, test.label, test.logits, **settings
        )
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        notes.append(
            f"{len(missing)} run(s) have no predictions/ files ({shown}): no intervals, operating "
            "points or paired tests for them; rerun the study's command to write them (it "
            "trains nothing for finished runs)"
        )
    return notes


def _stored_statistics(run: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """summary.json's statistics when they were computed with these settings: the run computed
    them from the same predictions (float64 from the files' exact values), so recomputing the
    2000-resample bootstrap of every run for every report is work done twice."""
    stored = (run.get("summary") or {}).get("statistics")
    if not isinstance(stored, dict):
        return None
    if any(stored.get(key) != value for key, value in settings.items()):
        return None
    return stored


def threshold_names(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The thresholds of the runs' statistics, 0.5 first: ["0.5", "youden", "sens95"]."""
    for run in runs:
        if run.get("stats"):
            return list(run["stats"]["thresholds"])
    return []


def threshold_title(name: str) -> str:
    if name in THRESHOLD_TITLES:
        return THRESHOLD_TITLES[name]
    if name.startswith("sens"):
        return f"sensitivity {name[4:]}% (val)"
    return name


def flat_stats(stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{"auroc": {value, low, high}, "youden/acc": {...}, "ece": {value}, ...} of one run.

    "auroc" is the headline AUROC: of the positive score for K = 2, the macro one-vs-rest AUROC
    for K > 2, where "acc" is the top-1 accuracy and "binary_auroc" the AUROC of the class 0 vs
    rest collapse that the threshold metrics ("0.5/acc", ...) are of."""
    test = stats["test"]
    multi = stats.get("multiclass")
    if multi:
        flat = {"auroc": multi["auroc_macro"], "acc": multi["acc"], "binary_auroc": test["auroc"]}
    else:
        flat = {"auroc": test["auroc"]}
    for name in stats["thresholds"]:
        for metric, interval in test[name].items():
            flat[f"{name}/{metric}"] = interval
    for key in ("ece", "brier", "temperature", "ece_scaled", "brier_scaled"):
        flat[key] = {"value": stats["calibration"][key]}
    return flat


def method_summary(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per statistic of a study row: t_interval over the seeds' values; with one run, that run's
    bootstrap interval (`low`/`high`) and `interval: bootstrap`."""
    runs = [r for r in row["runs"] if r.get("stats")]
    if not runs:
        return {}
    flats = [flat_stats(r["stats"]) for r in runs]
    out = {}
    for key in flats[0]:
        values = [f[key]["value"] for f in flats if key in f]
        summary = st.t_interval(values)
        summary["interval"] = "t over seeds"
        if summary.get("low") is not None:
            # Proportions, ECE and Brier live in [0, 1], a temperature above 0: the t interval
            # is clipped to where the quantity can be.
            high = summary["high"] if key == "temperature" else min(1.0, summary["high"])
            summary.update(low=max(0.0, summary["low"]), high=high)
        if len(values) == 1 and "low" in flats[0][key]:
            summary.update(low=flats[0][key]["low"], high=flats[0][key]["high"])
            summary["interval"] = "bootstrap over images"
        out[key] = summary
    return out


def same_images(a: Predictions, b: Predictions) -> bool:
    """Both predict the same images (index) with the same labels, in the same order."""
    return (
        a.label.shape == b.label.shape
        and bool((a.label == b.label).all())
        and bool((a.index == b.index).all())
    )


def paired_against_base(
    rows: Sequence[dict[str, Any]], evaluation: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each student row against the Base row of its architecture (or the only Base row), seed by
    seed on the same test images, then across seeds, with Holm over the methods compared."""
    notes: list[str] = []
    bases = [r for r in rows if r["method"] == BASE_METHOD]
    n_resamples = int(evaluation.get("bootstrap_resamples", 2000))
    seed = int(evaluation.get("bootstrap_seed", 0))
    results = []
    for row in rows:
        if row["method"] == BASE_METHOD or not bases:
            continue
        candidates = base_candidates(row, bases)
        if len(candidates) != 1:
            continue  # several Base configurations: no single reference
        base = candidates[0]
        base_by_seed = {r["seed"]: r for r in base["runs"] if r.get("stats")}
        per_seed = []
        for run in sorted((r for r in row["runs"] if r.get("stats")), key=lambda r: str(r["seed"])):
            ref = base_by_seed.get(run["seed"])
            if ref is None:
                continue
            ours, theirs = run["predictions"]["test"], ref["predictions"]["test"]
            if not same_images(ours, theirs):
                notes.append(
                    f"{row['method']} seed {run['seed']} and base were tested on different "
                    "images (index or labels differ): not paired"
                )
                continue
            per_seed.append(_paired_seed(run, ref, n_resamples, seed))
        if not per_seed:
            continue
        results.append(
            {
                "method": row["method"],
                "config": row.get("config", ""),
                "arch": row["arch"],
                "variant": row["runs"][0]["summary"].get("variant") or {},
                "seeds": per_seed,
                "auroc": _combined([p["auroc"] for p in per_seed]),
                "acc": _combined([p["acc"] for p in per_seed]),
            }
        )
    apply_holm(results)
    return results, notes


def apply_holm(results: Sequence[dict[str, Any]]) -> None:
    """Holm over the methods compared with the same Base: one family per study-axis value (e.g.
    each label fraction has its own Base and its own family), so the correction counts the
    methods compared, not methods x axis values. Adds `p_holm` and `verdict` per metric."""
    families: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        key = tuple(sorted((result.get("variant") or {}).items()))
        families.setdefault(key, []).append(result)
    for family in families.values():
        for metric in ("auroc", "acc"):
            adjusted = st.holm([r[metric]["p"] for r in family])
            for result, p_adj in zip(family, adjusted, strict=True):
                result[metric]["p_holm"] = p_adj
                result[metric]["verdict"] = (
                    st.verdict(result[metric]["mean"], p_adj) if p_adj is not None else "—"
                )


def _paired_seed(
    run: dict[str, Any], ref: dict[str, Any], n_resamples: int, seed: int
) -> dict[str, Any]:
    ours, theirs = run["predictions"]["test"], ref["predictions"]["test"]
    if ours.num_classes > 2:
        return _paired_seed_multiclass(run, ours, theirs, n_resamples, seed)
    labels = (ours.label != 0).astype(np.int64)
    delong = st.delong_test(labels, ours.positive_score, theirs.positive_score)
    t_ours = run["stats"]["thresholds"]["youden"]
    t_theirs = ref["stats"]["thresholds"]["youden"]
    pred_ours = (ours.positive_score > t_ours).astype(np.int64)
    pred_theirs = (theirs.positive_score > t_theirs).astype(np.int64)
    mcnemar = st.mcnemar_test(labels, pred_ours, pred_theirs)
    boot = st.paired_bootstrap_accuracy(
        labels, pred_ours, pred_theirs, n_resamples=n_resamples, seed=seed
    )
    return {
        "seed": run["seed"],
        "auroc": {
            "diff": delong["diff"],
            "low": delong["low"],
            "high": delong["high"],
            "p": delong["p"],
            "test": "DeLong",
        },
        "acc": {
            "diff": mcnemar["diff"],
            "low": boot["low"],
            "high": boot["high"],
            "p": mcnemar["p"],
            "test": "McNemar exact (paired-bootstrap interval)",
        },
    }


def _paired_seed_multiclass(
    run: dict[str, Any], ours: Predictions, theirs: Predictions, n_resamples: int, seed: int
) -> dict[str, Any]:
    """K > 2: the headline metrics' own paired tests. Δ macro one-vs-rest AUROC by a paired
    class-stratified bootstrap over the same images (interval and p; DeLong covers one binary
    AUROC, not a mean of K correlated ones), Δ top-1 ACC by McNemar's exact test on argmax
    correctness with a paired-bootstrap interval."""
    boot_auc = st.paired_bootstrap_macro_auroc(
        ours.label, ours.probs, theirs.probs, n_resamples=n_resamples, seed=seed
    )
    pred_ours, pred_theirs = ours.probs.argmax(axis=1), theirs.probs.argmax(axis=1)
    mcnemar = st.mcnemar_test(ours.label, pred_ours, pred_theirs)
    boot_acc = st.paired_bootstrap_accuracy(
        ours.label, pred_ours, pred_theirs, n_resamples=n_resamples, seed=seed
    )
    return {
        "seed": run["seed"],
        "auroc": {
            "diff": boot_auc["diff"],
            "low": boot_auc["low"],
            "high": boot_auc["high"],
            "p": boot_auc["p"],
            "test": "paired bootstrap (macro AUROC)",
        },
        "acc": {
            "diff": mcnemar["diff"],
            "low": boot_acc["low"],
            "high": boot_acc["high"],
            "p": mcnemar["p"],
            "test": "McNemar exact on top-1 (paired-bootstrap interval)",
        },
    }


def _combined(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    diffs = [p["diff"] for p in per_seed]
    if len(diffs) >= 2:
        test = st.seed_test(diffs)
        interval = st.t_interval(diffs)
        p, name = test["p"], "t-test over seeds"
        if test["t"] is None and any(d != 0 for d in diffs):
            # Equal per-seed differences (a discrete metric such as ACC moving by the same few
            # images in every seed) leave the t-test without a variance: its p = 0 would call
            # two seeds of +2 images "better". Claim a difference only if every seed's own test
            # does (intersection-union): the largest per-seed p.
            p = max(float(s["p"]) for s in per_seed)
            name = "largest per-seed p (equal Δ in every seed: t-test undefined)"
        return {
            "n": test["n"],
            "mean": test["mean"],
            "std": test["std"],
            "low": interval["low"],
            "high": interval["high"],
            "wins": test["wins"],
            "p": p,
            "test": name,
        }
    only = per_seed[0]
    return {
        "n": 1,
        "mean": only["diff"],
        "std": None,
        "low": only["low"],
        "high": only["high"],
        "wins": int(only["diff"] > 0),
        "p": only["p"],
        "test": only["test"] + " (one seed)",
    }
