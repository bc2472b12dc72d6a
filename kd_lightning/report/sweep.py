"""sweep.md / sweep.csv: one row per job of a Hydra multirun, sorted by a metric."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import write_bytes_atomic
from kd_lightning.report.reading import ReportError, _existing_dirs, collect_runs, read_overrides
from kd_lightning.report.tables import _csv_bytes, _md_table, _round


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

    write_bytes_atomic(
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
    write_bytes_atomic(paths["sweep.md"], "\n".join(md).encode())
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
