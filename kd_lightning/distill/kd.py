"""Hinton KD (Hinton et al. 2015; as used by TAKD, Mirzadeh et al. AAAI 2020):
``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` on logits (B, K), see :class:`KDLoss`."""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distill.precision import compute_dtype, fp32_region

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Hinton KD term ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` on logits (B, K).

    Reduction "batchmean" (default) sums the KL over classes and averages over the batch: the
    mathematically correct KL per sample. TAKD's official code used ``nn.KLDivLoss()`` with its
    default "mean", which averages over all B*K elements, i.e. is smaller by a factor K; pass
    ``reduction="mean"`` to reproduce it. The T^2 factor keeps gradient magnitudes comparable
    across temperatures. The teacher logits are detached; computed in float32 (float64 stays
    float64) with autocast disabled. Returns a scalar.
    """

    def __init__(
        self, temperature: float = 4.0, reduction: Literal["batchmean", "mean"] = "batchmean"
    ) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"KD temperature must be a number > 0, got {temperature!r}")
        if not temperature > 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature!r}")
        if not math.isfinite(temperature):
            raise ValueError(f"KD temperature must be a finite number, got {temperature!r}")
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"unknown KD reduction {reduction!r}; valid: batchmean, mean")
        self.temperature = float(temperature)
        self.reduction = reduction

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        if z_s.dim() != 2 or z_s.shape != z_t.shape:
            raise ValueError(
                f"KD expects student and teacher logits of the same shape (B, K), got "
                f"student {tuple(z_s.shape)} and teacher {tuple(z_t.shape)}"
            )
        if z_s.numel() == 0:
            raise ValueError(f"KD expects non-empty logits, got shape {tuple(z_s.shape)}")
        dtype = compute_dtype(z_s, z_t)
        temp = self.temperature
        with fp32_region(z_s.device):
            log_p_s = F.log_softmax(z_s.to(dtype) / temp, dim=1)
            log_p_t = F.log_softmax(z_t.detach().to(dtype) / temp, dim=1)
            kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        # "mean" spelled out: F.kl_div warns that its own "mean" will change meaning.
        denom = z_s.shape[0] if self.reduction == "batchmean" else z_s.numel()
        return kl * (temp * temp / denom)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction='{self.reduction}'"
