"""Neuron Selectivity Transfer: MMD^2 between the student's and the teacher's channel maps.

Neuron Selectivity Transfer (Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer", arXiv 1707.01219)
------------------------------------------------------------------------------------------------
Inputs: student map ``f_s`` (B, C_s, H, W) and teacher map ``f_t`` (B, C_t, H', W'). For each
sample b, every channel map is flattened to an HW vector and L2-normalised, giving the student set
{s_j}, j < C_s and the teacher set {t_i}, i < C_t (each a (C, HW) matrix). Per sample

    MMD^2_b = mean_{j,j'} k(s_j, s_j') + mean_{i,i'} k(t_i, t_i') - 2 mean_{i,j} k(s_j, t_i)

and the loss is the mean of MMD^2_b over the batch (a scalar, unweighted: the paper's lambda/2 is
the caller's weight). Kernels:

* ``linear``   k = x.y; then MMD^2 = |mean_j s_j - mean_i t_i|^2, computed in that closed form.
* ``poly``     k = (x.y + c)^d, d = 2 and c = 0 by default (the authors' code). For d = 2 the
  channel-pair form (Gram matrices S S^T, O(B C^2 HW)) equals the spatial form
  |G_s / C_s - G_t / C_t|_F^2 with G = S^T S (HW x HW, O(B C HW^2)); for c != 0 the expansion
  (x.y + c)^2 = (x.y)^2 + 2c x.y + c^2 adds 2c times the linear MMD^2 and the c^2 terms cancel.
  ``form="auto"`` picks the cheaper form by estimated flops (:func:`choose_poly_form`); the two
  differ by orders of magnitude (1.5 s vs 3.5 ms at ResNet-50 layer4, 64 px).
* ``gaussian`` k = exp(-|x - y|^2 / (2 sigma2)). No Gram-matrix shortcut exists for exp, so the
  cost is the B x C x C' kernel matrices themselves: they are built ~1 MB block at a time (one
  bmm gives the exponent), summed, and rebuilt in backward by a small autograd Function
  (:class:`_GaussianKernelSum`). Memory is O(block) instead of several B x C_s x C_t buffers, and
  at ResNet-50 -> 18 layer4 (batch 128, 2048 teacher channels) forward+backward took 1.8 s against
  14.6 s for the same math as plain autograd ops (``benchmarks/bench_nst.py``, 2 CPU threads).
  What remains is ~B C_t^2 exponentials; ``teacher_term=False`` halves it there (0.86 s).

Nothing ever forms the B x C x C x HW broadcast tensor of the public RepDistiller/mdistiller
kernel (~26 GB at ResNet-152 layer1, 224 px, batch 32): only batched matrix products, so memory
is O(B C^2) (channel form) or O(B HW^2) (spatial form). The teacher-teacher Gram matrix needs no
gradient and is computed in batch chunks to bound its memory when C_t is large.

Shapes: f_s (B, C_s, H, W), f_t (B, C_t, H', W') -> s (B, C_s, HW), t (B, C_t, HW) after pooling
and normalising -> per-sample MMD^2 (B,) -> NSTLoss returns its batch mean, a scalar.

Choices where the paper, the authors' MXNet code and other public code differ:

* Teacher-teacher term: kept by default, on the detached teacher (as RepDistiller does), so the
  value is 0 at a perfect match. The authors' MXNet code drops it; that changes the value, not the
  gradient. ``teacher_term=False`` reproduces the authors' choice: it is the largest of the three
  kernel means whenever C_t > C_s (C_t^2 pairs), so dropping it is the one exact way to make NST
  on wide teacher layers several times cheaper.
* Gradients flow only to the student: the teacher map is detached.
* Spatial mismatch: the larger map is adaptive-average-pooled to the smaller size, each axis
  separately (RepDistiller's choice); the paper uses matching layers. Channel counts may differ.
* Polynomial c: 0 and d: 2 by default (the authors' code); any c and integer d >= 1 allowed.
* Gaussian sigma2=None: per sample, the mean squared distance over all distinct pairs of the
  pooled set {s_j} U {t_i}, computed without gradient (treated as a constant). The paper reports
  setting sigma^2 to the mean squared distance of the pairs; its code has no Gaussian kernel. The
  mean adapts to how spread the normalised channels are (for non-negative ReLU maps the squared
  distances lie in [0, 2], for unit vectors generally in [0, 4]), unlike a fixed value, and has a
  closed form: for N unit-or-zero vectors with mean m, sum_{a,b} |x_a - x_b|^2 =
  2 N sum_a |x_a|^2 - 2 N^2 |m|^2. It is floored at 1e-4 so identical or all-zero maps give no
  0/0. Pass a float to fix it (needed for gradcheck, since the default is detached).
* Reduction: mean over the batch of the per-sample MMD^2 (as RepDistiller's .mean() over B x C x C);
  :func:`nst_mmd2` returns the per-sample values.
* Precision: always computed in float32 (float64 inputs stay float64), autocast disabled inside;
  bf16 Gram matrices lose the small differences MMD^2 is made of.
* All-zero channel maps normalise to zero vectors (eps 1e-12), giving finite values and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distill.precision import compute_dtype, fp32_region

__all__ = ["KERNELS", "POLY_FORMS", "NSTLoss", "choose_poly_form", "nst_mmd2"]


KERNELS = ("linear", "poly", "gaussian")
POLY_FORMS = ("auto", "channel", "spatial")

Kernel = Literal["linear", "poly", "gaussian"]
PolyForm = Literal["auto", "channel", "spatial"]

_NORM_EPS = 1e-12
_SIGMA2_FLOOR = 1e-4
# Teacher-teacher Gram matrices are computed this many elements at a time (64 MB in float32):
# B x C_t x C_t reaches 1 GB for C_t = 2048, batch 64, and is only needed as a sum.
_TEACHER_CHUNK_ELEMS = 1 << 24
# Gaussian kernel blocks: 2^18 float32 = 1 MB stays in this CPU's 512 KB-1 MB L2 across the
# bmm, exp and sum that each block goes through (2^18 to 2^20 measured fastest).
_GAUSSIAN_BLOCK_ELEMS = 1 << 18


def _check_maps(f_s: Tensor, f_t: Tensor) -> None:
    if not isinstance(f_s, Tensor) or not isinstance(f_t, Tensor):
        raise TypeError(
            f"NST expects two tensors, got {type(f_s).__name__} and {type(f_t).__name__}"
        )
    if f_s.dim() != 4 or f_t.dim() != 4:
        raise ValueError(
            f"NST expects 4-D feature maps (B, C, H, W), got student {tuple(f_s.shape)} "
            f"and teacher {tuple(f_t.shape)}"
        )
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(
            f"NST expects the same batch size, got student {tuple(f_s.shape)} "
            f"and teacher {tuple(f_t.shape)}"
        )
    if f_s.numel() == 0 or f_t.numel() == 0:
        raise ValueError(
            f"NST expects non-empty feature maps, got student {tuple(f_s.shape)} "
            f"and teacher {tuple(f_t.shape)}"
        )
    if not (f_s.is_floating_point() and f_t.is_floating_point()):
        raise ValueError(
            f"NST expects floating-point feature maps, got student {f_s.dtype} "
            f"and teacher {f_t.dtype}"
        )


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever map is larger (per axis) down to the common smaller size."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def _unit_channels(f: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, HW) with every channel vector L2-normalised (zero stays zero)."""
    return F.normalize(f.flatten(2), p=2.0, dim=2, eps=_NORM_EPS)


def choose_poly_form(
    c_s: int, c_t: int, hw: int, teacher_term: bool = True
) -> Literal["channel", "spatial"]:
    """Cheaper exact form of the degree-2 polynomial MMD^2 by estimated multiply-adds.

    Channel form: Gram matrices over channel pairs, ~(C_s^2 + C_t^2 + C_s C_t) HW, without the
    C_t^2 HW teacher-teacher Gram when ``teacher_term`` is False.
    Spatial form: HW x HW Gram matrices, ~(C_s + C_t) HW^2 plus HW^2 for the difference norm
    (it needs the teacher's Gram for the cross term either way).
    """
    channel = (c_s * c_s + (c_t * c_t if teacher_term else 0) + c_s * c_t) * hw
    spatial = (c_s + c_t + 1) * hw * hw
    return "spatial" if spatial < channel else "channel"


def _teacher_kernel_mean(kernel_fn: Callable[..., Tensor], t: Tensor, *extra: Tensor) -> Tensor:
    """mean_{i,i'} k(t_i, t_i') per sample, no gradient, in batch chunks of bounded size.

    ``kernel_fn(t_chunk, *extra_chunks)`` returns the (b, C_t, C_t) kernel matrix of a chunk;
    ``extra`` are per-sample tensors chunked alongside ``t``.
    """
    c = t.shape[1]
    size = max(1, _TEACHER_CHUNK_ELEMS // (c * c))
    with torch.no_grad():
        pieces = zip(*(_chunks(x, size) for x in (t, *extra)), strict=True)
        parts = [kernel_fn(*xs).mean(dim=(1, 2)) for xs in pieces]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _chunks(x: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, x.shape[0], size):
        yield x[start : start + size]


def _gram(a: Tensor, b: Tensor) -> Tensor:
    return torch.bmm(a, b.transpose(1, 2))


def _mmd2_linear(s: Tensor, t: Tensor, teacher_term: bool = True) -> Tensor:
    mean_s, mean_t = s.mean(dim=1), t.mean(dim=1)
    if not teacher_term:
        return (mean_s * mean_s).sum(dim=1) - 2.0 * (mean_s * mean_t).sum(dim=1)
    diff = mean_s - mean_t
    return (diff * diff).sum(dim=1)


def _mmd2_poly_channel(s: Tensor, t: Tensor, degree: int, c: float, teacher_term: bool) -> Tensor:
    def k(a: Tensor, b: Tensor) -> Tensor:
        return (_gram(a, b) + c).pow(degree)

    k_ss = k(s, s).mean(dim=(1, 2))
    k_st = k(s, t).mean(dim=(1, 2))
    if not teacher_term:
        return k_ss - 2.0 * k_st
    k_tt = _teacher_kernel_mean(lambda tc: k(tc, tc), t)
    return k_ss + k_tt - 2.0 * k_st


def _mmd2_poly_spatial(s: Tensor, t: Tensor, c: float, teacher_term: bool) -> Tensor:
    b, c_s, hw = s.shape
    c_t = t.shape[1]
    with torch.no_grad():
        g_t = torch.bmm(t.transpose(1, 2), t)
    # D = G_s / C_s - G_t / C_t in one fused product, without a separate G_s buffer.
    d = torch.baddbmm(g_t, s.transpose(1, 2), s, beta=-1.0 / c_t, alpha=1.0 / c_s)
    flat = d.reshape(b, 1, hw * hw)
    # |D|_F^2 as a batched dot product: no squared copy of the (B, HW, HW) matrix.
    quad = torch.bmm(flat, flat.transpose(1, 2)).reshape(b)
    if not teacher_term:
        # |G_t|_F^2 / C_t^2 is the teacher-teacher term: HW^2 work once G_t exists.
        g_flat = g_t.reshape(b, 1, hw * hw)
        quad = quad - torch.bmm(g_flat, g_flat.transpose(1, 2)).reshape(b) / (c_t * c_t)
    if c == 0.0:
        return quad
    # (x.y + c)^2 = (x.y)^2 + 2c x.y + c^2: the c^2 of the three means cancel only with k_tt.
    constant = 0.0 if teacher_term else -c * c
    return quad + 2.0 * c * _mmd2_linear(s, t, teacher_term) + constant


def _default_sigma2(s: Tensor, t: Tensor) -> Tensor:
    """Per-sample mean squared distance over distinct pairs of the pooled set, no gradient."""
    with torch.no_grad():
        n = s.shape[1] + t.shape[1]
        total_sq = (s * s).sum(dim=(1, 2)) + (t * t).sum(dim=(1, 2))
        mean_vec = (s.sum(dim=1) + t.sum(dim=1)) / n
        pair_sum = 2.0 * n * total_sq - 2.0 * n * n * (mean_vec * mean_vec).sum(dim=1)
        return (pair_sum / (n * (n - 1))).clamp_min(_SIGMA2_FLOOR)


def _gaussian_blocks(a: Tensor, b: Tensor, inv: Tensor) -> Iterator[tuple[slice, slice, Tensor]]:
    """Yield (samples, rows, K) with K = exp(inv |a_i - b_j|^2) for one block of (B, Ca, Cb).

    inv |a_i - b_j|^2 = inv |a_i|^2 + inv |b_j|^2 + (-2 inv a_i) . b_j: one baddbmm per block.
    """
    scale = inv.view(-1, 1)
    left = a * (-2.0 * scale).unsqueeze(2)
    row_term = (a * a).sum(2) * scale
    col_term = ((b * b).sum(2) * scale).unsqueeze(1)
    b_t = b.transpose(1, 2)
    n, c_a, c_b = a.shape[0], a.shape[1], b.shape[1]
    rows = max(1, min(c_a, _GAUSSIAN_BLOCK_ELEMS // c_b))
    samples = max(1, _GAUSSIAN_BLOCK_ELEMS // (c_a * c_b))
    for s0 in range(0, n, samples):
        batch = slice(s0, min(n, s0 + samples))
        for r0 in range(0, c_a, rows):
            row = slice(r0, min(c_a, r0 + rows))
            kernel = torch.baddbmm(col_term[batch], left[batch, row], b_t[batch])
            # Rounding can leave a distance slightly below 0; the kernel never exceeds 1.
            kernel.add_(row_term[batch, row].unsqueeze(2)).clamp_max_(0.0).exp_()
            yield batch, row, kernel


class _GaussianKernelSum(torch.autograd.Function):
    """Per-sample sum_ij exp(inv |a_i - b_j|^2) for a (B, Ca, D), b (B, Cb, D), inv (B,) < 0.

    The kernel matrix exists one block (~1 MB) at a time, in forward and again in backward: as
    plain autograd ops it would be several (B, Ca, Cb) buffers kept for backward (0.5 GB each
    for the cross term at ResNet-50 -> 18 layer4, batch 128), 7.9x slower there on 2 CPU threads.
    Gradient: d/da_i = 2 inv (a_i sum_j K_ij - sum_j K_ij b_j), and symmetrically for b.
    ``inv`` is treated as a constant (fixed or detached bandwidth).
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, inv: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b, inv)
        # k(a, a): the b-side gradient equals the a-side one, computed once in backward.
        ctx.symmetric = a is b
        sums = a.new_zeros(a.shape[0])
        for batch, _, kernel in _gaussian_blocks(a, b, inv):
            sums[batch] += kernel.sum(dim=(1, 2))
        return sums

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        a, b, inv = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.symmetric:
            need_a, need_b = need_a or need_b, False
        grad_a = torch.zeros_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
        for batch, row, kernel in _gaussian_blocks(a, b, inv):
            if grad_a is not None:
                a_rows = a[batch, row]
                grad_a[batch, row] += kernel.sum(2, keepdim=True) * a_rows - torch.bmm(
                    kernel, b[batch]
                )
            if grad_b is not None:
                grad_b[batch] += kernel.sum(1).unsqueeze(2) * b[batch] - torch.bmm(
                    kernel.transpose(1, 2), a[batch, row]
                )
        scale = (2.0 * inv * grad).view(-1, 1, 1)
        if ctx.symmetric and grad_a is not None:
            grad_a = grad_a * scale
            return grad_a, grad_a, None  # autograd adds both sides: 2x the one-sided gradient
        return (
            None if grad_a is None else grad_a * scale,
            None if grad_b is None else grad_b * scale,
            None,
        )


def _gaussian_mean(a: Tensor, b: Tensor, inv: Tensor) -> Tensor:
    return _GaussianKernelSum.apply(a, b, inv) / (a.shape[1] * b.shape[1])


def _mmd2_gaussian(s: Tensor, t: Tensor, sigma2: float | None, teacher_term: bool) -> Tensor:
    if sigma2 is None:
        sig = _default_sigma2(s, t)
    else:
        sig = torch.full((s.shape[0],), float(sigma2), dtype=s.dtype, device=s.device)
    inv = -0.5 / sig
    k_ss = _gaussian_mean(s, s, inv)
    k_st = _gaussian_mean(s, t, inv)
    if not teacher_term:
        return k_ss - 2.0 * k_st
    with torch.no_grad():
        k_tt = _gaussian_mean(t, t, inv)
    return k_ss + k_tt - 2.0 * k_st


def _check_nst_options(
    kernel: str, degree: int, c: float, sigma2: float | None, form: str, teacher_term: bool = True
) -> None:
    if not isinstance(teacher_term, bool):
        raise ValueError(f"NST teacher_term must be true or false, got {teacher_term!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown NST kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if form not in POLY_FORMS:
        raise ValueError(f"unknown NST form {form!r}; valid: {', '.join(POLY_FORMS)}")
    if form != "auto" and kernel != "poly":
        raise ValueError(f"form={form!r} applies only to kernel='poly', got kernel={kernel!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"NST poly degree must be an integer >= 1, got {degree!r}")
    if form == "spatial" and degree != 2:
        raise ValueError(f"form='spatial' needs degree=2, got degree={degree}")
    if not isinstance(c, (int, float)) or isinstance(c, bool):
        raise ValueError(f"NST poly c must be a number, got {c!r}")
    if not (math.isfinite(c) and c >= 0):
        # (x.y + c)^d is a positive semi-definite kernel only for c >= 0
        raise ValueError(f"NST poly c must be a finite number >= 0, got {c!r}")
    if sigma2 is not None and (
        isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)) or not sigma2 > 0
    ):
        raise ValueError(f"NST gaussian sigma2 must be None or a number > 0, got {sigma2!r}")
    if sigma2 is not None and not math.isfinite(sigma2):
        raise ValueError(f"NST gaussian sigma2 must be None or a finite number, got {sigma2!r}")


def nst_mmd2(
    f_s: Tensor,
    f_t: Tensor,
    kernel: Kernel = "poly",
    *,
    degree: int = 2,
    c: float = 0.0,
    sigma2: float | None = None,
    form: PolyForm = "auto",
    teacher_term: bool = True,
) -> Tensor:
    """Per-sample NST MMD^2, shape (B,), float32 (float64 for float64 inputs).

    ``f_s`` (B, C_s, H, W) is the student map, ``f_t`` (B, C_t, H', W') the teacher map (detached
    here). ``form`` applies to the polynomial kernel only: "auto" picks the cheaper exact form for
    degree 2 and the channel form otherwise; "channel"/"spatial" force one (spatial needs d=2).
    ``teacher_term=False`` leaves out the teacher-teacher mean (a constant for the student: same
    gradient, value lower by that constant). See the module docstring.
    """
    _check_nst_options(kernel, degree, c, sigma2, form, teacher_term)
    _check_maps(f_s, f_t)
    dtype = compute_dtype(f_s, f_t)
    with fp32_region(f_s.device):
        fs, ft = _match_spatial(f_s.to(dtype), f_t.detach().to(dtype))
        s, t = _unit_channels(fs), _unit_channels(ft)
        if kernel == "linear":
            return _mmd2_linear(s, t, teacher_term)
        if kernel == "gaussian":
            return _mmd2_gaussian(s, t, sigma2, teacher_term)
        chosen = form
        if chosen == "auto":
            hw = s.shape[2]
            chosen = (
                choose_poly_form(s.shape[1], t.shape[1], hw, teacher_term)
                if degree == 2
                else "channel"
            )
        if chosen == "spatial":
            return _mmd2_poly_spatial(s, t, float(c), teacher_term)
        return _mmd2_poly_channel(s, t, degree, float(c), teacher_term)


class NSTLoss(nn.Module):
    """Neuron Selectivity Transfer loss: batch mean of the squared MMD between channel maps.

    ``NSTLoss(kernel)(f_s, f_t)`` with student (B, C_s, H, W) and teacher (B, C_t, H', W') maps
    returns a scalar (float32, or float64 for float64 inputs); gradients reach the student only.
    Unweighted: multiply by the paper's lambda/2 outside. See the module docstring for the
    formula, the kernels and every choice where the paper and the public code differ.

    Args:
        kernel: "linear", "poly" or "gaussian".
        degree: polynomial degree d (poly only).
        c: polynomial offset c (poly only).
        sigma2: Gaussian bandwidth sigma^2; None = per-sample mean squared pair distance.
        form: poly evaluation, "auto" (cheaper by shape), "channel" or "spatial" (d = 2 only).
        teacher_term: keep the teacher-teacher term (default: the value is the true MMD^2, 0 at
            a perfect match). False drops it as the authors' MXNet code does: identical
            gradients, and much cheaper when the teacher has many channels (it is the largest
            of the three kernel means), at the price of a value that is off by a constant.
    """

    def __init__(
        self,
        kernel: Kernel = "poly",
        degree: int = 2,
        c: float = 0.0,
        sigma2: float | None = None,
        *,
        form: PolyForm = "auto",
        teacher_term: bool = True,
    ) -> None:
        super().__init__()
        _check_nst_options(kernel, degree, c, sigma2, form, teacher_term)
        self.kernel = kernel
        self.degree = degree
        self.c = float(c)
        self.sigma2 = None if sigma2 is None else float(sigma2)
        self.form = form
        self.teacher_term = teacher_term

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        per_sample = nst_mmd2(
            f_s,
            f_t,
            self.kernel,
            degree=self.degree,
            c=self.c,
            sigma2=self.sigma2,
            form=self.form,
            teacher_term=self.teacher_term,
        )
        return per_sample.mean()

    def extra_repr(self) -> str:
        tail = "" if self.teacher_term else ", teacher_term=False"
        if self.kernel == "poly":
            return f"kernel='poly', degree={self.degree}, c={self.c}, form='{self.form}'{tail}"
        if self.kernel == "gaussian":
            return f"kernel='gaussian', sigma2={self.sigma2}{tail}"
        return f"kernel='linear'{tail}"
