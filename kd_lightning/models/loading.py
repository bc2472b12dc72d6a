"""A finished run's network: the architecture from its summary.json, the weights from model.pt
(the best checkpoint's network, as a plain state dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.artifacts import MODEL_FILE, ArtifactError, read_summary, summary_path
from kd_lightning.models.networks import build_model


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """An untrained network of a summary's `model` entry (no pretrained download)."""
    try:
        return build_model(spec, untrained=True)
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"model entry {spec}: {err}") from err


def load_run_network(
    run_dir: Path, summary: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode, its summary) of a finished run directory."""
    run_dir = Path(run_dir)
    summary = summary if summary is not None else read_summary(run_dir)
    model_path = run_dir / MODEL_FILE
    if summary is None or not model_path.is_file():
        missing = [p.name for p in (summary_path(run_dir), model_path) if not p.is_file()]
        raise ArtifactError(
            f"{run_dir} has no {' / '.join(missing)}; expected a finished kd_lightning run "
            f"directory holding summary.json and {MODEL_FILE} (the trained network)"
        )
    spec = summary.get("model")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ArtifactError(
            f"{summary_path(run_dir)} has no model entry with an arch; expected a kd_lightning "
            "stage summary"
        )
    net = build_from_spec(spec)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(
            f"cannot load {model_path} into {spec.get('arch')} ({type(err).__name__}: {first}); "
            "expected the plain state dict kd_lightning.run saves"
        ) from err
    return net.eval(), summary
