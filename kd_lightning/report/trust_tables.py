"""The trust layer's sections of results.md and its CSVs (paired.csv, the extra columns of
results.csv): intervals, validation-chosen operating points, calibration, paired verdicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kd_lightning.report.trust import method_summary, threshold_title

POINT_METRICS = ("acc", "sensitivity", "specificity", "f1")
POINT_TITLES = {"acc": "ACC", "sensitivity": "sens", "specificity": "spec", "f1": "F1"}
CALIBRATION = (
    ("ece", "ECE (%)", 100),
    ("brier", "Brier", 1),
    ("temperature", "T (fit on val)", 1),
    ("ece_scaled", "ECE after T (%)", 100),
    ("brier_scaled", "Brier after T", 1),
)


def _interval(summary: dict[str, Any] | None, scale: float = 100, digits: int = 2) -> str:
    if not summary or summary.get("mean") is None:
        return "—"
    mean = f"{scale * summary['mean']:.{digits}f}"
    std = "—" if summary.get("n", 1) < 2 else f"{scale * summary['std']:.{digits}f}"
    if summary.get("low") is None:
        return f"{mean} ± {std}"
    low, high = scale * summary["low"], scale * summary["high"]
    return f"{mean} ± {std} [{low:.{digits}f}, {high:.{digits}f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _row_name(row: dict[str, Any]) -> str:
    return row["method"] + (f" [{row['config']}]" if row.get("config") else "")


def trust_markdown(
    students: Sequence[dict[str, Any]],
    teachers: Sequence[dict[str, Any]],
    paired: Sequence[dict[str, Any]],
    thresholds: Sequence[str],
    md_table: Any,
    k: int = 2,
    collapse: str = "class 0 vs rest",
) -> list[str]:
    """The sections added when predictions exist (md_table: tables._md_table). For K > 2 the
    operating points are of the binary collapse `collapse` (score 1 - p(class 0)), so titled,
    and the AUROC and paired tests are the macro one-vs-rest AUROC's and top-1 ACC's."""
    rows = [r for r in [*students, *teachers] if any(run.get("stats") for run in r["runs"])]
    if not rows:
        return []
    summaries = {id(r): method_summary(r) for r in rows}
    multi = k > 2
    lines = [
        "",
        "## Operating points chosen on validation, applied to test"
        + (f" ({collapse})" if multi else ""),
        "",
        "Each run picks its thresholds on its validation predictions only (never on test): "
        "Youden's J (max sensitivity + specificity - 1) and the highest threshold reaching the "
        "target sensitivity; 0.5 is shown for reference. Cells: mean ± std [95% interval] in %, "
        "over seeds (Student t), or over test images (stratified bootstrap) for one run.",
    ]
    if multi:
        lines[-1] += (
            f" {k} classes: every number in these tables is of the binary collapse {collapse} "
            "(score 1 - p(class 0); positive = any class but 0): sens = recall of the other "
            "classes taken together, spec = recall of class 0, ACC (2-class) = accuracy of that "
            "2-class decision, not the top-1 accuracy of the Students table."
        )
    titles = {**POINT_TITLES, "acc": "ACC (2-class)"} if multi else POINT_TITLES
    for name in thresholds:
        lines += ["", f"### Threshold: {threshold_title(name)}", ""]
        header = ["model", "role", "n", "threshold (mean)"]
        header += [f"{titles[m]} (%)" for m in POINT_METRICS]
        body = []
        for row in rows:
            summary = summaries[id(row)]
            cut = [r["stats"]["thresholds"][name] for r in row["runs"] if r.get("stats")]
            body.append(
                [_name(row), _role(row), len(cut), f"{sum(cut) / len(cut):.3f}"]
                + [_interval(summary.get(f"{name}/{m}")) for m in POINT_METRICS]
            )
        lines += md_table(header, body)
    lines += [
        "",
        "## Calibration on test",
        "",
        "ECE: top-label expected calibration error, 15 equal-width confidence bins; Brier: mean "
        "(p - y)^2 of the positive class (binary) or summed over classes; both again after "
        "temperature scaling (one scalar T fitted by NLL on validation). Mean ± std [95% interval]"
        " over seeds.",
        "",
    ]
    lines += md_table(
        ["model", "role", "n", *(title for _, title, _ in CALIBRATION)],
        (
            [_name(r), _role(r), summaries[id(r)]["auroc"]["n"]]
            + [
                _interval(summaries[id(r)].get(key), scale, 2 if scale == 100 else 3)
                for key, _, scale in CALIBRATION
            ]
            for r in rows
        ),
    )
    lines += _paired_markdown(paired, md_table, k)
    what = "macro one-vs-rest AUROC" if multi else "AUROC"
    lines += ["", f"## Per-run test {what} (%, stratified bootstrap 95% interval over images)", ""]
    body = []
    for row in rows:
        for run in sorted((r for r in row["runs"] if r.get("stats")), key=lambda r: str(r["seed"])):
            multiclass = run["stats"].get("multiclass")
            auroc = multiclass["auroc_macro"] if multiclass else run["stats"]["test"]["auroc"]
            body.append(
                [
                    _name(row),
                    run["seed"],
                    f"{100 * auroc['value']:.2f}",
                    f"[{100 * auroc['low']:.2f}, {100 * auroc['high']:.2f}]",
                ]
            )
    lines += md_table(
        ["model", "seed", "AUROC macro OvR" if multi else "AUROC", "95% interval"], body
    )
    lines += [
        "",
        "## Pictures",
        "",
        f"![ROC per method ({collapse})](roc.png)" if multi else "![ROC per method](roc.png)",
        "",
        "![reliability diagrams](calibration.png)",
        "",
        "![confusion matrices at the Youden threshold"
        + (f" ({collapse})" if multi else "")
        + "](confusion.png)",
    ]
    return lines


def _name(row: dict[str, Any]) -> str:
    return row.get("name") if row.get("role") in ("teacher", "ta", "teacher/ta") else _row_name(row)


def _role(row: dict[str, Any]) -> str:
    return row.get("role") or "student"


def paired_titles(k: int = 2) -> tuple[tuple[str, str], ...]:
    """(metric, title) of the paired comparisons: the headline metrics of a K-class study."""
    if k > 2:
        return (("auroc", "macro AUROC (one-vs-rest)"), ("acc", "top-1 ACC"))
    return (("auroc", "AUROC"), ("acc", "ACC at the Youden threshold"))


def _paired_markdown(paired: Sequence[dict[str, Any]], md_table: Any, k: int = 2) -> list[str]:
    lines = ["", "## Paired against Base on the same test images", ""]
    if not paired:
        return lines + ["None: needs a base run and another method with predictions."]
    per_seed = (
        "Per seed, each method against Base of the same seed on the same test images: Δ macro "
        "one-vs-rest AUROC by a paired class-stratified bootstrap (the same resampled images "
        "for both models; percentile 95% interval, p = twice the smaller tail beyond 0), Δ "
        "top-1 ACC (argmax) by McNemar's exact test with a paired-bootstrap 95% interval. "
        if k > 2
        else "Per seed, each method against Base of the same seed on the same test images: "
        "ΔAUROC by DeLong's test (95% interval, p), ΔACC at each model's Youden threshold "
        "(chosen on validation) by McNemar's exact test with a paired-bootstrap 95% interval. "
    )
    lines += [
        per_seed + "Across "
        "seeds: mean Δ with a Student-t 95% interval, the seeds where the method beats Base, "
        "and a one-sample t-test of the per-seed Δ (with one seed, that seed's test); p Holm: "
        "Holm-adjusted over the methods compared with the same Base (per study-axis value); "
        "verdict at 5% after Holm. Differences in percentage points.",
        "",
    ]
    # Students of several networks (deploy_cpu): the same method appears once per network, each
    # paired with that network's Base, so the row must say which.
    several_archs = len({result["arch"] for result in paired}) > 1
    for metric, title in paired_titles(k):
        lines += [f"### Δ {title}", ""]
        header = [
            "method",
            *(["arch"] if several_archs else []),
            "per seed: Δ (p)",
            "mean Δ [95% interval]",
            "wins",
            "test",
            "p",
            "p Holm",
            "verdict",
        ]
        body = []
        for result in paired:
            combined = result[metric]
            per_seed = "; ".join(
                f"s{s['seed']}: {100 * s[metric]['diff']:+.2f} ({_p(s[metric]['p'])})"
                for s in result["seeds"]
            )
            body.append(
                [
                    _row_name(result),
                    *([result["arch"]] if several_archs else []),
                    per_seed,
                    _signed_interval(combined),
                    f"{combined['wins']}/{combined['n']}",
                    combined["test"],
                    _p(combined["p"]),
                    _p(combined.get("p_holm")),
                    f"**{combined['verdict']}**",
                ]
            )
        lines += md_table(header, body) + [""]
    return lines


def _signed_interval(combined: dict[str, Any]) -> str:
    text = f"{100 * combined['mean']:+.2f}"
    if combined.get("low") is not None:
        text += f" [{100 * combined['low']:+.2f}, {100 * combined['high']:+.2f}]"
    return text


def paired_csv_rows(paired: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """paired.csv: one row per (method, metric, seed) and one per (method, metric) across seeds."""
    header = [
        "method",
        "config",
        "arch",
        "metric",
        "seed",
        "diff",
        "low",
        "high",
        "p",
        "test",
        "wins",
        "n",
        "p_holm",
        "verdict",
    ]
    body: list[list[Any]] = []
    for result in paired:
        for metric in ("auroc", "acc"):
            for s in result["seeds"]:
                item = s[metric]
                body.append(
                    [
                        result["method"],
                        result["config"],
                        result["arch"],
                        metric,
                        s["seed"],
                        item["diff"],
                        item["low"],
                        item["high"],
                        item["p"],
                        item["test"],
                        "",
                        1,
                        "",
                        "",
                    ]
                )
            c = result[metric]
            body.append(
                [
                    result["method"],
                    result["config"],
                    result["arch"],
                    metric,
                    "all",
                    c["mean"],
                    c["low"],
                    c["high"],
                    c["p"],
                    c["test"],
                    c["wins"],
                    c["n"],
                    c.get("p_holm"),
                    c.get("verdict"),
                ]
            )
    return header, body


def trust_csv_columns(row: dict[str, Any]) -> dict[str, Any]:
    """Extra results.csv columns of a row: every statistic's mean, std, low, high."""
    out: dict[str, Any] = {}
    for key, summary in method_summary(row).items():
        base = key.replace("/", "_")
        for part in ("mean", "std", "low", "high"):
            out[f"{base}_{part}"] = summary.get(part)
    return out


def axis_markdown(
    paired: Sequence[dict[str, Any]], axis: str, figure_name: str, md_table: Any, k: int = 2
) -> list[str]:
    """One table per metric: methods x axis values, each cell the across-seed paired verdict
    against Base at that value (mean Δ in points, Holm-adjusted p)."""
    values = sorted({r["variant"].get(axis) for r in paired if axis in r["variant"]}, key=float)
    methods = list(dict.fromkeys(r["method"] for r in paired))
    lines = [
        "",
        f"## Against Base at each {axis}",
        "",
        f"![test metrics against {axis}]({figure_name})",
        "",
        "Cells: mean Δ over seeds in points (Holm-adjusted p) and the verdict, from the paired "
        "tables above; each method is compared with Base at the same value.",
    ]
    for metric, title in paired_titles(k):
        lines += ["", f"### Δ {title}", ""]
        header = ["method", *(f"{axis} {v}" for v in values)]
        body = []
        for method in methods:
            cells = []
            for value in values:
                match = [
                    r for r in paired if r["method"] == method and r["variant"].get(axis) == value
                ]
                if not match:
                    cells.append("—")
                    continue
                c = match[0][metric]
                cells.append(f"{100 * c['mean']:+.2f} (p {_p(c.get('p_holm'))}) {c['verdict']}")
            body.append([method, *cells])
        lines += md_table(header, body)
    return lines
