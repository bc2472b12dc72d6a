"""The study's pictures, rendered through matplotlib's Agg canvas without pyplot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_lightning.report.aggregate import student_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_PANELS = (("val/loss", "Validation loss"), ("val/acc", "Validation accuracy"))


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def curves_figure(runs: Sequence[dict[str, Any]]) -> Figure:
    """The paper's Figures 3 and 4 side by side: validation loss and accuracy per epoch, one
    line per student method (mean over seeds) with a shaded min-max band across seeds."""
    # A bare Figure renders through Agg without pyplot: no display, no global figure registry,
    # and no backend switch inside a caller's process (chain.py calls write_report in-process).
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = student_rows(runs)
    with_config = any(r["config"] for r in rows)
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    figure.suptitle("Student methods: mean over seeds, shaded band = min-max over seeds")
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, row in enumerate(rows):
        label = row["method"] + (f" [{row['config']}]" if with_config and row["config"] else "")
        if len({r["arch"] for r in rows}) > 1:
            label += f" ({row['arch']})"
        color = colors[index % len(colors)]
        for ax, (key, _) in zip(axes, CURVE_PANELS, strict=True):
            series = [run["curves"].get(key, {}) for run in row["runs"]]
            epochs = sorted(set().union(*series))
            if not epochs:
                continue
            values = [[s[e] for s in series if e in s] for e in epochs]
            mean = [float(np.mean(v)) for v in values]
            ax.plot(epochs, mean, color=color, label=f"{label} (n={row['n']})", marker=".")
            if row["n"] > 1:
                lows, highs = [min(v) for v in values], [max(v) for v in values]
                ax.fill_between(epochs, lows, highs, color=color, alpha=0.18, linewidth=0)
    for ax, (key, title) in zip(axes, CURVE_PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {key} in logs/metrics.csv", ha="center", transform=ax.transAxes)
    return figure


# ------------------------------------------------------------------------------------------------
# From per-image predictions (rows whose runs carry `predictions` and `stats`, see trust.py)


def _with_predictions(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list]]:
    out = []
    for row in rows:
        runs = [r for r in row["runs"] if r.get("predictions")]
        if runs:
            out.append((row, runs))
    return out


def _label(row: dict[str, Any], n: int) -> str:
    config = f" [{row['config']}]" if row.get("config") else ""
    return f"{row['method']}{config} (n={n})"


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1), predicting score > t."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, positive = scores[order], labels[order] != 0
    # One point per distinct score: the last index of each run of tied scores.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def roc_figure(rows: Sequence[dict[str, Any]], collapse: str | None = None) -> Figure:
    """Test ROC per method: TPR averaged over seeds on a common FPR grid (vertical averaging),
    with each seed's validation-chosen operating points (Youden's J: circle, target sensitivity:
    square) placed at their test FPR/TPR, averaged over seeds. `collapse` (K > 2: e.g. "class 0
    (normal) vs rest") names the binary collapse the curve is of, in the title and legend."""
    import matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 6), layout="constrained")
    ax = figure.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    grid = np.linspace(0.0, 1.0, 201)
    for index, (row, runs) in enumerate(_with_predictions(rows)):
        color = colors[index % len(colors)]
        tprs = []
        for run in runs:
            test = run["predictions"]["test"]
            fpr, tpr = roc_curve_points(test.label, test.positive_score)
            tprs.append(np.interp(grid, fpr, tpr))
        auroc = np.mean([r["stats"]["test"]["auroc"]["value"] for r in runs])
        ax.plot(
            grid,
            np.mean(tprs, axis=0),
            color=color,
            label=f"{_label(row, len(runs))} AUROC{f' ({collapse})' if collapse else ''} "
            f"{100 * auroc:.2f}",
        )
        for name, marker in (("youden", "o"), (_sens_key(runs[0]), "s")):
            if name is None:
                continue
            points = [r["stats"]["test"][name] for r in runs]
            x = np.mean([1 - p["specificity"]["value"] for p in points])
            y = np.mean([p["sensitivity"]["value"] for p in points])
            ax.plot(
                [x],
                [y],
                marker=marker,
                color=color,
                markersize=8,
                linestyle="none",
                markeredgecolor="black",
            )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(
        f"Test ROC{f' of {collapse}' if collapse else ''}, mean over seeds\n"
        "● Youden, ■ target sensitivity (thresholds chosen on val)",
        fontsize=10,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower right")
    return figure


def _sens_key(run: dict[str, Any]) -> str | None:
    return next((k for k in run["stats"]["thresholds"] if k.startswith("sens")), None)


def _panels(n: int, width: float = 3.4) -> tuple[Figure, list]:
    from matplotlib.figure import Figure

    cols = max(1, min(4, n))
    rows = (n + cols - 1) // cols
    figure = Figure(figsize=(width * cols, width * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.remove()
    return figure, axes[:n]


def calibration_figure(rows: Sequence[dict[str, Any]], n_bins: int = 15) -> Figure:
    """Reliability diagram per method: accuracy against mean confidence (top-label) in
    `n_bins` equal-width bins, test predictions pooled over seeds; marker area ~ bin count."""
    from kd_lightning.report.statistics import reliability

    items = _with_predictions(rows)
    figure, axes = _panels(max(1, len(items)))
    figure.suptitle(f"Reliability on test ({n_bins} equal-width confidence bins, seeds pooled)")
    for ax, (row, runs) in zip(axes, items, strict=False):
        labels = np.concatenate([r["predictions"]["test"].label for r in runs])
        probs = np.concatenate([r["predictions"]["test"].probs for r in runs])
        bins = reliability(labels, probs, n_bins=n_bins)
        count = np.asarray(bins["count"], dtype=float)
        keep = count > 0
        conf, acc = np.asarray(bins["confidence"])[keep], np.asarray(bins["accuracy"])[keep]
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.plot(conf, acc, color="C0", linewidth=1)
        ax.scatter(conf, acc, s=10 + 200 * count[keep] / count.sum(), color="C0", zorder=3)
        ece = np.mean([r["stats"]["calibration"]["ece"] for r in runs])
        ax.set_title(f"{_label(row, len(runs))}\nECE {100 * ece:.1f}%", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if not items:
        axes[0].text(0.5, 0.5, "no predictions files", ha="center", transform=axes[0].transAxes)
    return figure


def confusion_figure(
    rows: Sequence[dict[str, Any]], threshold: str = "youden", collapse: str | None = None
) -> Figure:
    """Test confusion matrix per method at the validation-chosen `threshold`, counts averaged
    over seeds (rows: true class, columns: predicted; pneumonia = score > threshold). K > 2:
    `collapse` (e.g. "class 0 (normal) vs rest") names the 2x2 matrix's binary collapse."""
    items = _with_predictions(rows)
    figure, axes = _panels(max(1, len(items)), width=3.0)
    figure.suptitle(
        f"Test confusion{f' of {collapse}' if collapse else ''} at the {threshold} threshold "
        "chosen on validation, mean over seeds"
    )
    names = ("class 0", "rest") if collapse else ("normal", "pneumonia")
    for ax, (row, runs) in zip(axes, items, strict=False):
        matrices = []
        for run in runs:
            test = run["predictions"]["test"]
            truth = (test.label != 0).astype(int)
            pred = (test.positive_score > run["stats"]["thresholds"][threshold]).astype(int)
            matrices.append(np.bincount(2 * truth + pred, minlength=4).reshape(2, 2))
        mean = np.mean(matrices, axis=0)
        ax.imshow(mean, cmap="Blues", vmin=0)
        for i in range(2):
            for j in range(2):
                ax.text(
                    j,
                    i,
                    f"{mean[i, j]:.1f}",
                    ha="center",
                    va="center",
                    color="white" if mean[i, j] > mean.max() / 2 else "black",
                )
        ax.set_xticks([0, 1], names)
        ax.set_yticks([0, 1], names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(_label(row, len(runs)), fontsize=9)
    if not items:
        axes[0].text(0.5, 0.5, "no predictions files", ha="center", transform=axes[0].transAxes)
    return figure


# Figure file of a study axis (chain.axes); others are named after the axis.
AXIS_FIGURES = {"labeled_fraction": "scarce.png"}


def axis_values(row: dict[str, Any], axis: str) -> Any:
    """The row's value on a study axis (summary.json's variant), or None."""
    return (row["runs"][0]["summary"].get("variant") or {}).get(axis)


def study_axes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Axes on which the rows take more than one value (e.g. labeled_fraction)."""
    found: dict[str, set] = {}
    for row in rows:
        for key, value in (row["runs"][0]["summary"].get("variant") or {}).items():
            found.setdefault(key, set()).add(value)
    return [key for key, values in found.items() if len(values) > 1]


def axis_figure(rows: Sequence[dict[str, Any]], axis: str) -> Figure:
    """Test AUROC and test ACC at the validation-chosen Youden threshold against a study axis
    (log x for label fractions), one line per method: mean over seeds with a Student-t 95%
    band (clipped to [0, 1]). K > 2: the macro one-vs-rest AUROC and the top-1 ACC instead."""
    import matplotlib
    from matplotlib.figure import Figure

    from kd_lightning.report.statistics import t_interval

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    multi = any((run.get("stats") or {}).get("multiclass") for row in rows for run in row["runs"])
    panels = (
        (("auroc", "test macro AUROC (one-vs-rest)"), ("acc", "test top-1 ACC"))
        if multi
        else (("auroc", "test AUROC"), ("youden/acc", "test ACC at the Youden threshold (val)"))
    )
    for index, method in enumerate(methods):
        points = sorted(
            (float(axis_values(r, axis)), r)
            for r in rows
            if r["method"] == method and axis_values(r, axis) is not None
        )
        for ax, (key, _) in zip(axes, panels, strict=True):
            xs, means, lows, highs = [], [], [], []
            for x, row in points:
                values = [_stat(run, key) for run in row["runs"] if run.get("stats")]
                if not values:
                    continue
                interval = t_interval(values)
                xs.append(x)
                means.append(interval["mean"])
                lows.append(max(0.0, interval["low"] if interval["low"] is not None else values[0]))
                highs.append(
                    min(1.0, interval["high"] if interval["high"] is not None else values[0])
                )
            if not xs:
                continue
            color = colors[index % len(colors)]
            n = min(len(r["runs"]) for _, r in points)
            ax.plot(xs, means, marker="o", color=color, label=f"{method} (n>={n})")
            ax.fill_between(xs, lows, highs, color=color, alpha=0.15, linewidth=0)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    figure.suptitle(f"Test metrics against {axis}: mean over seeds, band = 95% t interval")
    return figure


def _stat(run: dict[str, Any], key: str) -> float:
    test, multiclass = run["stats"]["test"], run["stats"].get("multiclass")
    if multiclass and key in ("auroc", "acc"):  # K > 2: the headline metrics
        return float(multiclass["auroc_macro" if key == "auroc" else "acc"]["value"])
    if key == "auroc":
        return float(test["auroc"]["value"])
    name, metric = key.split("/")
    return float(test[name][metric]["value"])


def convergence_figure(entries: Sequence[dict[str, Any]]) -> Figure:
    """Test AUROC (top) and ACC at argmax (bottom) after every epoch, one column per study-axis
    value, one line per method: mean over seeds with a Student t 95% band (clipped to [0, 1]).
    `entries` come from convergence.convergence_rows; the values from the per-epoch test pass,
    which never picks the model."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys(e["panel"] for e in entries)) or [()]
    figure = Figure(figsize=(max(9.0, 4.4 * len(panels) + 1), 7.5), layout="constrained")
    axes = figure.subplots(2, len(panels), squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(e["label"] for e in entries))
    for col, panel in enumerate(panels):
        title = " ".join(f"{k}={v}" for k, v in panel) or "all runs"
        for row, (metric, name) in enumerate((("auroc", "test AUROC"), ("acc", "test ACC"))):
            ax = axes[row][col]
            for entry in (e for e in entries if e["panel"] == panel):
                index = labels.index(entry["label"])
                color = colors[index % len(colors)]
                curve = entry[metric]
                ax.plot(
                    entry["epochs"],
                    curve["mean"],
                    marker=".",
                    color=color,
                    # More methods than colours (methods_cpu has 11): the next cycle is dashed.
                    linestyle=("-", "--", ":")[index // len(colors) % 3],
                    label=f"{entry['label']} (n={entry['n']})",
                )
                if entry["n"] > 1:
                    low = [
                        m if v is None else max(0.0, v)
                        for m, v in zip(curve["mean"], curve["low"], strict=True)
                    ]
                    high = [
                        m if v is None else min(1.0, v)
                        for m, v in zip(curve["mean"], curve["high"], strict=True)
                    ]
                    ax.fill_between(
                        entry["epochs"], low, high, color=color, alpha=0.15, linewidth=0
                    )
            ax.set_title(f"{name}, {title}", fontsize=10)
            ax.set_xlabel("epochs trained")
            ax.set_ylabel(f"{name} after the epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    figure.suptitle(
        "Convergence: per-epoch test pass (EpochTestEvaluation),\nnever used to pick the model; "
        "mean over seeds, band = 95% t interval; ACC at argmax (0.5)",
        fontsize=11,
    )
    return figure
