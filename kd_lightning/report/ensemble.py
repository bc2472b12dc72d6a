"""`python -m kd_lightning.report.ensemble RUN RUN [...] --out DIR`: an ensemble of finished runs.

The ensemble's logits are the mean of its members' logits on each validation and test image (the
members must have predicted the same images with the same labels). DIR gets the ensemble's
`predictions/val.csv` and `predictions/test.csv` and a `summary.json` (role teacher, method
ensemble) whose statistics are computed exactly as a trained run's, so `python -m
kd_lightning.report` lists it in the teacher table beside the runs it is compared with.
`ensemble.md` in DIR pairs the ensemble with each member, and with each `--compare` run (e.g. the
Base students), on the same test images: DeLong's test for the AUROC difference, Holm-adjusted
within each of the two families, and the verdict.

Only what the runs already predicted is used: nothing is trained or loaded into torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.artifacts import (
    PREDICTION_SPLITS,
    ArtifactError,
    Predictions,
    read_predictions,
    read_summary,
    write_bytes_atomic,
    write_json_atomic,
    write_predictions,
)
from kd_lightning.report.cli import _OneLineParser, add_evaluation_arguments, evaluation_settings
from kd_lightning.report.reading import ReportError
from kd_lightning.report.statistics.calibration import softmax
from kd_lightning.report.statistics.discrimination import medmnist_acc, medmnist_auc
from kd_lightning.report.statistics.paired import delong_test
from kd_lightning.report.statistics.seeds import holm, verdict
from kd_lightning.report.statistics.summary import run_statistics
from kd_lightning.report.trust import same_images

ENSEMBLE_REPORT = "ensemble.md"


def _finished_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Predictions]]:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; expected a finished run directory")
    try:
        summary = read_summary(run_dir)
        if summary is None:
            raise ReportError(
                f"{run_dir} has no summary.json; expected a finished run (rerun its command)"
            )
        return summary, {split: read_predictions(run_dir, split) for split in PREDICTION_SPLITS}
    except ArtifactError as err:
        raise ReportError(str(err)) from err


def _check_same_images(
    reference_dir: Path, reference: Predictions, run_dir: Path, other: Predictions, split: str
) -> None:
    if not same_images(reference, other) or other.num_classes != reference.num_classes:
        raise ReportError(
            f"{run_dir}: its {split} predictions are not of the same images, labels and classes "
            f"as {reference_dir}'s; expected runs evaluated on the same data"
        )


def average_logits(
    members: Sequence[tuple[Path, dict[str, Predictions]]], split: str
) -> Predictions:
    """Mean of the members' logits on `split`; every member must list the same images and labels
    in the same order (one line naming the first that does not)."""
    first_dir, first = members[0][0], members[0][1][split]
    for run_dir, predictions in members[1:]:
        _check_same_images(first_dir, first, run_dir, predictions[split], split)
    logits = np.mean([p[split].logits for _, p in members], axis=0)
    return Predictions(first.index, first.label, logits, softmax(logits), first.files)


def build_ensemble(
    run_dirs: Sequence[Path], out_dir: Path, evaluation: dict[str, Any]
) -> tuple[dict[str, Any], Predictions, list[tuple[Path, Predictions]]]:
    """Write the ensemble's predictions and summary.json into `out_dir`; return the summary, the
    ensemble's test predictions and each member's (directory, test predictions)."""
    if len(run_dirs) < 2:
        raise ReportError(f"{len(run_dirs)} run given; expected at least 2 ensemble members")
    resolved = [Path(d).resolve() for d in run_dirs]
    if len(set(resolved)) != len(resolved):
        raise ReportError("a run is given twice; expected distinct ensemble members")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ReportError(
            f"--out {out_dir} exists and is not an empty directory; expected a new directory "
            "(nothing there is overwritten)"
        )
    loaded = [(Path(d), *_finished_run(Path(d))) for d in run_dirs]
    members = [(d, predictions) for d, _, predictions in loaded]
    averaged = {split: average_logits(members, split) for split in PREDICTION_SPLITS}
    summaries = [summary for _, summary, _ in loaded]
    archs = [str((s.get("model") or {}).get("arch", "?")) for s in summaries]
    data = summaries[0].get("data") or {}
    for run_dir, summary in zip(run_dirs[1:], summaries[1:], strict=True):
        other = summary.get("data") or {}
        for key in ("path", "image_size", "num_classes"):
            if other.get(key) != data.get(key):
                raise ReportError(
                    f"{run_dir}: data.{key}={other.get(key)!r}, but {run_dirs[0]} has "
                    f"{data.get(key)!r}; expected members trained on the same data"
                )
    test = averaged["test"]
    statistics = run_statistics(
        averaged["val"].label,
        averaged["val"].logits,
        test.label,
        test.logits,
        target_sensitivity=evaluation["target_sensitivity"],
        n_resamples=evaluation["bootstrap_resamples"],
        seed=evaluation["bootstrap_seed"],
        n_bins=evaluation["calibration_bins"],
    )
    arch = archs[0] if len(set(archs)) == 1 else "+".join(archs)
    summary = {
        "name": f"ensemble_{len(run_dirs)}x{arch}",
        "method": "ensemble",
        "role": "teacher",
        "seed": None,
        "members": [str(d) for d in resolved],
        "combination": "mean of the members' logits",
        "model": {"arch": arch},
        "parameters": sum(int(s.get("parameters") or 0) for s in summaries) or None,
        "data": data,
        "test": {
            "test/acc": float(medmnist_acc(test.label, test.probs)),
            "test/auroc": float(medmnist_auc(test.label, test.probs)),
        },
        "statistics": statistics,
    }
    for split, predictions in averaged.items():
        write_predictions(
            out_dir,
            split,
            predictions.index,
            predictions.label,
            predictions.logits,
            predictions.files,
        )
    write_json_atomic(out_dir / "summary.json", summary)
    return summary, test, [(d, predictions["test"]) for d, predictions in members]


def comparison_table(
    out_dir: Path,
    ensemble: Predictions,
    members: Sequence[tuple[Path, Predictions]],
    compared: Sequence[tuple[Path, Predictions]],
) -> list[str]:
    """Markdown lines: the ensemble (test predictions, written to `out_dir`) against each member and
    each compared run on the same test images, DeLong's test, Holm-adjusted within each family
    (members; compared runs)."""
    lines = [
        "| ensemble vs | its test AUROC % | Δ AUROC (ensemble - it) [95%] | p (DeLong) | p Holm "
        "| verdict |",
        "|---|---|---|---|---|---|",
    ]
    labels = ensemble.label != 0
    for kind, family in (("member", members), ("compare", compared)):
        results = []
        for run_dir, other in family:
            _check_same_images(out_dir, ensemble, run_dir, other, "test")
            results.append(delong_test(labels, ensemble.positive_score, other.positive_score))
        adjusted = holm([r["p"] for r in results])
        for (run_dir, _), result, p_holm in zip(family, results, adjusted, strict=True):
            lines.append(
                f"| {kind} {run_dir} | {100 * result['auroc_b']:.2f} | "
                f"{100 * result['diff']:+.2f} [{100 * result['low']:+.2f}, "
                f"{100 * result['high']:+.2f}] | {result['p']:.3g} | {p_holm:.3g} | "
                f"{verdict(result['diff'], p_holm)} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="python -m kd_lightning.report.ensemble",
        description="Average finished runs' logits into an ensemble run directory (predictions, "
        "summary.json with intervals) and compare it with its members and other runs (DeLong).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="finished member run directories")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="a new directory")
    parser.add_argument(
        "--compare", nargs="*", default=[], metavar="RUN", help="runs to pair the ensemble with"
    )
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)
    evaluation = evaluation_settings(args)
    out_dir = Path(args.out)
    try:
        members = [Path(r) for r in args.runs]
        # read (and refuse a bad --compare) before anything is written
        compared = [(Path(r), _finished_run(Path(r))[1]["test"]) for r in args.compare]
        summary, ensemble, member_tests = build_ensemble(members, out_dir, evaluation)
        auroc = summary["statistics"]["test"]["auroc"]
        lines = [
            f"# {summary['name']}: {summary['combination']} of {len(members)} runs",
            "",
            f"Test AUROC {100 * auroc['value']:.2f} [{100 * auroc['low']:.2f}, "
            f"{100 * auroc['high']:.2f}] (stratified bootstrap 95%, "
            f"{args.bootstrap_resamples} resamples).",
            "",
            *comparison_table(out_dir, ensemble, member_tests, compared),
        ]
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_bytes_atomic(out_dir / ENSEMBLE_REPORT, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
