"""`python -m kd_lightning.export RUN_DIR [--teacher DIR] [--out DIR] [--repeats N] ...`"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kd_lightning.artifacts import EXPORT_DIR
from kd_lightning.export.errors import PROG, ExportError
from kd_lightning.export.pipeline import run_export
from kd_lightning.export.report import render_markdown

DESCRIPTION = (
    "ONNX and int8 export of a trained student, with an honest size / latency / accuracy report."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=DESCRIPTION)
    parser.add_argument("run_dir", type=Path, help="finished run: summary.json + model.pt")
    parser.add_argument(
        "--teacher",
        help="teacher run dir / summary.json / .ckpt (default: "
        "the teacher recorded in summary.json, if any)",
    )
    parser.add_argument("--out", type=Path, help=f"output folder (default RUN_DIR/{EXPORT_DIR})")
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=30,
        help="timed runs per latency figure (median reported)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="intra-op threads for onnxruntime and torch",
    )
    parser.add_argument(
        "--calib-images",
        type=_positive_int,
        default=256,
        help="training images used to calibrate int8 activations",
    )
    parser.add_argument(
        "--format",
        choices=["auto", "qdq", "qoperator"],
        default="auto",
        help="int8 ONNX form; auto builds both and keeps the faster",
    )
    parser.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="7-bit int8 weights; auto: on when the CPU lacks VNNI (avoids u8s8 saturation)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="max abs logit difference allowed between torch and ONNX",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out if args.out is not None else args.run_dir / EXPORT_DIR
    try:
        report = run_export(
            args.run_dir,
            out,
            teacher=args.teacher,
            repeats=args.repeats,
            threads=args.threads,
            calib_images=args.calib_images,
            fmt=args.format,
            atol=args.atol,
            reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range],
        )
    except ExportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(report), end="")
    if not report["onnx_check"]["passed"]:
        check = report["onnx_check"]
        print(
            f"{PROG}: error: ONNX and torch logits differ by {check['max_abs_diff']:.2e} "
            f"> atol {check['atol']:.0e} on {report['test_images']} test images",
            file=sys.stderr,
        )
        return 1
    return 0
