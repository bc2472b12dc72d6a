"""Find and load a trained teacher: a run directory, its summary.json, a Lightning checkpoint, or a
plain weights file. The checkpoint's own hyperparameters say which architecture it holds."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.artifacts import best_checkpoint
from kd_lightning.models.backbones import load_weights
from kd_lightning.models.networks import build_model


def resolve_teacher_checkpoint(source: str | Path) -> Path:
    """Turn a run directory or summary.json into the best checkpoint it names."""
    path = Path(source)
    if path.is_dir():
        path = path / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher run directory {path.parent} has no summary.json (unfinished run?); "
                "expected a finished run, a .ckpt or a weights file"
            )
    if not path.exists():
        raise FileNotFoundError(f"teacher {path} does not exist; expected a run dir, .ckpt or .pt")
    if path.name.endswith(".json"):
        summary_file = path
        try:
            named = best_checkpoint(json.loads(path.read_text()), summary_file)
        except (json.JSONDecodeError, AttributeError):
            named = None
        if named is None:
            raise ValueError(f"{path} is not a kd_lightning summary (no best_checkpoint)")
        path = named
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher checkpoint {path} named in {summary_file} is missing; restore it, or "
                f"retrain the teacher (move {summary_file.parent} away and rerun its command)"
            )
    return path


def load_teacher(
    source: str | Path,
    num_classes: int,
    expected_model: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the teacher network and load its weights; refuse a wrong architecture or class count.

    `expected_model` (arch, in_channels, stem, ...) is required for plain weights files, which carry
    no architecture, and is checked against a checkpoint's own when both are given.
    """
    path = resolve_teacher_checkpoint(source)
    if path.suffix != ".ckpt":
        if not expected_model:
            raise ValueError(
                f"teacher weights file {path} carries no architecture; set module.teacher_model"
            )
        spec = dict(expected_model)
        model = build_model(spec, num_classes, untrained=True)
        load_weights(model, path)
        return model, spec
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        hparams = checkpoint["hyper_parameters"]
        spec = dict(hparams["model"])
        ckpt_classes = int(hparams["num_classes"])
        state = checkpoint["state_dict"]
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"cannot read teacher checkpoint {path}: {type(err).__name__}: {reason}; expected a "
            "Lightning checkpoint of a finished kd_lightning run (a truncated or partial copy? "
            "copy it again, or retrain the teacher)"
        ) from err
    if ckpt_classes != num_classes:
        raise ValueError(
            f"teacher {path} predicts {ckpt_classes} classes; "
            f"expected {num_classes} (data.num_classes)"
        )
    if expected_model:
        for key in ("arch", "in_channels", "stem"):
            if key in expected_model and expected_model[key] != spec.get(key):
                raise ValueError(
                    f"teacher {path} has {key}={spec.get(key)!r}; expected {expected_model[key]!r}"
                )
    model = build_model(spec, num_classes, untrained=True)
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model, spec
