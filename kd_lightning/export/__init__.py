"""ONNX and int8 export of a trained student, with an honest size / latency / accuracy report.

    python -m kd_lightning.export RUN_DIR [--teacher TEACHER_RUN_DIR] [--out DIR] [--repeats N]

RUN_DIR is a finished run (summary.json + model.pt). Written to --out (default RUN_DIR/export):

- `student.onnx`: the student in fp32, checked with onnxruntime against PyTorch on the run's real
  test images (max abs difference of the logits must stay below --atol);
- `student_int8.onnx`: onnxruntime static quantization (per-channel int8 weights, uint8
  activations, calibrated on real training images); with --format auto both the QDQ and the
  QOperator form are built and the faster one on this CPU is kept;
- `export_report.json` / `export_report.md`: file size, parameters, median CPU latency at batch 1
  and 32 (onnxruntime and torch, fixed thread count) and test accuracy / AUROC of the teacher
  (from --teacher or summary.json's teacher), the fp32 student, the int8 student and, for a
  quantized-distillation run, its bit-packed `model_int.pt`; plus whether the int8 goals
  (>= 3.5x smaller, >= 1.5x faster, <= 1 point of accuracy lost) were met.

Metrics use the whole test split (a run's eval_subset is ignored), so they can differ from the
run's summary.json when it was tested on a subset or with limit_test_batches. Images come from
the DataModule the run was built with: the `data` section of its run_config.yaml (older runs:
.hydra/config.yaml of the run or of its chain, and summary.json's data entry).

The package, one concern a file: loading (student and teacher, through
kd_lightning.models.loading), data (the run's DataModule), onnx (export, check, sessions), int8
(onnxruntime static quantization), metrics (accuracy / AUROC from kd_lightning.report.statistics,
latency), report (rows, goals, JSON / markdown), pipeline (run_export), cli (the entry point).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from kd_lightning.export.cli import main, parse_args  # noqa: E402
from kd_lightning.export.data import Images, data_settings, load_images  # noqa: E402
from kd_lightning.export.errors import PROG, ExportError  # noqa: E402
from kd_lightning.export.loading import (  # noqa: E402
    LoadedModel,
    load_run_model,
    load_teacher_model,
)
from kd_lightning.export.metrics import classification_metrics  # noqa: E402
from kd_lightning.export.pipeline import run_export  # noqa: E402
from kd_lightning.export.report import render_markdown  # noqa: E402

__all__ = [
    "PROG",
    "ExportError",
    "Images",
    "LoadedModel",
    "classification_metrics",
    "data_settings",
    "load_images",
    "load_run_model",
    "load_teacher_model",
    "main",
    "parse_args",
    "render_markdown",
    "run_export",
]
