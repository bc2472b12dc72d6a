"""Relational Knowledge Distillation (Park et al. 2019, "Relational Knowledge Distillation", CVPR).

Penultimate embeddings (the pooled features before fc) s (B, D_s) and t (B, D_t); D_s and D_t may
differ, only relations between samples are compared.

* Distance: d_ij = |x_i - x_j|_2, divided by mu = mean of d over the B(B-1) pairs i != j (each
  network by its own mu; the teacher's under no_grad);  L_D = mean over B^2 of smoothL1(d_s, d_t).
* Angle: cos_ajk = <x_j - x_a, x_k - x_a> / (|x_j - x_a| |x_k - x_a|) for every anchor a;
  L_A = mean over B^3 of smoothL1(cos_s, cos_t).
* Weights 25 (distance) and 50 (angle): RepDistiller/mdistiller; logged as ``train/<key>_distance``
  and ``train/<key>_angle``. smooth L1 with beta = 1 (PyTorch's default, as the official code).

Choices and where this differs from the reference code (numbers, not definitions):

* Memory: the official code forms the B x B x D difference vectors (O(B^2 D + B^3)). Here both
  terms come from the B x B Gram matrix G of the batch-centred embeddings:
  <x_j - x_a, x_k - x_a> = G_jk - G_aj - G_ak + G_aa and |x_j - x_a|^2 = G_jj - 2 G_aj + G_aa, so
  memory is O(B D + B^3) (the B^3 cosines are the term itself). Centring changes no distance or
  angle but keeps float32 cancellation small.
* Degenerate vectors: as F.normalize in the reference, a zero difference (a == j, or duplicate
  samples, distance below 1e-6) has cosine 0; cosines are clamped to [-1, 1]. Distances are
  sqrt(max(d^2, 1e-12)) off the diagonal, 0 on it (the reference ``pdist``). The reference's
  mean over d > 0 is the off-diagonal mean because of that clamp.
* Batch-dependent: a batch of one sample has no pair; the reference gives NaN, here both terms are
  0 (with a graph). B = 2 has no proper triple (every cosine is 1 or 0).
* Teacher detached; float32 with autocast off (float64 stays float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.distill.losses import _compute_dtype, _fp32_region
from kd_lightning.distill.methods import (
    DistillInputs,
    DistillMethod,
    check_weight,
    flat_embedding,
    refuse_unknown,
)

__all__ = ["RKDLoss", "rkd_parts"]

_RKD_OPTIONS = ("student", "teacher", "distance_weight", "angle_weight")
_EPS = 1e-12


def _gram_geometry(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, D) -> (squared distances (B, B) with an exact-zero diagonal, centred Gram (B, B))."""
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.t()
    diag = gram.diagonal()
    sq = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * gram).clamp_min(0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return sq.masked_fill(eye, 0.0), gram


def _distances(sq: Tensor) -> Tensor:
    eye = torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device)
    d = sq.clamp_min(_EPS).sqrt().masked_fill(eye, 0.0)
    b = sq.shape[0]
    mu = d.sum() / (b * (b - 1))
    return d / mu.clamp_min(_EPS)


def _angles(sq: Tensor, gram: Tensor) -> Tensor:
    """cos[a, j, k] for all anchors a; (B, B, B)."""
    diag = gram.diagonal()
    # <x_j - x_a, x_k - x_a> = G_jk - G_aj - G_ak + G_aa
    inner = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + diag.view(-1, 1, 1)
    # sqrt of a clamped value: no inf derivative at the exact-zero diagonal.
    norm = sq.clamp_min(_EPS).sqrt()
    inv = torch.where(norm > 1e-6, 1.0 / norm, torch.zeros_like(norm))
    return (inner * inv.unsqueeze(2) * inv.unsqueeze(1)).clamp(-1.0, 1.0)


def rkd_parts(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(distance loss, angle loss), unweighted scalars, for embeddings s (B, D_s), t (B, D_t)."""
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"RKD expects embeddings (B, D) with the same B, got student {tuple(s.shape)} "
            f"and teacher {tuple(t.shape)}"
        )
    dtype = _compute_dtype(s, t)
    with _fp32_region(s.device):
        s = s.to(dtype)
        if s.shape[0] < 2:
            zero = s.sum() * 0.0
            return zero, zero
        with torch.no_grad():
            sq_t, gram_t = _gram_geometry(t.detach().to(dtype))
            d_t, a_t = _distances(sq_t), _angles(sq_t, gram_t)
        sq_s, gram_s = _gram_geometry(s)
        dist = F.smooth_l1_loss(_distances(sq_s), d_t)
        angle = F.smooth_l1_loss(_angles(sq_s, gram_s), a_t)
        return dist, angle


class RKDLoss(DistillMethod):
    """RKD distance + angle terms on the penultimate embeddings; see the module docstring.

    ``student``/``teacher`` name the hooked layer giving (B, D) or (B, D, 1, 1) features
    (``avgpool`` of a torchvision ResNet: the pooled features before fc).
    """

    def __init__(
        self,
        student: str = "avgpool",
        teacher: str = "avgpool",
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        refuse_unknown("RKD", unknown, _RKD_OPTIONS)
        self.student, self.teacher = str(student), str(teacher)
        self.distance_weight = check_weight("RKD", "distance_weight", distance_weight)
        self.angle_weight = check_weight("RKD", "angle_weight", angle_weight)

    def student_layers(self) -> tuple[str, ...]:
        return (self.student,)

    def teacher_layers(self) -> tuple[str, ...]:
        return (self.teacher,)

    def build(self, student_shapes, teacher_shapes, num_classes: int = 2) -> None:
        flat_embedding(
            "RKD", self.student, torch.empty(student_shapes[self.student], device="meta")
        )
        flat_embedding(
            "RKD", self.teacher, torch.empty(teacher_shapes[self.teacher], device="meta")
        )

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """Weighted sum distance_weight * L_D + angle_weight * L_A."""
        dist, angle = rkd_parts(s, t)
        return self.distance_weight * dist + self.angle_weight * angle

    def terms(self, inputs: DistillInputs) -> dict[str, tuple[float, Tensor]]:
        s = flat_embedding("RKD", self.student, inputs.student[self.student])
        t = flat_embedding("RKD", self.teacher, inputs.teacher[self.teacher])
        dist, angle = rkd_parts(s, t)
        return {"distance": (self.distance_weight, dist), "angle": (self.angle_weight, angle)}

    def extra_repr(self) -> str:
        return (
            f"student={self.student!r}, teacher={self.teacher!r}, "
            f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
        )
