"""python -m kd_lightning.report: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import SUMMARY_FILE
from kd_lightning.report.reading import ReportError, collect_runs, unfinished_chain_steps
from kd_lightning.report.sweep import write_sweep_table
from kd_lightning.report.tables import write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = _OneLineParser(
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
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)
    evaluation = evaluation_settings(args)
    out_dir = Path(args.out or args.dirs[0])
    try:
        if args.sweep:
            paths = write_sweep_table(args.dirs, out_dir, args.metric)
        else:
            runs = collect_runs(args.dirs)
            if not runs:
                raise ReportError(
                    f"no {SUMMARY_FILE} found below {', '.join(args.dirs)}; expected stage run "
                    "directories written by `python -m kd_lightning` (finished runs)"
                )
            notes = unfinished_chain_steps(args.dirs)
            paths = write_report(
                runs, out_dir, metric=args.metric, notes=notes, evaluation=evaluation
            )
    except ReportError as err:
        print(f"kd_lightning.report: error: {err}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The statistics settings every report command takes (`evaluation_settings` reads them)."""
    parser.add_argument(
        "--target-sensitivity",
        type=_fraction,
        default=0.95,
        help="second operating point, chosen on validation (default 0.95)",
    )
    parser.add_argument(
        "--bootstrap-resamples",
        type=_at_least(200),
        default=2000,
        help="stratified bootstrap resamples per interval (default 2000)",
    )
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--calibration-bins", type=_at_least(2), default=15)


def evaluation_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "target_sensitivity": args.target_sensitivity,
        "bootstrap_resamples": args.bootstrap_resamples,
        "bootstrap_seed": args.bootstrap_seed,
        "calibration_bins": args.calibration_bins,
    }


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"kd_lightning.report: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in (0, 1], e.g. 0.95")
    return value


def _at_least(minimum: int):  # noqa: ANN202 - argparse type factory
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value

    return parse
