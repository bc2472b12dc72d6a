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
  memory is O(B D + B^2) besides one block of cosines (next point). Centring changes no distance
  or angle but keeps float32 cancellation small.
* Angle term, blocked (:class:`_AngleLoss`): the B^3 cosines never exist at once. Anchors go
  through in blocks of at most 2^18 cosines on the CPU (1 MB in float32; 16 anchors at batch
  128; 2^22 on other devices, against launch overhead, not measured), student and teacher
  cosines side by side, and the same pass computes the gradient to the Gram matrix
  and the squared distances in closed form (the loss is a scalar; backward only scales it), so
  nothing of size B^3 is kept for backward. The same value and gradient as the plain autograd
  formula (float64 tests; the clamp's gradient too: it passes at exactly +-1, stops beyond).
  ResNet-34 -> 18 embeddings (B = 128, D = 512, float32, 1 CPU thread under load), forward +
  backward of both terms: 85.6 ms -> 17.4 ms (median of 21 alternating rounds), peak extra
  memory 57.4 MB -> 6.5 MB, largest tensor 8 MB -> 1 MB. ``benchmarks/bench_methods.py``
  afterwards: 18.0 ms, 1.42% of the 32 px distillation step (21.7 ms, 0.41% at 64 px), 6.3 MB
  peak extra. Not double-differentiable.
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

from kd_lightning.distill.methods import (
    DistillInputs,
    DistillMethod,
    check_weight,
    flat_embedding,
    refuse_unknown,
)
from kd_lightning.distill.precision import compute_dtype, fp32_region

__all__ = ["RKDLoss", "rkd_parts"]

_RKD_OPTIONS = ("student", "teacher", "distance_weight", "angle_weight")
_EPS = 1e-12
# Angle-term blocks: 2^18 float32 cosines = 1 MB per buffer, 16 anchors at batch 128. Blocked pass
# alone at B = 128, 1 thread, best of 30: 2^14 51 ms, 2^16 21 ms, 2^18 10 ms, 2^20 13 ms (smaller
# blocks pay per-op overhead). Other devices: larger blocks against kernel-launch overhead (not
# measured).
_ANGLE_BLOCK_ELEMS_CPU = 1 << 18
_ANGLE_BLOCK_ELEMS = 1 << 22


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


def _inverse_norms(sq: Tensor) -> Tensor:
    """1 / |x_j - x_a| from squared distances (B, B); 0 where the distance is below 1e-6."""
    # sqrt of a clamped value: no inf derivative at the exact-zero diagonal.
    norm = sq.clamp_min(_EPS).sqrt()
    return torch.where(norm > 1e-6, 1.0 / norm, torch.zeros_like(norm))


def _block_cosines(gram: Tensor, shifted: Tensor, inv: Tensor, rows: slice, out: Tensor) -> Tensor:
    """Unclamped cos[a, j, k] for the anchors a in ``rows``, written into ``out`` (A, B, B).

    <x_j - x_a, x_k - x_a> = G_jk - r_aj - r_ak with r_aj = G_aj - G_aa / 2 (``shifted``).
    """
    r = shifted[rows]
    u = torch.sub(gram, r.unsqueeze(2), out=out)
    u.sub_(r.unsqueeze(1))
    inv_a = inv[rows]
    return u.mul_(inv_a.unsqueeze(2)).mul_(inv_a.unsqueeze(1))


def _angle_blocks(
    sq_s: Tensor, gram_s: Tensor, inv_t: Tensor, gram_t: Tensor, grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """sum over (a, j, k) of smoothL1(cos_s, cos_t), and its gradients to gram_s and sq_s.

    Anchors go through in blocks of at most ``_ANGLE_BLOCK_ELEMS_CPU`` cosines (CPU; other
    devices ``_ANGLE_BLOCK_ELEMS``), three block buffers reused throughout (student cosines,
    clamped student cosines, teacher cosines). With
    h = dL/dcos_s * inv_aj * inv_ak (dL/dcos_s after the clamp's mask) and p = dL/dcos_s * cos_s:
    dL/dG_jk = sum_a h_ajk, dL/dG_aj = -sum_k (h_ajk + h_akj), dL/dG_aa += sum_jk h_ajk, and
    dL/dsq_aj = -inv_aj^2 / 2 sum_k (p_ajk + p_akj) (from d inv / d sq = -inv^3 / 2). Both
    orders (j, k) and (k, j) are summed: rounding makes the computed cosines, and so where the
    clamp acts, not exactly symmetric, and a cosine's gradient cancels only with all its parts.
    """
    b = gram_s.shape[0]
    inv_s = _inverse_norms(sq_s)
    shifted_s = gram_s - 0.5 * gram_s.diagonal().unsqueeze(1)
    shifted_t = gram_t - 0.5 * gram_t.diagonal().unsqueeze(1)
    block = _ANGLE_BLOCK_ELEMS_CPU if gram_s.device.type in ("cpu", "meta") else _ANGLE_BLOCK_ELEMS
    step = max(1, min(b, block // (b * b)))
    bufs = [gram_s.new_empty(step, b, b) for _ in range(3)]
    # Clamp's gradient passes at u = +-1 exactly and stops beyond: hardtanh_backward stops at its
    # bounds, so they are the next representable numbers after +-1.
    top = 1.0 + torch.finfo(gram_s.dtype).eps
    total = gram_s.new_zeros(())
    d_gram = torch.zeros_like(gram_s) if grad else None
    row_dot = torch.empty_like(gram_s) if grad else None
    for a0 in range(0, b, step):
        rows = slice(a0, min(b, a0 + step))
        n = rows.stop - a0
        u = _block_cosines(gram_s, shifted_s, inv_s, rows, bufs[0][:n])
        cos_s = torch.clamp(u, -1.0, 1.0, out=bufs[1][:n])
        cos_t = _block_cosines(gram_t, shifted_t, inv_t, rows, bufs[2][:n]).clamp_(-1.0, 1.0)
        total += F.smooth_l1_loss(cos_s, cos_t, reduction="sum")
        if d_gram is None or row_dot is None:
            continue
        # smooth L1 (beta 1) gradient clamp(cos_s - cos_t, -1, 1), then the clamp's mask.
        g = cos_s.sub_(cos_t).clamp_(-1.0, 1.0)
        g = torch.ops.aten.hardtanh_backward.grad_input(g, u, -top, top, grad_input=cos_t)
        p = u.mul_(g)
        torch.add(p.sum(2), p.sum(1), out=row_dot[rows])
        inv_a = inv_s[rows]
        h = g.mul_(inv_a.unsqueeze(2)).mul_(inv_a.unsqueeze(1))
        d_gram += h.sum(0)
        r = h.sum(2)
        d_gram.diagonal()[rows] += r.sum(1)
        d_gram[rows] -= r.add_(h.sum(1))
    if d_gram is None or row_dot is None:
        return total, None, None
    return total, d_gram, -0.5 * (inv_s * inv_s) * row_dot


class _AngleLoss(torch.autograd.Function):
    """L_A from (sq_s, gram_s) with the teacher's (inv_t, gram_t) as constants.

    The gradient is computed in the same blocked pass as the value (the loss is a scalar: the
    backward only scales it), so no (B, B, B) tensor is kept for backward or formed twice.
    """

    @staticmethod
    def forward(ctx, sq_s: Tensor, gram_s: Tensor, inv_t: Tensor, gram_t: Tensor) -> Tensor:  # type: ignore[override]
        total, d_gram, d_sq = _angle_blocks(sq_s, gram_s, inv_t, gram_t, grad=True)
        n = gram_s.shape[0] ** 3
        ctx.grads = (d_sq / n, d_gram / n)  # type: ignore[operator]
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        d_sq, d_gram = ctx.grads
        return d_sq * grad, d_gram * grad, None, None


def _angle_loss(sq_s: Tensor, gram_s: Tensor, inv_t: Tensor, gram_t: Tensor) -> Tensor:
    if torch.is_grad_enabled() and (sq_s.requires_grad or gram_s.requires_grad):
        return _AngleLoss.apply(sq_s, gram_s, inv_t, gram_t)
    total, _, _ = _angle_blocks(sq_s, gram_s, inv_t, gram_t, grad=False)
    return total / gram_s.shape[0] ** 3


def rkd_parts(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(distance loss, angle loss), unweighted scalars, for embeddings s (B, D_s), t (B, D_t)."""
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"RKD expects embeddings (B, D) with the same B, got student {tuple(s.shape)} "
            f"and teacher {tuple(t.shape)}"
        )
    dtype = compute_dtype(s, t)
    with fp32_region(s.device):
        s = s.to(dtype)
        if s.shape[0] < 2:
            zero = s.sum() * 0.0
            return zero, zero
        with torch.no_grad():
            sq_t, gram_t = _gram_geometry(t.detach().to(dtype))
            d_t, inv_t = _distances(sq_t), _inverse_norms(sq_t)
        sq_s, gram_s = _gram_geometry(s)
        dist = F.smooth_l1_loss(_distances(sq_s), d_t)
        angle = _angle_loss(sq_s, gram_s, inv_t, gram_t)
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
