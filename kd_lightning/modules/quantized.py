"""Quantized distillation (Polino, Pascanu & Alistarh, ICLR 2018): the student's forward uses
quantized weights under the distillation loss, the optimizer updates full-precision weights (STE).

DistillModule already composes the loss (CE, NST pairs, KD); this module only attaches Polino
quantizers (kd_lightning.distill.quant) to the student at construction, gives the learnable points
of differentiable quantization their own parameter group, and changes what a finished run stores:
`model.pt` holds the plain quantized weights (loads into a plain ResNet, strict) and
`model_int.pt` the same weights as bit-packed integer codes, which is truly smaller on disk.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.artifacts import MODEL_INT_FILE, write_bytes_atomic
from kd_lightning.distill.quant import attach_quantizers, detach_quantizers, quantized_parameters
from kd_lightning.distill.quant_pack import pack_quantized, packed_nbytes
from kd_lightning.models.networks import build_model
from kd_lightning.modules.distill import DistillModule

__all__ = ["MODEL_INT_FILE", "QUANT_DEFAULTS", "QuantizedDistillModule", "quantization_settings"]

# Settings accepted in `quantization` and their defaults (Polino et al.: 4 bits, buckets of 256,
# min-max scaling, first and last layer in full precision). `points_lr` (differentiable mode
# only): learning rate of the quantization points; None = the optimizer's own.
QUANT_DEFAULTS: dict[str, Any] = {
    "bits": 4,
    "scaling": "minmax",
    "bucket_size": 256,
    "stochastic": False,
    "mode": "uniform",
    "skip_first_last": True,
    "points_lr": None,
}


def quantization_settings(quantization: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in; an unknown key or a bad value is one line naming module.quantization."""
    given = dict(quantization or {})
    unknown = sorted(set(given) - set(QUANT_DEFAULTS))
    if unknown:
        raise ValueError(
            f"module.quantization has unknown key(s) {unknown}; "
            f"expected keys {list(QUANT_DEFAULTS)}"
        )
    settings = {**QUANT_DEFAULTS, **given}
    points_lr = settings["points_lr"]
    if points_lr is not None and (
        isinstance(points_lr, bool) or not isinstance(points_lr, (int, float)) or points_lr <= 0
    ):
        raise ValueError(
            f"module.quantization.points_lr={points_lr!r}: expected null or a number > 0"
        )
    if points_lr is not None and settings["mode"] != "differentiable":
        raise ValueError(
            f"module.quantization.points_lr={points_lr!r} needs mode=differentiable "
            f"(mode={settings['mode']!r} has no learnable points)"
        )
    return settings


def _attach(model: nn.Module, settings: Mapping[str, Any]) -> list[str]:
    kwargs = {k: v for k, v in settings.items() if k != "points_lr"}
    try:
        return attach_quantizers(model, **kwargs)
    except ValueError as err:  # quant.py names the argument; say where it came from
        raise ValueError(f"module.quantization: {err}") from err


class QuantizedDistillModule(DistillModule):
    """DistillModule whose student forward uses quantized weights (Polino's quantized distillation).

    `quantization`: {bits (2-8), scaling (minmax|absmax), bucket_size (int or None = whole
    tensor), stochastic (rounding, uniform mode only), mode (uniform|differentiable),
    skip_first_last, points_lr}; missing keys take QUANT_DEFAULTS. Every other argument is
    DistillModule's, passed through unchanged (model, teacher, methods, image_size, ...). The
    quantizers are attached after the student is built (and hooked), so NST pairs, KD and the
    other methods work unchanged; checkpoints hold the full-precision
    `...parametrizations.weight.original` tensors (and the points).
    """

    def __init__(self, *args: Any, quantization: Mapping[str, Any] | None = None, **kwargs: Any):
        # Validate before the (possibly slow) teacher load so a typo fails at once.
        settings = quantization_settings(quantization)
        # DistillModule's save_hyperparameters also records this frame's `quantization`.
        super().__init__(*args, **kwargs)
        # Saved with the settings filled in, so a checkpoint rebuilds the same quantizers.
        self.hparams["quantization"] = settings
        self.quantization = settings
        self.quantized_layers = _attach(self.model, settings)
        if not self.quantized_layers:
            raise ValueError(
                f"module.quantization quantized no layer of {self.hparams.model.get('arch')} "
                f"(skip_first_last={settings['skip_first_last']}); expected Conv2d/Linear layers"
            )

    def parameter_groups(self) -> list[dict[str, Any]]:
        # Points get their own group: weight decay would pull them toward 0 in the scaled [0, 1]
        # space, which has no meaning there, and Polino trains them with their own rate.
        points = list(quantized_parameters(self.model))
        point_ids = {id(p) for p in points}
        groups = [
            {**group, "params": [p for p in group["params"] if id(p) not in point_ids]}
            for group in super().parameter_groups()
        ]
        if points:
            group: dict[str, Any] = {"params": points, "weight_decay": 0.0}
            if self.quantization["points_lr"] is not None:
                group["lr"] = float(self.quantization["points_lr"])
            groups.append(group)
        return groups

    def plain_quantized_model(self) -> nn.Module:
        """A plain network (no parametrizations) holding the eval-mode quantized weights.

        Built fresh rather than deep-copied: a deepcopy of `self.model` would also copy the NST
        forward hooks (and any feature tensors they hold), and shares the dynamic Parametrized*
        classes with the original (quant.py's pitfall). A fresh net with the same quantizers, the
        same state loaded and the quantizers then detached gives exactly the forward's weights.
        """
        net = build_model(self.hparams.model, int(self.hparams.num_classes), untrained=True)
        _attach(net, self.quantization)
        net.load_state_dict(self.model.state_dict())
        detach_quantizers(net)
        return net.eval()

    def deployable_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain network's state dict with the quantized weight values (model.pt)."""
        return {
            k: v.detach().cpu().clone()
            for k, v in self.plain_quantized_model().state_dict().items()
        }

    def write_artifacts(self, out_dir: Path) -> dict[str, Any]:
        """Save `model_int.pt` (bit-packed codes + per-bucket scales); return summary entries."""
        path = Path(out_dir) / MODEL_INT_FILE
        # pack_quantized rounds deterministically (as the eval forward), whatever the mode.
        packed = _to_cpu(pack_quantized(self.model))
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        write_bytes_atomic(path, buffer.getvalue())
        return {
            "quantization": dict(self.quantization),
            "quantized_layers": len(self.quantized_layers),
            "model_int_file": str(path.resolve()),
            "model_int_mb": round(path.stat().st_size / 2**20, 3),
            "model_int_tensor_bytes": packed_nbytes(packed),
        }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
