"""Study results from finished run directories: `results.md`, `results.csv`, `teachers.csv` and
`curves.png` (the paper's Table 5.3 and Figures 3-4), or `sweep.md` / `sweep.csv` for a multirun.

    python -m kd_lightning.report DIR... [--out OUT_DIR] [--metric test/auroc]
    python -m kd_lightning.report MULTIRUN_DIR --sweep [--metric test/auroc]

It reads files only (summary.json, logs/metrics.csv, .hydra/overrides.yaml, chain.json) and imports
nothing of the training code, so it runs on results copied off a cluster without torch installed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SUMMARY = "summary.json"
CHAIN_FILE = "chain.json"
PAPER_ORDER = (
    "base",
    "nst_linear",
    "nst_poly",
    "nst_gaussian",
    "kd",
    "nst_poly_kd",
    "nst_poly_ta",
)
METRICS = ("acc", "auroc", "sensitivity", "specificity", "f1")
METRIC_TITLES = {
    "acc": "ACC",
    "auroc": "AUROC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
}
CURVE_PANELS = (("val/loss", "Validation loss"), ("val/acc", "Validation accuracy"))
METRIC_LINE = (
    "Test-set metrics in %, mean ± sample std over seeds: ACC = (TP+TN)/(TP+TN+FP+FN) at "
    "threshold 0.5 (the paper's eq. 1); AUROC = area under the ROC curve of the pneumonia "
    "score; sensitivity = TP/(TP+FN) (pneumonia recall); specificity = TN/(TN+FP) (normal "
    "recall); F1 = 2TP/(2TP+FP+FN)."
)
# Overrides that name the replicate or the output, not the configuration; they never split a
# method's seeds into separate rows (Hydra's override_dirname excludes the same keys).
REPLICATE_KEYS = ("seed", "experiment", "name")
REQUIRED_KEYS = ("method", "role", "test")
# Two-sided 5% critical values of Student's t for df = 1..30; beyond 30 the df=30 value is used,
# which is slightly conservative. A table keeps scipy out of a file-reading tool.
T_CRIT_05 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


class ReportError(ValueError):
    """A problem with the input directories that the user can fix; main prints it as one line."""


# ----------------------------------------------------------------------------------------------
# Reading


def collect_runs(dirs: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Every finished stage run (a directory with summary.json) below `dirs`, once each.

    Steps of a chain.json found below `dirs` whose directory lies elsewhere (a teacher trained
    in another place) are included too. Each run is a dict with keys: dir, summary_path, name,
    method, role, seed, arch, parameters, model_file_mb, epochs, seconds_per_epoch, test,
    best_val, overrides (list of Hydra override strings, [] outside a multirun), chain (chain
    name or None), curves ({"val/loss": {epoch: value}, ...}) and summary (the raw dict).
    """
    roots = _existing_dirs(dirs)
    found: dict[Path, str | None] = {}
    for root in roots:
        for path in sorted(root.rglob(SUMMARY)):
            found.setdefault(path.resolve(), None)
    for chain in _read_chains(roots):
        for step_dir in chain["step_dirs"]:
            path = (step_dir / SUMMARY).resolve()
            if path.is_file():
                found[path] = chain["name"]
    return [_read_run(path, chain) for path, chain in sorted(found.items())]


def unfinished_chain_steps(dirs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """One line per chain step below `dirs` that is not done, for the report's notes."""
    lines = []
    for chain in _read_chains(_existing_dirs(dirs)):
        for step in chain["unfinished"]:
            lines.append(
                f"chain {chain['name']!r} ({chain['path']}): step {step.get('dir')} "
                f"({step.get('arch') or '?'}, {step.get('method') or '?'}, seed "
                f"{step.get('seed')}) is {step.get('status')}"
            )
    return lines


def _existing_dirs(dirs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    roots = []
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ReportError(
                f"{path} {what}; expected a run, chain or multirun directory (or a parent)"
            )
        roots.append(path)
    return roots


def _read_json(path: Path, expected: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err}); expected {expected}") from err


def _read_chains(roots: Sequence[Path]) -> list[dict[str, Any]]:
    chains = []
    seen: set[Path] = set()
    for root in roots:
        for path in sorted(root.rglob(CHAIN_FILE)):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            payload = _read_json(path, "a chain.json written by kd_lightning.chain")
            steps = payload.get("steps") if isinstance(payload, dict) else None
            if not isinstance(steps, list):
                raise ReportError(f"{path} has no 'steps' list; expected a kd_lightning chain.json")
            chain_dir = path.parent
            step_dirs, unfinished = [], []
            for step in steps:
                if not isinstance(step, dict):
                    continue
                if step.get("dir"):
                    # Relative dirs are relative to the chain directory, wherever it was copied.
                    step_dirs.append(chain_dir / str(step["dir"]))
                if step.get("status") != "done":
                    unfinished.append(step)
            name = str(payload.get("name") or chain_dir.name)
            chains.append(
                {"name": name, "path": path, "step_dirs": step_dirs, "unfinished": unfinished}
            )
    return chains


def _read_run(path: Path, chain: str | None) -> dict[str, Any]:
    summary = _read_json(path, "a summary.json written by kd_lightning.run")
    if not isinstance(summary, dict):
        raise ReportError(f"{path} holds a {type(summary).__name__}; expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    if missing or not isinstance(summary.get("test"), dict):
        raise ReportError(
            f"{path} lacks {missing or ['a test dict']}; expected a kd_lightning stage summary "
            f"with keys {list(REQUIRED_KEYS)}"
        )
    run_dir = path.parent
    model = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    return {
        "dir": run_dir,
        "summary_path": path,
        "name": str(summary.get("name") or run_dir.name),
        "method": str(summary["method"]),
        "role": str(summary["role"]),
        "seed": summary.get("seed"),
        "arch": str(model.get("arch") or "?"),
        "parameters": summary.get("parameters"),
        "model_file_mb": summary.get("model_file_mb"),
        "epochs": summary.get("epochs"),
        "seconds_per_epoch": summary.get("seconds_per_epoch"),
        "test": _numbers(summary["test"]),
        "best_val": _numbers(summary.get("best_val") or {}),
        "overrides": read_overrides(run_dir),
        "chain": chain,
        "curves": read_curves(run_dir),
        "summary": summary,
    }


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def read_overrides(run_dir: Path) -> list[str]:
    """The Hydra overrides behind a run: its own `.hydra/overrides.yaml` (a multirun job), else
    those of the chain job it is a step of (one or two levels below chain.json), else []."""
    for candidate in (run_dir, run_dir.parent, run_dir.parent.parent):
        path = candidate / ".hydra" / "overrides.yaml"
        if path.is_file() and (candidate == run_dir or (candidate / CHAIN_FILE).is_file()):
            return _parse_overrides(path)
    return []


def _parse_overrides(path: Path) -> list[str]:
    text = path.read_text()
    try:
        import yaml  # installed with hydra; the fallback covers copies read without it
    except ImportError:
        # Hydra writes a flat block list, one override per "- item" line.
        return [_unquote(line[1:].strip()) for line in text.splitlines() if line.startswith("-")]
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ReportError(
            f"{path} is not valid YAML ({err}); expected a list of overrides"
        ) from err
    if items is None:
        return []
    if not isinstance(items, list):
        raise ReportError(f"{path} holds a {type(items).__name__}; expected a list of overrides")
    return [str(item) for item in items]


def _unquote(item: str) -> str:
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        return item[1:-1]
    return item


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per-epoch validation metrics from Lightning's CSVLogger file: {"val/loss": {0: 0.61, ...}}.

    CSVLogger rows are sparse (train and validation rows share a header) and an epoch can appear
    in several rows, or again after a resume; the last value logged for an epoch wins.
    """
    path = _metrics_csv(run_dir)
    if path is None:
        return {}
    curves: dict[str, dict[int, float]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "epoch" not in reader.fieldnames:
            raise ReportError(f"{path} has no 'epoch' column; expected a Lightning CSVLogger file")
        columns = [c for c in reader.fieldnames if c.startswith("val/")]
        for row in reader:
            epoch = _float(row.get("epoch"))
            if epoch is None:
                continue
            for column in columns:
                value = _float(row.get(column))
                if value is not None:
                    curves.setdefault(column, {})[int(epoch)] = value
    return curves


def _metrics_csv(run_dir: Path) -> Path | None:
    primary = run_dir / "logs" / "metrics.csv"
    if primary.is_file():
        return primary
    # CSVLogger with a numbered version (logs/version_N/metrics.csv): the newest is the live one.
    others = sorted((run_dir / "logs").glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def _float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Aggregating


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
        sets = [
            {o for o in run["overrides"] if _override_key(o) not in REPLICATE_KEYS} for run in runs
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
        values = [m["test"][f"test/{metric}"] for m in members if f"test/{metric}" in m["test"]]
        row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
    return row


def paired_differences(
    rows: Sequence[dict[str, Any]], metric: str = "test/auroc"
) -> list[dict[str, Any]]:
    """Each student row against base (same arch if base has one) over the seeds both ran.

    Rows with fewer than 2 shared seeds are left out: one pair cannot separate a method from
    seed noise, which on this data is as large as the method effects (platform notes).
    """
    metrics = list(dict.fromkeys(["test/acc", "test/auroc", metric]))
    bases = [r for r in rows if r["method"] == "base"]
    out = []
    for row in rows:
        if row["method"] == "base" or not bases:
            continue
        same_arch = [b for b in bases if b["arch"] == row["arch"]]
        candidates = same_arch or bases
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


# ----------------------------------------------------------------------------------------------
# Writing


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue().encode()


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _pct(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "—"
    if n < 2 or std is None:
        return f"{100 * mean:.2f} ± —"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


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
) -> dict[str, Path]:
    """Write results.md, results.csv, teachers.csv and curves.png into `out_dir`.

    Each file replaces an earlier one atomically. `metric` is reported in the paired
    comparison with base next to ACC and AUROC; `notes` become bullet points in results.md.
    Returns {file name: path}.
    """
    if not runs:
        raise ReportError(f"no runs to report into {out_dir}; expected runs from collect_runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    students, teachers = student_rows(runs), teacher_rows(runs)
    paired = paired_differences(students, metric)
    paths = {name: out / name for name in ("results.csv", "teachers.csv", "results.md")}

    stat_cols = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    _write_atomic(
        paths["results.csv"],
        _csv_bytes(
            ["method", "config", "arch", "n", "seeds", *stat_cols, "parameters", "model_mb"],
            (
                [r["method"], r["config"], r["arch"], r["n"], _seeds(r["seeds"])]
                + [_round(r[c]) for c in stat_cols]
                + [r["parameters"], r["model_mb"]]
                for r in students
            ),
        ),
    )
    teacher_cols = ["acc_mean", "acc_std", "auroc_mean", "auroc_std"]
    _write_atomic(
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
    figure = curves_figure(runs)
    paths["curves.png"] = out / "curves.png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    _write_atomic(paths["curves.png"], buffer.getvalue())

    all_notes = [*notes, *_duplicate_notes(students + teachers)]
    md = _results_markdown(runs, students, teachers, paired, metric, all_notes)
    _write_atomic(paths["results.md"], md.encode())
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
) -> str:
    n_students = sum(r["role"] == "student" for r in runs)
    lines = [
        "# Study results",
        "",
        f"{len(runs)} finished stage runs ({n_students} student, {len(runs) - n_students} "
        "teacher/TA/other).",
        "",
        METRIC_LINE,
        "",
        "## Students",
        "",
    ]
    with_config = any(r["config"] for r in students)
    if students:
        header = ["method", *(["config"] if with_config else []), "arch", "n", "seeds"]
        header += [f"{METRIC_TITLES[m]} (%)" for m in METRICS] + ["params (M)", "size (MB)"]
        lines += _md_table(
            header,
            (
                [r["method"], *([r["config"] or "—"] if with_config else []), r["arch"], r["n"]]
                + [_seeds(r["seeds"])]
                + [_pct(r[f"{m}_mean"], r[f"{m}_std"], r["n"]) for m in METRICS]
                + [_params(r["parameters"]), _mb(r["model_mb"])]
                for r in students
            ),
        )
    else:
        lines.append("No student runs (role student) found.")
    lines += ["", "## Teachers and teaching assistants", ""]
    if teachers:
        lines += _md_table(
            ["name", "role", "method", "arch", "n", "ACC (%)", "AUROC (%)"]
            + ["params (M)", "size (MB)"],
            (
                [r["name"], r["role"], r["method"], r["arch"], r["n"]]
                + [_pct(r["acc_mean"], r["acc_std"], r["n"])]
                + [_pct(r["auroc_mean"], r["auroc_std"], r["n"])]
                + [_params(r["parameters"]), _mb(r["model_mb"])]
                for r in teachers
            ),
        )
    else:
        lines.append("No teacher or TA runs found.")
    lines += ["", "## Paired differences against base (same seed)", ""]
    if paired:
        short = metric.removeprefix("test/")
        lines += [
            "Mean ± sample std of (method − base) over the seeds both ran, in percentage points; "
            f"t is the paired t statistic of Δ {short}, * marks |t| above the two-sided 5% "
            "critical value; 'better' counts seeds where the method beat base on "
            f"{short}. Seed-to-seed spread on this data is as large as method effects.",
            "",
        ]
        names = list(dict.fromkeys(["test/acc", "test/auroc", metric]))
        header = ["method", *(["config"] if with_config else []), "arch", "pairs"]
        header += [f"Δ {n.removeprefix('test/')} (pp)" for n in names] + [f"t ({short})", "better"]
        lines += _md_table(
            header,
            (
                [p["method"], *([p["config"] or "—"] if with_config else []), p["arch"], p["pairs"]]
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


def _pp(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "—"
    std = "—" if stats["std"] is None else f"{100 * stats['std']:.2f}"
    return f"{100 * stats['mean']:+.2f} ± {std}"


def _t(stats: dict[str, Any]) -> str:
    if stats["t"] is None:
        return "—"
    return f"{stats['t']:+.2f}" + ("*" if stats["significant"] else "")


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


# ----------------------------------------------------------------------------------------------
# Multirun sweep table


def write_sweep_table(
    dirs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    metric: str = "test/auroc",
) -> dict[str, Path]:
    """sweep.md and sweep.csv: one row per job directory below `dirs` with its overrides (one
    column per overridden key) and final metrics (test/* and best_val), best first by `metric`.

    `metric` is a test metric (test/auroc), a monitored validation metric (val/auroc, read from
    best_val) or best_val/<name>. Losses sort ascending, everything else descending. Job
    directories with overrides but no summary.json anywhere below them (failed or unfinished)
    are listed last with status 'no summary'.
    """
    roots = _existing_dirs(dirs)
    runs = collect_runs(roots)
    rows = [_sweep_row(run["dir"], run, roots) for run in runs]
    finished = [run["dir"] for run in runs]
    for root in roots:
        for overrides in sorted(root.rglob(".hydra/overrides.yaml")):
            job = overrides.parent.parent
            if not any(d == job.resolve() or job.resolve() in d.parents for d in finished):
                rows.append(_sweep_row(job, None, roots))
    if not rows:
        raise ReportError(
            f"no summary.json or .hydra/overrides.yaml below {', '.join(map(str, roots))}; "
            "expected a Hydra multirun directory with finished jobs"
        )
    values = [_metric_value(row, metric) for row in rows if row["status"] == "done"]
    if values and all(v is None for v in values):
        available = sorted({k for row in rows for k in row["metrics"]})
        raise ReportError(f"no job has metric {metric!r}; available: {available}")
    ascending = metric.endswith("loss")

    def key(row: dict[str, Any]) -> tuple[int, float, str]:
        value = _metric_value(row, metric)
        if value is None or math.isnan(value):
            return (1, 0.0, row["job"])
        return (0, value if ascending else -value, row["job"])

    rows.sort(key=key)
    # seed has its own column (also for runs outside a multirun), so it is not repeated.
    override_cols = list(dict.fromkeys(k for row in rows for k in row["overrides"] if k != "seed"))
    metric_cols = sorted({k for row in rows for k in row["metrics"]}, key=_metric_col_rank)
    if _metric_col(metric) in metric_cols:
        metric_cols.remove(_metric_col(metric))
        metric_cols.insert(0, _metric_col(metric))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sweep.csv": out / "sweep.csv", "sweep.md": out / "sweep.md"}
    header = ["rank", "job", "status", "method", "seed", *override_cols, *metric_cols]

    def cells(rank: int, row: dict[str, Any], fmt: Any) -> list[Any]:
        return (
            [rank, row["job"], row["status"], row["method"], row["seed"]]
            + [row["overrides"].get(k, "") for k in override_cols]
            + [fmt(row["metrics"].get(k)) for k in metric_cols]
        )

    _write_atomic(
        paths["sweep.csv"],
        _csv_bytes(header, (cells(i, r, _round) for i, r in enumerate(rows, 1))),
    )
    order = "ascending (lower is better)" if ascending else "descending"
    md = [
        "# Sweep results",
        "",
        f"{sum(r['status'] == 'done' for r in rows)} finished of {len(rows)} jobs under "
        f"{', '.join(f'`{r}`' for r in roots)}, sorted by {metric} {order}. Override columns "
        "are the job's `.hydra/overrides.yaml`; metrics are the best checkpoint's test metrics "
        "and best_val/* the monitored validation value.",
        "",
        *_md_table(header, (cells(i, r, _fmt_metric) for i, r in enumerate(rows, 1))),
        "",
    ]
    _write_atomic(paths["sweep.md"], "\n".join(md).encode())
    return paths


def _sweep_row(job: Path, run: dict[str, Any] | None, roots: Sequence[Path]) -> dict[str, Any]:
    overrides: dict[str, str] = {}
    for item in run["overrides"] if run else read_overrides(job):
        key, _, value = item.partition("=")
        overrides[key.lstrip("+")] = value
    metrics: dict[str, float] = {}
    if run:
        metrics.update(run["test"])
        metrics.update({f"best_{k}": v for k, v in run["best_val"].items()})
    return {
        "job": _relative(job, roots),
        "status": "done" if run else "no summary",
        "method": run["method"] if run else "",
        "seed": run["seed"] if run else overrides.get("seed", ""),
        "overrides": overrides,
        "metrics": metrics,
    }


def _relative(path: Path, roots: Sequence[Path]) -> str:
    for root in roots:
        try:
            rel = path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else root.name
    return str(path)


def _metric_col(metric: str) -> str:
    return metric if metric.startswith(("test/", "best_")) else f"best_{metric}"


def _metric_value(row: dict[str, Any], metric: str) -> float | None:
    metrics = row["metrics"]
    if metric in metrics:
        return metrics[metric]
    return metrics.get(_metric_col(metric))


def _metric_col_rank(column: str) -> tuple[int, str]:
    return (column.startswith("best_"), column)


def _fmt_metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kd_lightning.report",
        description="Rebuild study results (results.md/.csv, teachers.csv, curves.png) or a "
        "multirun sweep table (--sweep) from finished run directories.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run, chain or multirun dirs")
    parser.add_argument("--out", metavar="OUT_DIR", help="output directory (default: first DIR)")
    parser.add_argument(
        "--metric",
        default="test/auroc",
        help="sweep sort key, and the extra metric of the paired comparison (default test/auroc)",
    )
    parser.add_argument("--sweep", action="store_true", help="write sweep.md/.csv instead")
    args = parser.parse_args(argv)
    out_dir = Path(args.out or args.dirs[0])
    try:
        if args.sweep:
            paths = write_sweep_table(args.dirs, out_dir, args.metric)
        else:
            runs = collect_runs(args.dirs)
            if not runs:
                raise ReportError(
                    f"no {SUMMARY} found below {', '.join(args.dirs)}; expected stage run "
                    "directories written by `python -m kd_lightning` (finished runs)"
                )
            notes = unfinished_chain_steps(args.dirs)
            paths = write_report(runs, out_dir, metric=args.metric, notes=notes)
    except ReportError as err:
        print(f"kd_lightning.report: error: {err}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
