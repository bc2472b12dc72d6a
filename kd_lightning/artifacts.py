"""Every file a run or a study leaves behind: names, paths, atomic writing, and reading with
one-line errors. Torch-free, so the report and the statistics run on copies without torch.

A stage run directory holds:

    summary.json            test metrics, statistics, best checkpoint, model facts
    run_config.yaml         the run's composed config, resolved (also for chain steps)
    model.pt                the deployable network's weights (state dict)
    model_int.pt            bit-packed integer weights (quantized distillation only)
    checkpoints/            best-*.ckpt and last.ckpt (Lightning)
    predictions/val.csv     per-image predictions of the best checkpoint on validation
    predictions/test.csv    ... and on test
    epoch_test.json         test AUROC / ACC after every epoch (+callbacks=epoch_test; convergence
                            only, never used to pick a checkpoint)
    export/                 ONNX files and the export report (python -m kd_lightning.export)

A study (chain) directory holds chain.json, one directory per step, and the report's files.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "run_config.yaml"
CHAIN_FILE = "chain.json"
MODEL_FILE = "model.pt"
MODEL_INT_FILE = "model_int.pt"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PREDICTIONS_DIR = "predictions"
PREDICTION_SPLITS = ("val", "test")
EXPORT_DIR = "export"
EPOCH_TEST_FILE = "epoch_test.json"

# Method labels (summary.json's `method`): the report groups runs by them, puts the paper's in
# its table order first (PAPER_METHODS) and pairs every student method with BASE_METHOD. A chain
# step's method must be one of METHODS or the step's own name
# (kd_lightning.chain_plan.check_method).
BASE_METHOD = "base"
PAPER_METHODS = (
    BASE_METHOD,
    "nst_linear",
    "nst_poly",
    "nst_gaussian",
    "kd",
    "nst_poly_kd",
    "nst_poly_ta",
)
METHODS = (
    "supervised",  # a teacher trained on labels alone
    *PAPER_METHODS,
    "nst_poly_ta101",  # NST-poly through one TA of the given depth (ta_size)
    "nst_poly_ta50",
    "nst_poly_ta34",
    "nst_poly_kd_ta",  # NST-poly + KD through a TA (deploy_cpu's cross-family chain)
    "fitnets",
    "at",
    "dkd",
    "rkd",
    "crd",
    "quantized_distill",
)


class ArtifactError(ValueError):
    """A run file that is missing or unreadable; the message is one line naming the file."""


class DiskFullError(OSError):
    """A write failed for lack of space (ENOSPC, EDQUOT); one line naming the file. The file's
    earlier version, if any, is intact (atomic writes), so rerunning after freeing space resumes."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# ----------------------------------------------------------------------------------------------
# Writing


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a
    part: a temporary file in the same directory (same filesystem), fsync, then rename. A failed
    write (full disk) removes the temporary file and leaves any earlier `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            raise disk_full(path, err) from err
        raise


def disk_full(path: Path, err: OSError) -> DiskFullError:
    kept = "its earlier version is intact" if Path(path).exists() else "nothing was half-written"
    return DiskFullError(
        err.errno,
        f"cannot write {path}: {err.strerror or os.strerror(err.errno)} ({kept}); "
        "free some space and rerun the same command: it resumes from the last checkpoint",
    )


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path, expected: str) -> Any:
    """Parsed JSON of `path`; an unreadable file is an ArtifactError saying what was expected."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ArtifactError(f"{path} does not exist; expected {expected}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); expected {expected}") from err


def summary_path(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's summary.json, or None when the run has not finished (no file)."""
    path = summary_path(run_dir)
    if not path.is_file():
        return None
    summary = read_json(path, "a summary.json written by kd_lightning.run; move it away to rerun")
    if not isinstance(summary, dict):
        raise ArtifactError(f"{path} holds a {type(summary).__name__}; expected a JSON object")
    return summary


def best_checkpoint(summary: dict[str, Any], summary_file: Path) -> Path | None:
    """The best checkpoint a summary names. summary.json records it as an absolute path; when
    that path is gone but the run directory holds a file of that name in checkpoints/, the run
    directory was moved (a study copied elsewhere) and that file is the one. None when the
    summary names none; a missing path is returned as recorded, for the caller's error."""
    recorded = summary.get("best_checkpoint")
    if not recorded:
        return None
    path = Path(recorded)
    moved = Path(summary_file).parent / CHECKPOINT_DIR / path.name
    return moved if not path.is_file() and moved.is_file() else path


# ----------------------------------------------------------------------------------------------
# Per-image predictions


@dataclass(frozen=True)
class Predictions:
    """One split's predictions: `index` (N,) the image's row in its source split, `label` (N,),
    `logits` (N, K) and `probs` (N, K) = softmax(logits), `files` (N names) for folder data."""

    index: np.ndarray
    label: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    files: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def positive_score(self) -> np.ndarray:
        """Pneumonia score 1 - p(normal): class 0 is normal in the 2- and the 3-class task."""
        return 1.0 - self.probs[:, 0]


def predictions_path(run_dir: Path, split: str) -> Path:
    if split not in PREDICTION_SPLITS:
        raise ValueError(f"split={split!r}: expected one of {PREDICTION_SPLITS}")
    return Path(run_dir) / PREDICTIONS_DIR / f"{split}.csv"


def has_predictions(run_dir: Path) -> bool:
    return all(predictions_path(run_dir, s).is_file() for s in PREDICTION_SPLITS)


def predictions_csv(
    index: Sequence[int],
    label: Sequence[int],
    logits: np.ndarray,
    files: Sequence[str] | None = None,
) -> bytes:
    """CSV bytes: index, label[, file], logit_k..., prob_k... Numbers are written as Python's
    shortest exact repr, so statistics recomputed from the file equal the run's bit for bit."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) != len(label) or len(index) != len(label):
        raise ValueError(
            f"predictions: logits {logits.shape}, {len(label)} labels, {len(index)} indices; "
            "expected (N, K) logits and N labels and indices"
        )
    probs = _softmax(logits)
    k = logits.shape[1]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["index", "label", *(["file"] if files is not None else [])]
        + [f"logit_{c}" for c in range(k)]
        + [f"prob_{c}" for c in range(k)]
    )
    for row in range(len(label)):
        writer.writerow(
            [int(index[row]), int(label[row]), *([files[row]] if files is not None else [])]
            + [repr(float(v)) for v in logits[row]]
            + [repr(float(v)) for v in probs[row]]
        )
    return buffer.getvalue().encode()


def write_predictions(
    run_dir: Path,
    split: str,
    index: Sequence[int],
    label: Sequence[int],
    logits: np.ndarray,
    files: Sequence[str] | None = None,
) -> Path:
    path = predictions_path(run_dir, split)
    write_bytes_atomic(path, predictions_csv(index, label, logits, files))
    return path


def read_predictions(run_dir: Path, split: str) -> Predictions:
    """`predictions/<split>.csv` of a run; a missing or malformed file is one ArtifactError."""
    path = predictions_path(run_dir, split)
    expected = "a predictions CSV written by kd_lightning.run (index, label, logit_k, prob_k)"
    if not path.is_file():
        raise ArtifactError(
            f"{path} does not exist; expected {expected} (rerun the run's command to write it)"
        )
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError("no rows")
        columns = list(rows[0])
        k = sum(c.startswith("logit_") for c in columns)
        if k < 2 or any(f"prob_{c}" not in columns for c in range(k)):
            raise ValueError(f"columns {columns}")
        index = np.array([int(r["index"]) for r in rows], dtype=np.int64)
        label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        logits = np.array([[float(r[f"logit_{c}"]) for c in range(k)] for r in rows])
        probs = np.array([[float(r[f"prob_{c}"]) for c in range(k)] for r in rows])
        files = tuple(r["file"] for r in rows) if "file" in columns else None
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path} is malformed ({err}); expected {expected}") from err
    if not np.isfinite(logits).all() or label.min() < 0 or label.max() >= k:
        raise ArtifactError(
            f"{path} has non-finite logits or labels outside 0..{k - 1}; expected {expected}"
        )
    return Predictions(index=index, label=label, logits=logits, probs=probs, files=files)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
