"""Study results from finished run directories: `results.md`, `results.csv`, `teachers.csv` and
`curves.png` (the paper's Table 5.3 and Figures 3-4), `convergence.png` / `convergence.csv` where
runs have per-epoch test metrics (+callbacks=epoch_test), or `sweep.md` / `sweep.csv` for a
multirun.

    python -m kd_lightning.report DIR... [--out OUT_DIR] [--metric test/auroc]
    python -m kd_lightning.report MULTIRUN_DIR --sweep [--metric test/auroc]

It reads files only (summary.json, logs/metrics.csv, .hydra/overrides.yaml, chain.json) and imports
nothing of the training code, so it runs on results copied off a cluster without torch installed.
"""

from __future__ import annotations

from kd_lightning.report.aggregate import (
    METRICS,
    PAPER_ORDER,
    method_rank,
    paired_differences,
    student_rows,
    teacher_rows,
)
from kd_lightning.report.cli import main
from kd_lightning.report.figures import curves_figure
from kd_lightning.report.reading import (
    ReportError,
    collect_runs,
    read_curves,
    read_overrides,
    unfinished_chain_steps,
)
from kd_lightning.report.sweep import write_sweep_table
from kd_lightning.report.tables import write_report

__all__ = [
    "METRICS",
    "PAPER_ORDER",
    "ReportError",
    "collect_runs",
    "curves_figure",
    "main",
    "method_rank",
    "paired_differences",
    "read_curves",
    "read_overrides",
    "student_rows",
    "teacher_rows",
    "unfinished_chain_steps",
    "write_report",
    "write_sweep_table",
]
