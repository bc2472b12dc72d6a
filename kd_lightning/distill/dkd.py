"""Decoupled Knowledge Distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation", CVPR).

Logits z_s, z_t (B, K), targets y (B,), temperature T. With p = softmax(z / T):

* binary split b = [p_y, sum_{k != y} p_k] (B, 2);  TCKD = T^2 KL(b_t || b_s)
* non-target p~ = softmax over the K-1 non-target logits / T (B, K-1);  NCKD = T^2 KL(p~_t || p~_s)
* DKD = w(epoch) * (alpha TCKD + beta NCKD),  w = min(epoch / warmup, 1)

Each KL is summed over its classes and averaged over the batch (mdistiller's ``size_average=False``
sum / batch size, i.e. "batchmean"). CE is the module's own term (weight 1, as mdistiller).
Defaults are the authors' CIFAR ones: alpha 1, beta 8, T 4, warmup 20 epochs (ImageNet R34 -> R18:
T 1, warmup 1, beta 0.5). Choices where paper and reference code differ, and numerics:

* Warm-up: mdistiller counts epochs from 1, so its first epoch has w = 1/warmup; Lightning counts
  from 0, so w = min((epoch + 1) / warmup, 1) reproduces it (``warmup=0`` turns warm-up off).
  The factor multiplies the weights (alpha, beta), so the logged TCKD/NCKD stay unweighted.
* Masking: mdistiller masks the target by subtracting 1000 from its logit; here the non-target
  logits are gathered into a (B, K-1) tensor (fixed shape, no boolean mask), exact for any
  logit scale.
* log b is computed in log space (log p_y = z_y/T - logsumexp(z/T), log of the non-target mass =
  logsumexp over non-targets - logsumexp(z/T)): taking torch.log of the binary b, as the reference
  code does, gives -inf when a probability underflows (an Inf loss was reported upstream).
* Two classes (this project's data): one non-target class, so p~ = [1] for both networks and NCKD
  is identically 0 with zero gradient; b is then p itself and TCKD equals Hinton KD. Binary DKD is
  therefore CE + w * alpha * KD, beta has no effect (the mdistiller maintainers: NCKD cannot be used
  for binary tasks). :meth:`DKDLoss.build` / the first forward log one warning saying so.
* Teacher logits detached; float32 with autocast off (float64 stays float64).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.distill.methods import (
    DistillInputs,
    DistillMethod,
    check_weight,
    refuse_unknown,
)
from kd_lightning.distill.precision import compute_dtype, fp32_region

__all__ = ["DKDLoss", "dkd_parts"]

log = logging.getLogger(__name__)

_DKD_OPTIONS = ("alpha", "beta", "temperature", "warmup")
BINARY_WARNING = (
    "DKD with 2 classes: NCKD is identically 0 (one non-target class) and DKD reduces to "
    "alpha * Hinton KD (TCKD = KD); beta has no effect"
)


def _batch_kl(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / log_p_s.shape[0]


def dkd_parts(
    z_s: Tensor, z_t: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each T^2 * batch-mean KL, scalars; see the module docstring."""
    if z_s.dim() != 2 or z_s.shape != z_t.shape or z_s.shape[1] < 2:
        raise ValueError(
            f"DKD expects student and teacher logits of the same shape (B, K >= 2), got "
            f"student {tuple(z_s.shape)} and teacher {tuple(z_t.shape)}"
        )
    if targets.shape != (z_s.shape[0],):
        raise ValueError(
            f"DKD expects targets (B,) = ({z_s.shape[0]},), got {tuple(targets.shape)}"
        )
    dtype = compute_dtype(z_s, z_t)
    k = z_s.shape[1]
    temp = float(temperature)
    with fp32_region(z_s.device):
        # Column j of the non-target logits is class j, or j + 1 from the target on: a gather with
        # a fixed (B, K-1) shape (no boolean mask, no -1000 offset).
        y = targets.long().view(-1, 1)
        steps = torch.arange(k - 1, device=z_s.device).view(1, -1)
        non_target = steps + (steps >= y).long()
        out = []
        for z in (z_s.to(dtype), z_t.detach().to(dtype)):
            scaled = z / temp
            lse = torch.logsumexp(scaled, dim=1, keepdim=True)
            others = scaled.gather(1, non_target)
            log_b = torch.cat(
                [
                    scaled.gather(1, y) - lse,
                    torch.logsumexp(others, dim=1, keepdim=True) - lse,
                ],
                dim=1,
            )
            out.append((log_b, F.log_softmax(others, dim=1)))
        (b_s, nt_s), (b_t, nt_t) = out
        scale = temp * temp
        return scale * _batch_kl(b_t, b_s), scale * _batch_kl(nt_t, nt_s)


class DKDLoss(DistillMethod):
    """DKD on logits (B, K) and targets (B,): terms ``tckd`` (weight w * alpha) and ``nckd``
    (weight w * beta), logged as ``train/<key>_tckd`` / ``train/<key>_nckd``; see module docs."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: int = 20,
        **unknown: Any,
    ) -> None:
        super().__init__()
        refuse_unknown("DKD", unknown, _DKD_OPTIONS)
        self.alpha = check_weight("DKD", "alpha", alpha)
        self.beta = check_weight("DKD", "beta", beta)
        self.temperature = check_weight("DKD", "temperature", temperature, positive=True)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"DKD warmup={warmup!r}: expected an integer number of epochs >= 0")
        self.warmup = warmup
        self._warned_binary = False

    def warmup_factor(self, epoch: int) -> float:
        """min((epoch + 1) / warmup, 1) for a 0-based epoch (mdistiller: 1-based epoch / warmup)."""
        return 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def _warn_if_binary(self, num_classes: int) -> None:
        if num_classes == 2 and not self._warned_binary:
            log.warning(BINARY_WARNING)
            self._warned_binary = True

    def build(
        self,
        student_shapes: Mapping[str, torch.Size],
        teacher_shapes: Mapping[str, torch.Size],
        num_classes: int,
    ) -> None:
        self._warn_if_binary(num_classes)

    def forward(self, z_s: Tensor, z_t: Tensor, targets: Tensor, epoch: int = 0) -> Tensor:
        """The weighted DKD scalar w(epoch) * (alpha TCKD + beta NCKD)."""
        terms = self._terms(z_s, z_t, targets, epoch)
        return sum(weight * value for weight, value in terms.values())

    def _terms(self, z_s: Tensor, z_t: Tensor, targets: Tensor, epoch: int) -> dict:
        self._warn_if_binary(z_s.shape[-1])
        tckd, nckd = dkd_parts(z_s, z_t, targets, self.temperature)
        w = self.warmup_factor(epoch)
        return {"tckd": (w * self.alpha, tckd), "nckd": (w * self.beta, nckd)}

    def terms(self, inputs: DistillInputs) -> dict[str, tuple[float, Tensor]]:
        return self._terms(inputs.logits_s, inputs.logits_t, inputs.targets, inputs.epoch)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"warmup={self.warmup}"
        )
