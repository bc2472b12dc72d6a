"""run_export: load, export to ONNX and check, quantize to int8, measure every model, report."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_lightning.artifacts import MODEL_INT_FILE, SUMMARY_FILE
from kd_lightning.export.data import Images, load_images, run_data_source
from kd_lightning.export.errors import PROG, ExportError
from kd_lightning.export.int8 import FORMATS, cpu_has_vnni, quantize_int8
from kd_lightning.export.loading import LoadedModel, load_run_model, load_teacher_model
from kd_lightning.export.metrics import classification_metrics, latency_ort, latency_torch
from kd_lightning.export.onnx import check_onnx, export_onnx, ort_logits, ort_session, torch_logits
from kd_lightning.export.report import environment, goals, row, write_report
from kd_lightning.models.backbones import count_parameters
from kd_lightning.models.loading import build_from_spec

FP32_FILE = "student.onnx"
INT8_FILE = "student_int8.onnx"


@dataclass
class Bench:
    """What every measurement shares: the images, the output folder, threads and repeats."""

    images: Images
    out_dir: Path
    threads: int
    repeats: int

    def test(self, logits: np.ndarray) -> dict[str, float]:
        return classification_metrics(logits, self.images.test_y)


def run_export(
    run_dir: Path,
    out_dir: Path,
    teacher: str | None = None,
    repeats: int = 30,
    threads: int = 1,
    calib_images: int = 256,
    fmt: str = "auto",
    atol: float = 1e-3,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Export, verify, quantize, measure; write the report files; return the report dict."""
    run_dir = run_dir.resolve()
    student, summary = load_run_model(run_dir)
    num_classes = int(student.spec.get("num_classes", 2))
    teacher_model, teacher_note = _teacher(teacher, summary.get("teacher"), run_dir, num_classes)
    images = load_images(run_data_source(run_dir, summary), calib_images)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    bench = Bench(images, out_dir, threads, repeats)
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()

    rows = [teacher_row(bench, teacher_model)] if teacher_model is not None else []
    fp32_rows, onnx_check = student_fp32_rows(bench, student, atol)
    rows += fp32_rows
    candidates = int8_rows(bench, student, list(FORMATS) if fmt == "auto" else [fmt], reduce_range)
    rows += candidates
    best = next(r for r in candidates if r["chosen"])
    packed_row = quantized_distill_row(bench, run_dir, student)
    if packed_row is not None:
        rows.append(packed_row)

    report = {
        "run_dir": str(run_dir),
        "out_dir": str(out_dir.resolve()),
        "method": summary.get("method"),
        "quantization": summary.get("quantization"),
        "teacher": str(teacher_model.source) if teacher_model is not None else None,
        "teacher_note": teacher_note,
        "data": dict(images.settings),
        "test_images": int(len(images.test_y)),
        "calibration_images": int(len(images.calib_x)),
        "onnx_check": onnx_check,
        "int8_format": best["format"],
        "int8_reduce_range": reduce_range,
        "environment": environment(threads),
        "rows": rows,
        "goals": goals(fp32_rows[-1], best),
    }
    write_report(report, out_dir)
    return report


def _teacher(
    asked: str | None, recorded: str | None, run_dir: Path, num_classes: int
) -> tuple[LoadedModel | None, str | None]:
    """(teacher, note): --teacher must load; summary.json's teacher is skipped with a note."""
    source = asked or recorded
    if not source:
        return None, None
    try:
        return load_teacher_model(str(source), run_dir, num_classes), None
    except ExportError as err:
        if asked:  # asked for on the command line: an error
            raise
        note = f"teacher from {SUMMARY_FILE} skipped: {err}"
        print(f"[{PROG}] {note}", file=sys.stderr)
        return None, note


def teacher_row(bench: Bench, teacher: LoadedModel) -> dict[str, Any]:
    # A large teacher at batch 32 takes seconds per run: fewer repeats, recorded in the row.
    repeats = max(3, bench.repeats // 5)
    x = bench.images.test_x
    return row(
        "teacher fp32",
        "torch",
        teacher.file,
        count_parameters(teacher.net),
        arch=teacher.spec.get("arch"),
        repeats=repeats,
        latency_ms=latency_torch(teacher.net, x, repeats),
        test=bench.test(torch_logits(teacher.net, x)),
    )


def _common(bench: Bench, student: LoadedModel) -> dict[str, Any]:
    return {"arch": student.spec.get("arch"), "repeats": bench.repeats}


def student_fp32_rows(
    bench: Bench, student: LoadedModel, atol: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The student in torch and as fp32 ONNX (last row), checked on every real test image."""
    x, params = bench.images.test_x, count_parameters(student.net)
    path = bench.out_dir / FP32_FILE
    export_onnx(student.net, x, path)
    session = ort_session(path, bench.threads)
    torch_out, onnx_out = torch_logits(student.net, x), ort_logits(session, x)
    common = _common(bench, student)
    rows = [
        row(
            "student fp32",
            "torch",
            student.file,
            params,
            **common,
            latency_ms=latency_torch(student.net, x, bench.repeats),
            test=bench.test(torch_out),
        ),
        row(
            "student fp32",
            "onnxruntime",
            path,
            params,
            **common,
            latency_ms=latency_ort(session, x, bench.repeats),
            test=bench.test(onnx_out),
        ),
    ]
    return rows, check_onnx(torch_out, onnx_out, atol)


def int8_rows(
    bench: Bench, student: LoadedModel, formats: list[str], reduce_range: bool
) -> list[dict[str, Any]]:
    """One row per int8 form; the faster (geometric mean over batch sizes) is kept as
    student_int8.onnx (`chosen`), the others are measured and deleted."""
    x, params = bench.images.test_x, count_parameters(student.net)
    candidates = []
    for name in formats:
        path = bench.out_dir / f"student_int8_{name}.onnx"
        quantize_int8(bench.out_dir / FP32_FILE, path, bench.images.calib_x, name, reduce_range)
        session = ort_session(path, bench.threads)
        candidates.append(
            row(
                f"student int8 ({name.upper()})",
                "onnxruntime",
                path,
                params,
                **_common(bench, student),
                format=name,
                latency_ms=latency_ort(session, x, bench.repeats),
                test=bench.test(ort_logits(session, x)),
            )
        )
    best = min(candidates, key=lambda r: float(np.prod(list(r["latency_ms"].values()))))
    kept = bench.out_dir / INT8_FILE
    shutil.move(best["file"], kept)
    best["file"] = str(kept)
    for candidate in candidates:
        if candidate is not best:
            Path(candidate["file"]).unlink(missing_ok=True)
            candidate["file"] = None  # measured, not kept
        candidate["chosen"] = candidate is best
    return candidates


def quantized_distill_row(
    bench: Bench, run_dir: Path, student: LoadedModel
) -> dict[str, Any] | None:
    """A quantized-distillation run's bit-packed model_int.pt, dequantized into the network."""
    path = run_dir / MODEL_INT_FILE
    if not path.is_file():
        return None
    from kd_lightning.distill.quant_pack import unpack_quantized

    try:
        state = unpack_quantized(torch.load(path, map_location="cpu", weights_only=True))
        net = build_from_spec(student.spec)
        net.load_state_dict(state, strict=True)
    except Exception as err:
        raise ExportError(f"cannot read {path} ({type(err).__name__}: {err})") from err
    net.eval()
    reference = student.net.state_dict()
    same = all(torch.equal(reference[k], v) for k, v in net.state_dict().items())
    return row(
        f"student bit-packed ({MODEL_INT_FILE})",
        "torch (codes dequantized to fp32 at load)",
        path,
        count_parameters(student.net),
        latency_ms=None,
        test=bench.test(torch_logits(net, bench.images.test_x)),
        note=f"same weights as {student.file.name}"
        if same
        else f"differs from {student.file.name}",
    )
