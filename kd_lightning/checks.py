"""Checks of a stage config before anything is trained or written: numbers in range, the
trainer, the teacher's data, the statistics settings, readable checkpoints. Each failure is a
ValueError with one line naming the key or file and what was expected."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import (
    SUMMARY_FILE,
    ArtifactError,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def check_checkpoint_file(path: Path, what: str, way_on: str) -> None:
    """Refuse a checkpoint torch cannot read (truncated copy, disk error) with one line naming
    the file and the way on, instead of a pickle traceback from deep inside Lightning."""
    try:
        checkpoint = _peek_checkpoint(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError("no state_dict in it")
    except FileNotFoundError:
        raise ArtifactError(f"{what} {path} does not exist; {way_on}") from None
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ArtifactError(
            f"{what} {path} is unreadable ({type(err).__name__}: {reason}); {way_on}"
        ) from err


def _peek_checkpoint(path: Path) -> Any:
    """torch.load memory-mapped (cheap: tensors are not read); a file that is not a zip archive
    cannot be mapped, and the plain load then gives the real reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=False)


# Loss-config numbers checked before anything is built: key -> (lowest, lowest allowed?).
# Weights may be 0 (a term off); temperatures, learning rates and bandwidths must be > 0.
_AT_LEAST_ZERO = ("weight", "alpha", "beta", "c", "momentum", "weight_decay", "gamma")
_ABOVE_ZERO = ("temperature", "lr", "points_lr", "sigma2", "p", "eps")
_NOT_LOSS_KEYS = ("model", "teacher_model", "optimizer", "scheduler")  # checked elsewhere


def check_numbers(cfg: DictConfig) -> None:
    """Every weight, temperature, kernel parameter and learning rate in `module` and
    `optimizer`: finite and in range, else one line naming the key, e.g.
    `module.feature_pairs.0.weight=-5.0: expected a finite number >= 0`."""

    def rule(key: str) -> str | None:
        if key in _ABOVE_ZERO:
            return "> 0"
        if key in _AT_LEAST_ZERO or key.endswith("_weight"):
            return ">= 0"
        if key == "degree":
            return "int >= 1"
        return None

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if where == "module" and key in _NOT_LOSS_KEYS:
                    continue
                name = f"{where}.{key}"
                kind = rule(str(key))
                if kind is not None and (isinstance(value, (int, float)) or value is None):
                    check_number(name, value, kind)
                else:
                    walk(value, name)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{where}.{index}")

    for section in ("module", "optimizer"):
        if cfg.get(section) is not None:
            walk(OmegaConf.to_container(cfg[section], resolve=True), section)


def check_number(name: str, value: Any, kind: str) -> None:
    if value is None and name.rsplit(".", 1)[-1] in ("sigma2", "points_lr"):
        return  # null: the data-driven bandwidth / the optimizer's lr
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int >= 1":
        if not (number and float(value).is_integer() and value >= 1):
            raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        return
    ok = number and math.isfinite(value) and (value > 0 if kind == "> 0" else value >= 0)
    if not ok:
        raise ValueError(f"{name}={value!r}: expected a finite number {kind}")


def check_teacher_data(cfg: DictConfig) -> None:
    """A teacher trained on other data (class count, input channels, image size) is refused
    before training: from its summary.json when the teacher is a run directory or summary,
    from the checkpoint's saved hyperparameters when it is a .ckpt."""
    module = cfg.get("module") or {}
    source = module.get("teacher") if "teacher" in module else None
    if source is None or OmegaConf.is_missing(module, "teacher"):
        return
    path = Path(str(source))
    summary_file = path / SUMMARY_FILE if path.is_dir() else path
    facts: dict[str, Any] = {}
    if summary_file.name.endswith(".json") and summary_file.is_file():
        from kd_lightning.artifacts import best_checkpoint, read_json

        summary = read_json(summary_file, "a summary.json written by kd_lightning.run")
        data = summary.get("data") or {} if isinstance(summary, dict) else {}
        facts = {k: data.get(k) for k in ("num_classes", "in_channels", "image_size")}
        origin = f"teacher {summary_file}"
        best = best_checkpoint(summary, summary_file) if isinstance(summary, dict) else None
        if best and not best.is_file():
            raise ArtifactError(
                f"teacher checkpoint {best} named in {summary_file} is missing; restore it, "
                f"or retrain the teacher (move {summary_file.parent} away and rerun its command)"
            )
        if best:
            check_checkpoint_file(
                best,
                "teacher checkpoint",
                f"named in {summary_file}; restore the file or retrain the teacher "
                f"(move {summary_file.parent} away and rerun its command)",
            )
    elif path.suffix == ".ckpt" and path.is_file():
        try:
            ckpt = _peek_checkpoint(path)
            data = ckpt.get("datamodule_hyper_parameters") or {}
        except Exception:
            return  # unreadable: load_teacher says so, naming the file
        model = (ckpt.get("hyper_parameters") or {}).get("model") or {}
        facts = {
            "num_classes": data.get("num_classes"),
            "in_channels": model.get("in_channels", data.get("in_channels")),
            "image_size": data.get("image_size"),
        }
        origin = f"teacher {path}"
    for key, theirs in facts.items():
        ours = cfg.data.get(key)
        if theirs is not None and ours is not None and int(theirs) != int(ours):
            raise ValueError(
                f"{origin} was trained with data.{key}={theirs}; this run has data.{key}={ours}; "
                f"expected a teacher trained on the same data (same data.{key})"
            )


def check_trainer_config(trainer_cfg: DictConfig) -> None:
    """Refuse Trainer options this Lightning does not know, and hardware this machine lacks."""
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(trainer_cfg) - valid - {"_target_"})
    if unknown:
        raise ValueError(
            f"unknown trainer option(s) {unknown}; "
            f"valid Lightning Trainer arguments: {sorted(valid)}"
        )
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    precision = str(trainer_cfg.get("precision", "32-true"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; "
            "use trainer=cpu (or trainer.accelerator=cpu)"
        )
    if precision.startswith("16") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.precision={precision} needs a CUDA GPU; on CPU use bf16-mixed or 32-true"
        )


def check_evaluation_config(evaluation: DictConfig | None) -> None:
    """The per-run statistics' settings, refused before training when out of range."""
    evaluation = evaluation or {}
    target = evaluation.get("target_sensitivity", 0.95)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(
            f"evaluation.target_sensitivity={target!r}: expected a number in (0, 1], e.g. 0.95"
        )
    for key, minimum in (("bootstrap_resamples", 200), ("calibration_bins", 2)):
        value = evaluation.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"evaluation.{key}={value!r}: expected an integer >= {minimum}")
