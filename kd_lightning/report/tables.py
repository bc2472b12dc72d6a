"""results.md, results.csv and teachers.csv."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import write_bytes_atomic
from kd_lightning.report.aggregate import METRICS, paired_differences, student_rows, teacher_rows
from kd_lightning.report.convergence import (
    convergence_csv_rows,
    convergence_markdown,
    convergence_rows,
)
from kd_lightning.report.figures import (
    AXIS_FIGURES,
    axis_figure,
    calibration_figure,
    confusion_figure,
    convergence_figure,
    curves_figure,
    png_bytes,
    roc_figure,
    study_axes,
)
from kd_lightning.report.headline import collapse_label, run_classes, study_classes
from kd_lightning.report.reading import ReportError
from kd_lightning.report.trust import attach_predictions, paired_against_base, threshold_names
from kd_lightning.report.trust_tables import (
    axis_markdown,
    paired_csv_rows,
    trust_csv_columns,
    trust_markdown,
)

METRIC_TITLES = {
    "acc": "ACC",
    "auroc": "AUROC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
}
METRIC_LINE = (
    "Test-set metrics in %, mean ± sample std over seeds [95% interval: Student t over seeds; "
    "with one seed, a stratified bootstrap over the test images; clipped to [0, 100]]: "
    "ACC = (TP+TN)/(TP+TN+FP+FN) at "
    "threshold 0.5 (the paper's eq. 1); AUROC = area under the ROC curve of the pneumonia "
    "score; sensitivity = TP/(TP+FN) (pneumonia recall); specificity = TN/(TN+FP) (normal "
    "recall); F1 = 2TP/(2TP+FP+FN)."
)


def metric_titles(k: int, collapse: str) -> dict[str, str]:
    """Column titles of METRICS for a study of K classes (headline.py says what each is)."""
    if k <= 2:
        return dict(METRIC_TITLES)
    return {
        "acc": "ACC top-1",
        "auroc": "AUROC macro OvR",
        "sensitivity": f"sensitivity, {collapse}",
        "specificity": f"specificity, {collapse}",
        "f1": "F1 macro",
    }


def metric_line(k: int, collapse: str) -> str:
    """The paragraph defining the Students table's columns for a study of K classes."""
    if k <= 2:
        return METRIC_LINE
    return (
        f"Test-set metrics in %, {k} classes, mean ± sample std over seeds [95% interval: "
        "Student t over seeds; with one seed, a class-stratified bootstrap over the test images "
        "of that same statistic; clipped to [0, 100]]: ACC top-1 = share of test images whose "
        "argmax class is the true class; AUROC macro OvR = mean over the classes of the "
        "one-vs-rest AUROC of p(class k) (medmnist.Evaluator's AUC); F1 macro = mean over "
        "classes of the F1 at argmax (torchmetrics; no per-run interval, so with one seed none "
        f"is shown); sensitivity and specificity are of the binary collapse {collapse}: score "
        "1 - p(class 0) at threshold 0.5, sensitivity = recall of the other classes taken "
        "together, specificity = recall of class 0 (the operating-point tables below use the "
        "same collapse)."
    )


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue().encode()


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _pct(
    mean: float | None,
    std: float | None,
    n: int,
    low: float | None = None,
    high: float | None = None,
) -> str:
    if mean is None:
        return "—"
    interval = "" if low is None or high is None else f" [{100 * low:.2f}, {100 * high:.2f}]"
    if n < 2 or std is None:
        return f"{100 * mean:.2f} ± —{interval}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}{interval}"


def _pct_row(row: dict[str, Any], metric: str) -> str:
    return _pct(
        row[f"{metric}_mean"],
        row[f"{metric}_std"],
        row["n"],
        row.get(f"{metric}_low"),
        row.get(f"{metric}_high"),
    )


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _params(value: Any) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, (int, float)) else "—"


def _mb(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "—"


def _seeds(seeds: Sequence[Any]) -> str:
    return " ".join(str(s) for s in sorted(seeds, key=str))


def write_report(
    runs: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    metric: str = "test/auroc",
    notes: Sequence[str] = (),
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write results.md, results.csv, teachers.csv and curves.png into `out_dir`; where runs
    have per-image predictions, also paired.csv, roc.png, calibration.png and confusion.png;
    where student runs have per-epoch test metrics (epoch_test), convergence.png/.csv.

    Each file replaces an earlier one atomically. `metric` is reported in the summary-level
    paired comparison (runs without predictions) next to ACC and AUROC; `notes` become bullet
    points in results.md; `evaluation` holds the statistics' settings (target_sensitivity,
    bootstrap_resamples, bootstrap_seed, calibration_bins; the run config's defaults).
    Returns {file name: path}.
    """
    if not runs:
        raise ReportError(f"no runs to report into {out_dir}; expected runs from collect_runs")
    evaluation = dict(evaluation or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = [*notes, *attach_predictions(runs, evaluation)]
    students, teachers = student_rows(runs), teacher_rows(runs)
    k, collapse = study_classes(runs), collapse_label(runs)
    if k > 2 and metric == "test/auroc":
        metric = "test/auroc_macro"  # the set's own AUROC; test/auroc is the class 0 collapse
    paired = paired_differences(students, metric)
    trusted, trust_notes = paired_against_base(students, evaluation)
    notes += trust_notes
    ks = sorted({run_classes(r) or 2 for r in runs})
    if len(ks) > 1:
        notes.append(
            f"the runs have different numbers of classes ({ks}): the tables are labelled for "
            f"{k}; rows of the other runs are not comparable with them"
        )
    paths = {name: out / name for name in ("results.csv", "teachers.csv", "results.md")}

    stat_cols = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "low", "high")]
    extra = [trust_csv_columns(r) for r in students]
    extra_cols = list(dict.fromkeys(k for cols in extra for k in cols))
    write_bytes_atomic(
        paths["results.csv"],
        _csv_bytes(
            ["method", "config", "arch", "n", "seeds", *stat_cols, "parameters", "model_mb"]
            + extra_cols,
            (
                [r["method"], r["config"], r["arch"], r["n"], _seeds(r["seeds"])]
                + [_round(r[c]) for c in stat_cols]
                + [r["parameters"], r["model_mb"]]
                + [_round(cols.get(c)) for c in extra_cols]
                for r, cols in zip(students, extra, strict=True)
            ),
        ),
    )
    teacher_cols = [f"{m}_{s}" for m in ("acc", "auroc") for s in ("mean", "std", "low", "high")]
    write_bytes_atomic(
        paths["teachers.csv"],
        _csv_bytes(
            [
                "name",
                "role",
                "method",
                "arch",
                "n",
                "seeds",
                *teacher_cols,
                "parameters",
                "model_mb",
            ],
            (
                [r["name"], r["role"], r["method"], r["arch"], r["n"], _seeds(r["seeds"])]
                + [_round(r[c]) for c in teacher_cols]
                + [r["parameters"], r["model_mb"]]
                for r in teachers
            ),
        ),
    )
    paths["curves.png"] = out / "curves.png"
    write_bytes_atomic(paths["curves.png"], png_bytes(curves_figure(runs)))
    if any(run.get("stats") for run in runs):
        header, body = paired_csv_rows(trusted)
        paths["paired.csv"] = out / "paired.csv"
        write_bytes_atomic(paths["paired.csv"], _csv_bytes(header, body))
        bins = int(evaluation.get("calibration_bins", 15))
        for name, figure in (
            ("roc.png", roc_figure(students, collapse if k > 2 else None)),
            ("calibration.png", calibration_figure(students, n_bins=bins)),
            ("confusion.png", confusion_figure(students, collapse=collapse if k > 2 else None)),
        ):
            paths[name] = out / name
            write_bytes_atomic(paths[name], png_bytes(figure))
        for axis in study_axes(students):
            name = AXIS_FIGURES.get(axis, f"{axis}.png")
            paths[name] = out / name
            write_bytes_atomic(paths[name], png_bytes(axis_figure(students, axis)))

    convergence = convergence_rows(students)
    if convergence:
        paths["convergence.png"] = out / "convergence.png"
        write_bytes_atomic(paths["convergence.png"], png_bytes(convergence_figure(convergence)))
        paths["convergence.csv"] = out / "convergence.csv"
        header, body = convergence_csv_rows(convergence)
        write_bytes_atomic(paths["convergence.csv"], _csv_bytes(header, body))

    all_notes = [*notes, *_duplicate_notes(students + teachers)]
    md = _results_markdown(
        runs, students, teachers, paired, metric, all_notes, trusted, k=k, collapse=collapse
    )
    md += "\n".join(convergence_markdown(convergence, _md_table))
    write_bytes_atomic(paths["results.md"], md.encode())
    return paths


def _duplicate_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    for row in rows:
        seeds = [s for s in row["seeds"] if s is not None]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if repeated:
            label = row.get("name", row.get("method"))
            notes.append(
                f"{label} ({row['arch']}) has more than one run for seed(s) {repeated}; all count "
                "in its mean and std, and each seed's runs are averaged for pairing"
            )
    return notes


def _results_markdown(
    runs: Sequence[dict[str, Any]],
    students: Sequence[dict[str, Any]],
    teachers: Sequence[dict[str, Any]],
    paired: Sequence[dict[str, Any]],
    metric: str,
    notes: Sequence[str],
    trusted: Sequence[dict[str, Any]] = (),
    k: int = 2,
    collapse: str = "class 0 vs rest",
) -> str:
    titles = metric_titles(k, collapse)
    n_students = sum(r["role"] == "student" for r in runs)
    lines = [
        "# Study results",
        "",
        f"{len(runs)} finished stage runs ({n_students} student, {len(runs) - n_students} "
        "teacher/TA/other).",
        "",
        metric_line(k, collapse),
        "",
        "## Students",
        "",
    ]
    with_config = any(r["config"] for r in students)
    if students:
        header = ["method", *(["config"] if with_config else []), "arch", "n", "seeds"]
        header += [f"{titles[m]} (%)" for m in METRICS] + ["params (M)", "size (MB)"]
        lines += _md_table(
            header,
            (
                [r["method"], *([r["config"] or "—"] if with_config else []), r["arch"], r["n"]]
                + [_seeds(r["seeds"])]
                + [_pct_row(r, m) for m in METRICS]
                + [_params(r["parameters"]), _mb(r["model_mb"])]
                for r in students
            ),
        )
    else:
        lines.append("No student runs (role student) found.")
    lines += ["", "## Teachers and teaching assistants", ""]
    if teachers:
        lines += _md_table(
            ["name", "role", "method", "arch", "n", f"{titles['acc']} (%)"]
            + [f"{titles['auroc']} (%)"]
            + ["params (M)", "size (MB)"],
            (
                [r["name"], r["role"], r["method"], r["arch"], r["n"]]
                + [_pct_row(r, "acc"), _pct_row(r, "auroc")]
                + [_params(r["parameters"]), _mb(r["model_mb"])]
                for r in teachers
            ),
        )
    else:
        lines.append("No teacher or TA runs found.")
    trust = trust_markdown(
        students, teachers, trusted, threshold_names(runs), _md_table, k=k, collapse=collapse
    )
    if trust:
        for axis in study_axes(students):
            name = AXIS_FIGURES.get(axis, f"{axis}.png")
            trust += axis_markdown(trusted, axis, name, _md_table, k=k)
        lines += trust
    else:  # no predictions files (runs written before them): seed-level differences only
        lines += ["", "## Paired differences against base (same seed)", ""]
        if paired:
            short = metric.removeprefix("test/")
            lines += [
                "Mean ± sample std of (method − base) over the seeds both ran, in percentage "
                "points; "
                f"t is the paired t statistic of Δ {short}, * marks |t| above the two-sided 5% "
                "critical value; 'better' counts seeds where the method beat base on "
                f"{short}. Seed-to-seed spread on this data is as large as method effects.",
                "",
            ]
            names = list(dict.fromkeys(["test/acc", "test/auroc", metric]))
            header = ["method", *(["config"] if with_config else []), "arch", "pairs"]
            header += [f"Δ {_delta_name(n, k, collapse)} (pp)" for n in names] + [
                f"t ({short})",
                "better",
            ]
            lines += _md_table(
                header,
                (
                    [
                        p["method"],
                        *([p["config"] or "—"] if with_config else []),
                        p["arch"],
                        p["pairs"],
                    ]
                    + [_pp(p[n]) for n in names]
                    + [_t(p[metric]), f"{p[metric]['better']}/{p[metric]['n']}"]
                    for p in paired
                ),
            )
        else:
            lines.append("None: needs base and another method with at least 2 shared seeds.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "## Validation curves", "", "![validation loss and accuracy](curves.png)", ""]
    return "\n".join(lines)


def _delta_name(name: str, k: int, collapse: str) -> str:
    short = name.removeprefix("test/")
    if k > 2 and short in ("auroc", "sensitivity", "specificity"):
        return f"{short} ({collapse})"
    return "acc (top-1)" if k > 2 and short == "acc" else short


def _pp(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "—"
    std = "—" if stats["std"] is None else f"{100 * stats['std']:.2f}"
    return f"{100 * stats['mean']:+.2f} ± {std}"


def _t(stats: dict[str, Any]) -> str:
    if stats["t"] is None:
        return "—"
    return f"{stats['t']:+.2f}" + ("*" if stats["significant"] else "")
