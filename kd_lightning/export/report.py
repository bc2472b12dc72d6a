"""The export report: one row per measured model, the int8 goals, and the JSON / markdown files
(written atomically through kd_lightning.artifacts)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from kd_lightning.artifacts import (
    MODEL_FILE,
    MODEL_INT_FILE,
    write_bytes_atomic,
    write_json_atomic,
)
from kd_lightning.export.onnx import OPSET

REPORT_JSON = "export_report.json"
REPORT_MD = "export_report.md"
# The goals the int8 student is held to, relative to the fp32 student (checked against them in
# experiments/quantized_distill/README.md).
GOAL_SIZE_RATIO = 3.5
GOAL_SPEEDUP = 1.5
GOAL_MAX_ACC_DROP_POINTS = 1.0


def file_mb(path: Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 3)


def row(name: str, runtime: str, file: Path, params: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": name,
        "runtime": runtime,
        "file": str(file),
        "file_mb": file_mb(file),
        "parameters": params,
        **extra,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
    }


def goals(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    size_ratio = fp32["file_mb"] / int8["file_mb"]
    speedup = {
        k: round(fp32["latency_ms"][k] / int8["latency_ms"][k], 3) for k in fp32["latency_ms"]
    }
    drop = (fp32["test"]["acc"] - int8["test"]["acc"]) * 100
    return {
        "size_ratio": round(size_ratio, 3),
        "size_ratio_goal": GOAL_SIZE_RATIO,
        "size_met": size_ratio >= GOAL_SIZE_RATIO,
        "speedup": speedup,
        "speedup_goal": GOAL_SPEEDUP,
        "speed_met": all(v >= GOAL_SPEEDUP for v in speedup.values()),
        "acc_drop_points": round(drop, 3),
        "acc_drop_goal_points": GOAL_MAX_ACC_DROP_POINTS,
        "acc_met": drop <= GOAL_MAX_ACC_DROP_POINTS,
    }


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    write_json_atomic(out_dir / REPORT_JSON, report)
    write_bytes_atomic(out_dir / REPORT_MD, render_markdown(report).encode())


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    env, goal, check = report["environment"], report["goals"], report["onnx_check"]
    lines = [
        f"# Export report: {report['run_dir']}",
        "",
        f"CPU: {env['cpu']}, {env['threads']} thread(s); torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}, opset {env['opset']}. Test split: {report['test_images']} images "
        f"at {report['data']['image_size']} px; int8 calibrated on "
        f"{report['calibration_images']} training images"
        f"{' (7-bit weights: reduce_range)' if report['int8_reduce_range'] else ''}. "
        "Latency: median over the row's repeats, after warm-up.",
        "",
        "| model | runtime | file | MB | params | ms @1 | ms @32 | acc | auroc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lat = r.get("latency_ms") or {}
        name = r["model"] + (" (kept)" if r.get("chosen") else "")
        file = Path(r["file"]).name if r.get("file") else "(not kept)"
        lines.append(
            f"| {name} | {r['runtime']} | {file} | {r['file_mb']:.2f} | "
            f"{r['parameters'] / 1e6:.2f}M | {_fmt(lat.get('batch1'), 2)} | "
            f"{_fmt(lat.get('batch32'), 2)} | {_fmt(r['test']['acc'], 4)} | "
            f"{_fmt(r['test']['auroc'], 4)} |"
        )
    yes = {True: "met", False: "MISSED"}
    lines += [
        "",
        f"ONNX check: max |torch - onnxruntime| on the test logits = {check['max_abs_diff']:.2e} "
        f"(tolerance {check['atol']:.0e}): {'passed' if check['passed'] else 'FAILED'}.",
        "",
        f"Goals, int8 ({report['int8_format'].upper()}) vs fp32 student, both onnxruntime:",
        f"- size: {goal['size_ratio']:.2f}x smaller (goal >= {goal['size_ratio_goal']}x): "
        f"{yes[goal['size_met']]}",
        f"- speed: {goal['speedup']['batch1']:.2f}x at batch 1, "
        f"{goal['speedup']['batch32']:.2f}x at batch 32 (goal >= {goal['speedup_goal']}x): "
        f"{yes[goal['speed_met']]}",
        f"- accuracy: {goal['acc_drop_points']:.2f} points lost (negative: int8 scored "
        f"higher; goal <= {goal['acc_drop_goal_points']}): {yes[goal['acc_met']]}",
    ]
    packed = [r for r in report["rows"] if r["file"] and r["file"].endswith(MODEL_INT_FILE)]
    if packed:
        torch_row = next(r for r in report["rows"] if r["model"] == "student fp32")
        lines.append(
            f"- bit-packed {MODEL_INT_FILE}: {torch_row['file_mb'] / packed[0]['file_mb']:.2f}x "
            f"smaller than {MODEL_FILE} ({packed[0].get('note')})"
        )
    if report.get("quantization"):
        lines += [
            "",
            "Quantized distillation run: the fp32 student's weights already lie on the "
            f"quantization grid ({report['quantization']}).",
        ]
    if report.get("teacher_note"):
        lines += ["", report["teacher_note"]]
    return "\n".join(lines) + "\n"
