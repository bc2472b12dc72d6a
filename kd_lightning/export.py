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
the run's own data settings (.hydra/config.yaml of the run, or of the chain that
ran it, and summary.json's data entry), through kd_lightning.data.datamodule.XRayDataModule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402
from torch import nn  # noqa: E402

from kd_lightning.data.datamodule import XRayDataModule  # noqa: E402
from kd_lightning.models.backbones import build_resnet, count_parameters  # noqa: E402

PROG = "kd_lightning.export"
SUMMARY = "summary.json"
MODEL_FILE = "model.pt"
MODEL_INT_FILE = "model_int.pt"
INPUT, OUTPUT = "images", "logits"
OPSET = 17
BATCHES = (1, 32)
# The goals the int8 student is held to (issue 6): relative to the fp32 student.
GOAL_SIZE_RATIO = 3.5
GOAL_SPEEDUP = 1.5
GOAL_MAX_ACC_DROP_POINTS = 1.0


class ExportError(Exception):
    """A problem the user fixes (wrong directory, missing file): one line, exit code 2."""


# ---------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    net: nn.Module
    spec: dict[str, Any]
    file: Path
    source: str


def load_run_model(run_dir: Path) -> tuple[LoadedModel, dict[str, Any]]:
    """The run's student (model.pt, architecture from summary.json) and its summary."""
    if not run_dir.is_dir():
        raise ExportError(
            f"run directory {run_dir} does not exist; expected a finished kd_lightning run "
            f"(with {SUMMARY} and {MODEL_FILE})"
        )
    summary_path, model_path = run_dir / SUMMARY, run_dir / MODEL_FILE
    missing = [p.name for p in (summary_path, model_path) if not p.is_file()]
    if missing:
        raise ExportError(
            f"{run_dir} has no {' / '.join(missing)}; expected a finished kd_lightning run "
            f"directory holding {SUMMARY} and {MODEL_FILE} (the trained student)"
        )
    try:
        summary = json.loads(summary_path.read_text())
        spec = dict(summary["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(
            f"{summary_path} is not a kd_lightning summary ({type(err).__name__}: {err}); "
            "expected a JSON object with a 'model' entry"
        ) from err
    return _load_plain(model_path, spec, str(run_dir)), summary


def _build(spec: dict[str, Any]) -> nn.Module:
    keys = ("arch", "in_channels", "stem")
    try:
        return build_resnet(
            num_classes=int(spec.get("num_classes", 2)), **{k: spec[k] for k in keys if k in spec}
        )
    except (ValueError, TypeError) as err:
        raise ExportError(f"model entry {spec}: {err}") from err


def _load_plain(path: Path, spec: dict[str, Any], source: str) -> LoadedModel:
    net = _build(spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except Exception as err:
        raise ExportError(
            f"cannot load {path} into {spec.get('arch')} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); expected the plain state dict run.py saves"
        ) from err
    return LoadedModel(net.eval(), spec, path, source)


def load_teacher_model(source: str, base: Path) -> LoadedModel:
    """A teacher from its run directory / summary.json (model.pt) or a Lightning checkpoint."""
    path = Path(source).expanduser()
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path  # a relative path recorded when the student was trained elsewhere
    if path.is_file() and (path.name == SUMMARY or (path.parent / SUMMARY).is_file()):
        path = path.parent  # summary.json or model.pt of a run: the run directory
    if path.is_dir():
        summary_path, model_path = path / SUMMARY, path / MODEL_FILE
        if not summary_path.is_file() or not model_path.is_file():
            raise ExportError(
                f"teacher {path} has no {SUMMARY} / {MODEL_FILE}; expected a finished run "
                "directory or a .ckpt file"
            )
        spec = dict(json.loads(summary_path.read_text())["model"])
        return _load_plain(model_path, spec, str(path))
    if path.is_file() and path.suffix == ".ckpt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            spec = {**ckpt["hyper_parameters"]["model"]}
            spec["num_classes"] = int(ckpt["hyper_parameters"]["num_classes"])
            state = {
                k[len("model.") :]: v
                for k, v in ckpt["state_dict"].items()
                if k.startswith("model.")
            }
            net = _build(spec)
            net.load_state_dict(state, strict=True)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"cannot load teacher checkpoint {path} ({type(err).__name__}); expected a "
                "kd_lightning ClassifierModule/DistillModule .ckpt, or pass the run directory"
            ) from err
        return LoadedModel(net.eval(), spec, path, str(path))
    if path.is_file():
        raise ExportError(
            f"teacher {source} is a weights file without a summary.json beside it (no "
            "architecture); expected a run directory, summary.json or .ckpt (use --teacher)"
        )
    raise ExportError(
        f"teacher {source} does not exist; expected a run directory, summary.json or .ckpt"
    )


# ------------------------------------------------------------------------------------------- data
def _select(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # an interpolation that needs Hydra's runtime: treat as not given
        return None


def data_settings(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """XRayDataModule arguments of the run: summary.json's data entry (resolved at training time)
    first, the rest (normalization, CLAHE, split seed) from the saved Hydra config.

    A chain step's directory has no .hydra/ of its own: the chain's (one or two levels up) is
    used; a chain's step overrides rarely touch data, and path and image size come from the
    step's own summary.json anyway.
    """
    settings: dict[str, Any] = {
        "mean": 0.5,
        "std": 0.5,
        "clahe": False,
        "split_seed": 0,
        "val_fraction": 0.1,
        "cache_dir": None,
        "in_channels": int(summary.get("model", {}).get("in_channels", 1)),
    }
    sources = {"defaults": sorted(settings)}
    # The run's own, else its chain's: chain/<step> (one seed) or chain/seed<k>/<step>.
    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):
        config = folder / ".hydra" / "config.yaml"
        if not config.is_file():
            continue
        cfg = OmegaConf.load(config)
        found = {}
        for key in ("path", "image_size", "num_classes", *settings):
            value = _select(cfg, f"data.{key}")
            if value is not None:
                found[key] = value
        settings.update(found)
        sources = {str(config): sorted(found)}
        break
    data = summary.get("data") or {}
    for key in ("path", "image_size", "num_classes"):
        if key in data:
            settings[key] = data[key]
    for key in ("mean", "std", "in_channels", "clahe"):  # newer summaries may record these
        if key in data:
            settings[key] = data[key]
    if "path" not in settings or "image_size" not in settings:
        raise ExportError(
            f"{run_dir}: neither {SUMMARY}'s data entry nor .hydra/config.yaml names data.path "
            "and data.image_size; expected a run written by python -m kd_lightning"
        )
    settings.setdefault("num_classes", int(summary.get("model", {}).get("num_classes", 2)))
    settings["sources"] = sources
    return settings


@dataclass
class Images:
    test_x: np.ndarray
    test_y: np.ndarray
    calib_x: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)


def load_images(settings: dict[str, Any], calib_images: int, seed: int = 0) -> Images:
    """The whole test split and `calib_images` un-augmented training images, as float32 arrays."""
    path = Path(str(settings["path"])).expanduser()
    if not path.exists():
        raise ExportError(
            f"data.path={path} (from the run's settings) does not exist; expected the data the "
            "run was trained on (set KD_DATA_DIR or move the file back)"
        )
    dm = XRayDataModule(
        str(path),
        image_size=int(settings["image_size"]),
        num_classes=int(settings["num_classes"]),
        in_channels=int(settings["in_channels"]),
        batch_size=256,
        cache_dir=settings.get("cache_dir"),
        val_fraction=float(settings["val_fraction"]),
        split_seed=int(settings["split_seed"]),
        download=False,
        clahe=bool(settings["clahe"]),
        mean=float(settings["mean"]),
        std=float(settings["std"]),
    )
    dm.prepare_data()
    dm.setup("test")
    xs, ys = [], []
    for x, y in dm.test_dataloader():
        xs.append(x.numpy())
        ys.append(y.numpy())
    train = dm.datasets["train"]  # no train_transform passed: no augmentation
    rng = np.random.default_rng(seed)
    take = rng.choice(len(train), size=min(calib_images, len(train)), replace=False)
    calib = np.stack([train[int(i)][0].numpy() for i in np.sort(take)])
    return Images(np.concatenate(xs), np.concatenate(ys), calib.astype(np.float32), settings)


# ---------------------------------------------------------------------------------------- metrics
def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC with tied scores counted half (what torchmetrics' BinaryAUROC gives)."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    ranks = avg_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """acc (argmax) and auroc of the pneumonia score 1 - p(normal), as the training metrics."""
    probs = _softmax(logits)
    return {
        "acc": float((probs.argmax(axis=1) == labels).mean()),
        "auroc": binary_auroc(1.0 - probs[:, 0], labels != 0),
    }


# ------------------------------------------------------------------------------------- inference
def torch_logits(net: nn.Module, x: np.ndarray, batch: int = 128) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(net(torch.from_numpy(x[i : i + batch])).float().numpy())
    return np.concatenate(out)


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 128) -> np.ndarray:
    out = [session.run([OUTPUT], {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def _batch(x: np.ndarray, size: int) -> np.ndarray:
    # Real test images, repeated if the split is smaller than the batch.
    reps = -(-size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:size])


def latency_torch(net: nn.Module, x: np.ndarray, repeats: int) -> dict[str, float]:
    result = {}
    with torch.inference_mode():
        for size in BATCHES:
            inp = torch.from_numpy(_batch(x, size))
            result[f"batch{size}"] = median_ms(
                lambda inp=inp: net(inp), repeats, max(2, repeats // 5)
            )
    return result


def latency_ort(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> dict[str, float]:
    result = {}
    for size in BATCHES:
        feed = {INPUT: _batch(x, size)}
        result[f"batch{size}"] = median_ms(
            lambda feed=feed: session.run([OUTPUT], feed), repeats, max(2, repeats // 5)
        )
    return result


# -------------------------------------------------------------------------------------- exporting
def export_onnx(net: nn.Module, sample: np.ndarray, path: Path) -> None:
    """fp32 ONNX with a dynamic batch axis (legacy TorchScript exporter: the dynamo exporter needs
    onnxscript, which is not a dependency). Eval mode folds BatchNorm into the convolutions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.from_numpy(sample[:1]),),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))


class _CalibrationReader(CalibrationDataReader):
    """Feeds calibration images to onnxruntime's static quantizer in batches."""

    def __init__(self, x: np.ndarray, batch: int = 32) -> None:
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter([{INPUT: b} for b in self.batches])


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    try:
        return "vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def quantize_int8(
    fp32: Path, out: Path, calib: np.ndarray, fmt: str, reduce_range: bool = False
) -> None:
    """Static int8: per-channel symmetric int8 weights, uint8 activations, min-max calibration.

    `reduce_range` stores weights in 7 bits. Without VNNI, onnxruntime's x86 u8s8 kernels use
    VPMADDUBSW, whose int16 sums of pairs can saturate; onnxruntime's docs recommend
    reduce_range there. Measured here (AVX2 EPYC, 4-bit QD student): test accuracy 0.8638 with
    8-bit weights vs 0.8862 with 7-bit (fp32: 0.8862), same speed.
    """
    reader = _CalibrationReader(calib)
    with tempfile.TemporaryDirectory(prefix="kd_export_") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + graph optimization first, as onnxruntime recommends for quantization.
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(name: str, runtime: str, file: Path, params: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": name,
        "runtime": runtime,
        "file": str(file),
        "file_mb": _mb(file),
        "parameters": params,
        **extra,
    }


def _quantized_distill_row(
    run_dir: Path, student: LoadedModel, images: Images, params: int
) -> dict[str, Any] | None:
    path = run_dir / MODEL_INT_FILE
    if not path.is_file():
        return None
    from kd_lightning.distill.quant import unpack_quantized

    try:
        state = unpack_quantized(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise ExportError(f"cannot read {path} ({type(err).__name__}: {err})") from err
    net = _build(student.spec)
    net.load_state_dict(state, strict=True)
    net.eval()
    reference = student.net.state_dict()
    same = all(torch.equal(reference[k], v) for k, v in net.state_dict().items())
    logits = torch_logits(net, images.test_x)
    return _row(
        "student bit-packed (model_int.pt)",
        "torch (codes dequantized to fp32 at load)",
        path,
        params,
        latency_ms=None,
        test=classification_metrics(logits, images.test_y),
        note="same weights as model.pt" if same else "differs from model.pt",
    )


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
    teacher_source = teacher or summary.get("teacher")
    teacher_model = None
    teacher_note = None
    if teacher_source:
        try:
            teacher_model = load_teacher_model(str(teacher_source), run_dir)
        except ExportError as err:
            if teacher:  # asked for on the command line: an error
                raise
            teacher_note = f"teacher from {SUMMARY} skipped: {err}"
            print(f"[{PROG}] {teacher_note}", file=sys.stderr)

    settings = data_settings(run_dir, summary)
    images = load_images(settings, calib_images)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    params = count_parameters(student.net)

    # fp32 ONNX, verified on every real test image.
    fp32_path = out_dir / "student.onnx"
    export_onnx(student.net, images.test_x, fp32_path)
    fp32_session = ort_session(fp32_path, threads)
    torch_out = torch_logits(student.net, images.test_x)
    onnx_out = ort_logits(fp32_session, images.test_x)
    max_diff = float(np.abs(torch_out - onnx_out).max())

    rows: list[dict[str, Any]] = []
    if teacher_model is not None:
        t_params = count_parameters(teacher_model.net)
        # A large teacher at batch 32 takes seconds per run: fewer repeats, recorded in the row.
        t_repeats = max(3, repeats // 5)
        rows.append(
            _row(
                "teacher fp32",
                "torch",
                teacher_model.file,
                t_params,
                arch=teacher_model.spec.get("arch"),
                repeats=t_repeats,
                latency_ms=latency_torch(teacher_model.net, images.test_x, t_repeats),
                test=classification_metrics(
                    torch_logits(teacher_model.net, images.test_x), images.test_y
                ),
            )
        )
    common = {"arch": student.spec.get("arch"), "repeats": repeats}
    rows.append(
        _row(
            "student fp32",
            "torch",
            student.file,
            params,
            **common,
            latency_ms=latency_torch(student.net, images.test_x, repeats),
            test=classification_metrics(torch_out, images.test_y),
        )
    )
    fp32_row = _row(
        "student fp32",
        "onnxruntime",
        fp32_path,
        params,
        **common,
        latency_ms=latency_ort(fp32_session, images.test_x, repeats),
        test=classification_metrics(onnx_out, images.test_y),
    )
    rows.append(fp32_row)

    # int8 candidates; the faster (geometric mean over batch sizes) becomes student_int8.onnx.
    formats = ["qdq", "qoperator"] if fmt == "auto" else [fmt]
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    candidates = []
    for name in formats:
        path = out_dir / f"student_int8_{name}.onnx"
        quantize_int8(fp32_path, path, images.calib_x, name, reduce_range)
        session = ort_session(path, threads)
        latency = latency_ort(session, images.test_x, repeats)
        candidates.append(
            _row(
                f"student int8 ({name.upper()})",
                "onnxruntime",
                path,
                params,
                **common,
                format=name,
                latency_ms=latency,
                test=classification_metrics(ort_logits(session, images.test_x), images.test_y),
            )
        )
    best = min(candidates, key=lambda r: float(np.prod(list(r["latency_ms"].values()))))
    int8_path = out_dir / "student_int8.onnx"
    shutil.move(best["file"], int8_path)
    best["file"] = str(int8_path)
    for row in candidates:
        if row is not best:
            Path(row["file"]).unlink(missing_ok=True)
            row["file"] = None  # measured, not kept
        row["chosen"] = row is best
    rows.extend(candidates)

    packed_row = _quantized_distill_row(run_dir, student, images, params)
    if packed_row is not None:
        rows.append(packed_row)

    goals = _goals(fp32_row, best)
    report = {
        "run_dir": str(run_dir),
        "out_dir": str(out_dir.resolve()),
        "method": summary.get("method"),
        "quantization": summary.get("quantization"),
        "teacher": str(teacher_model.source) if teacher_model is not None else None,
        "teacher_note": teacher_note,
        "data": {k: v for k, v in settings.items()},
        "test_images": int(len(images.test_y)),
        "calibration_images": int(len(images.calib_x)),
        "onnx_check": {"max_abs_diff": max_diff, "atol": atol, "passed": max_diff < atol},
        "int8_format": best["format"],
        "int8_reduce_range": reduce_range,
        "environment": {
            "cpu": _cpu_name(),
            "threads": threads,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
        },
        "rows": rows,
        "goals": goals,
    }
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "export_report.md").write_text(render_markdown(report))
    return report


def _goals(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
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


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    env, goals, check = report["environment"], report["goals"], report["onnx_check"]
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
        f"- size: {goals['size_ratio']:.2f}x smaller (goal >= {goals['size_ratio_goal']}x): "
        f"{yes[goals['size_met']]}",
        f"- speed: {goals['speedup']['batch1']:.2f}x at batch 1, "
        f"{goals['speedup']['batch32']:.2f}x at batch 32 (goal >= {goals['speedup_goal']}x): "
        f"{yes[goals['speed_met']]}",
        f"- accuracy: {goals['acc_drop_points']:.2f} points lost (negative: int8 scored "
        f"higher; goal <= {goals['acc_drop_goal_points']}): {yes[goals['acc_met']]}",
    ]
    packed = [r for r in report["rows"] if r["file"] and r["file"].endswith(MODEL_INT_FILE)]
    if packed:
        torch_row = next(r for r in report["rows"] if r["model"] == "student fp32")
        lines.append(
            f"- bit-packed model_int.pt: {torch_row['file_mb'] / packed[0]['file_mb']:.2f}x "
            f"smaller than model.pt ({packed[0].get('note')})"
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


# -------------------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="finished run: summary.json + model.pt")
    parser.add_argument(
        "--teacher",
        help="teacher run dir / summary.json / .ckpt (default: "
        "the teacher recorded in summary.json, if any)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
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
    out = args.out if args.out is not None else args.run_dir / "export"
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


if __name__ == "__main__":
    sys.exit(main())
