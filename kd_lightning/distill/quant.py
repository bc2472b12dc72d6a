"""Weight quantizers for quantized distillation (Polino, Pascanu & Alistarh, ICLR 2018).

Paper: "Model compression via distillation and quantization", arXiv:1802.05668. The student is
trained under the distillation loss with quantized weights in the forward pass, while the optimizer
updates full-precision weights (straight-through). This module is plain torch.

Scaling (per bucket)
    A weight tensor is flattened and cut into buckets of ``bucket_size`` consecutive values
    (``None``: the whole tensor is one bucket). Bucket b is mapped into [0, 1] by
    ``v = (w - beta_b) / alpha_b``:

    - ``"minmax"`` (the paper's "linear" scaling): ``alpha = max(w) - min(w)``, ``beta = min(w)``.
    - ``"absmax"``: symmetric, ``alpha = 2 max|w|``, ``beta = -max|w|``, so the grid is
      symmetric around 0 (0 itself is not a level: 2^bits levels is an even number). Polino's code
      instead scales ``|w| / max|w|`` and keeps the sign apart, which costs one more bit per weight;
      here the sign lives inside the code so that ``bits`` is the real storage cost.

    Padding: a tensor whose length is not a multiple of ``bucket_size`` gets its last bucket padded
    with its last real value (Polino's ``fill_values='last'``). That value lies inside the bucket's
    range, so min and max, hence alpha and beta, are those of the real values; padding is dropped
    after unscaling. ``alpha == 0`` (a constant bucket) is replaced by 1: then ``v = 0``, the code
    is 0 and ``w_hat = beta = w`` exactly.

Uniform quantization
    ``s = 2^bits - 1`` intervals, ``2^bits`` levels. Deterministic: ``Q(v) = round(v s) / s``;
    stochastic: ``Q(v) = floor(v s + u) / s`` with ``u ~ U[0, 1)``, which is unbiased,
    ``E[Q(v)] = v``. Dequantized ``w_hat = Q(v) alpha + beta``, so ``|w_hat - w| <= alpha / (2 s)``
    with rounding (``< alpha / s`` stochastic). Stochastic draws happen in training mode only;
    eval mode, :func:`detach_quantizers` and ``quant_pack.pack_quantized`` round deterministically.

Straight-through estimator (STE)
    The forward sees ``w_hat``; the gradient reaches ``w`` as identity. It is written
    ``w_hat.detach() + (w - w.detach())``, which equals ``w_hat`` bit for bit (the usual
    ``w + (w_hat - w).detach()`` can be one ulp off), so packed weights match the forward exactly.
    Polino's uniform autograd function also differentiates through min/max; their quantized
    distillation loop applies the gradient taken at the quantized weights to the full-precision
    ones, which is this STE.

Differentiable quantization (``mode="differentiable"``)
    ``n = 2^bits`` learnable points ``p_k`` per tensor in the scaled space (shared by its buckets),
    initialised at the quantiles ``linspace(0, 1, n)`` of the scaled real values, as Polino's
    ``initialize_quantization_points`` (``np.percentile(v, linspace(0, 100, n))``): the end points
    are min and max of v and points crowd where weights are dense. Each v maps to its nearest point,
    ``w_hat = p[idx] alpha + beta``, so autograd gives
    ``dL/dp_k = sum_{i: idx_i = k} alpha_{b(i)} dL/dw_hat_i``, Polino's point gradient. The weights
    get the STE gradient too (Polino's ``nonUniformQuantization_variable`` passes it through).

Attaching
    :func:`attach_quantizers` registers a quantizer with ``torch.nn.utils.parametrize`` on the
    ``weight`` of Conv2d/Linear layers: the optimizer keeps updating the full-precision
    ``<layer>.parametrizations.weight.original`` and every forward sees quantized weights. As in
    the paper's experiments, the first conv and the last linear layer stay full precision by
    default. Points of differentiable quantizers are submodule parameters, so
    ``model.parameters()`` already contains them; :func:`quantized_parameters` picks them out for a
    parameter group of their own (own learning rate, no weight decay).

Integer export
    Bit-packed codes plus per-bucket scales: :mod:`kd_lightning.distill.quant_pack`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

SCALINGS = ("minmax", "absmax")
MODES = ("uniform", "differentiable")

__all__ = [
    "DifferentiableQuantizer",
    "UniformQuantizer",
    "attach_quantizers",
    "bucket_scale",
    "bucket_unscale",
    "detach_quantizers",
    "quantize_tensor",
    "quantized_parameters",
    "uniform_codes",
]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: expected an int in 2..8")
    return bits


def _check_scaling(scaling: str) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}: expected one of {SCALINGS}")
    return scaling


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    return mode


def _check_bucket_size(bucket_size: int | None) -> int | None:
    if bucket_size is None:
        return None
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
        raise ValueError(f"bucket_size={bucket_size!r}: expected a positive int or None")
    return bucket_size


def _bucket_len(numel: int, bucket_size: int | None) -> int:
    # A bucket longer than the tensor would only add padding, never change alpha or beta.
    return numel if bucket_size is None else min(bucket_size, numel)


def bucket_scale(
    w: Tensor, scaling: str = "minmax", bucket_size: int | None = 256
) -> tuple[Tensor, Tensor, Tensor]:
    """Scale ``w`` per bucket into [0, 1].

    Returns ``(v, alpha, beta)`` with ``v`` of shape ``[n_buckets, bucket_len]`` (last bucket padded
    with the last value of ``w``) and ``alpha``, ``beta`` of shape ``[n_buckets, 1]``; ``alpha`` is
    already guarded (1 where the bucket is constant).
    """
    _check_scaling(scaling)
    _check_bucket_size(bucket_size)
    if w.numel() == 0:
        raise ValueError(f"w of shape {tuple(w.shape)}: expected a non-empty tensor")
    if not w.is_floating_point():
        raise ValueError(f"w.dtype={w.dtype}: expected a floating point tensor")
    flat = w.reshape(-1)
    length = _bucket_len(flat.numel(), bucket_size)
    pad = -flat.numel() % length
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    buckets = flat.view(-1, length)
    if scaling == "minmax":
        beta = buckets.amin(dim=1, keepdim=True)
        alpha = buckets.amax(dim=1, keepdim=True) - beta
    else:
        m = buckets.abs().amax(dim=1, keepdim=True)
        alpha, beta = 2 * m, -m
    alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    return (buckets - beta) / alpha, alpha, beta


def bucket_unscale(v: Tensor, alpha: Tensor, beta: Tensor, shape: torch.Size | tuple) -> Tensor:
    """Invert :func:`bucket_scale`: ``v * alpha + beta``, padding dropped, reshaped to ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    # Two separate ops (no addcmul/FMA) so every path rounds the same way: exact pack/unpack.
    w = v * alpha
    w = w + beta
    return w.reshape(-1)[:numel].reshape(shape)


def uniform_codes(
    v: Tensor, bits: int, stochastic: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Integer levels in ``0..2^bits-1`` (as floats, same dtype as ``v``) for ``v`` in [0, 1]."""
    s = 2 ** _check_bits(bits) - 1
    x = v * s
    if stochastic:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = torch.floor(x + u)
    else:
        x = torch.round(x)
    # v can exceed [0, 1] by an ulp after scaling; codes must stay representable in `bits`.
    return x.clamp_(0, s)


def quantize_tensor(
    w: Tensor,
    bits: int = 4,
    scaling: str = "minmax",
    bucket_size: int | None = 256,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniformly quantized and dequantized copy of ``w`` (no gradient tricks)."""
    v, alpha, beta = bucket_scale(w, scaling, bucket_size)
    s = 2 ** _check_bits(bits) - 1
    q = uniform_codes(v, bits, stochastic, generator) / s
    return bucket_unscale(q, alpha, beta, w.shape)


def _straight_through(w: Tensor, w_hat: Tensor) -> Tensor:
    # w - w.detach() is exactly 0, so the value is w_hat bit for bit with identity gradient to w.
    return w_hat + (w - w.detach())


class UniformQuantizer(nn.Module):
    """Parametrization: uniform quantization with STE (stochastic rounding in training only)."""

    def __init__(
        self,
        bits: int = 4,
        scaling: str = "minmax",
        bucket_size: int | None = 256,
        stochastic: bool = False,
    ) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.scaling = _check_scaling(scaling)
        self.bucket_size = _check_bucket_size(bucket_size)
        self.stochastic = bool(stochastic)

    def encode(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic ``(codes [n_buckets, bucket_len] float, alpha, beta)`` of ``w``."""
        v, alpha, beta = bucket_scale(w.detach(), self.scaling, self.bucket_size)
        return uniform_codes(v, self.bits), alpha, beta

    def forward(self, w: Tensor) -> Tensor:
        v, alpha, beta = bucket_scale(w.detach(), self.scaling, self.bucket_size)
        codes = uniform_codes(v, self.bits, stochastic=self.stochastic and self.training)
        w_hat = bucket_unscale(codes / (2**self.bits - 1), alpha, beta, w.shape)
        return _straight_through(w, w_hat)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, scaling={self.scaling!r}, bucket_size={self.bucket_size}, "
            f"stochastic={self.stochastic}"
        )


def _sorted_quantiles(x: Tensor, q: Tensor) -> Tensor:
    # torch.quantile refuses inputs above 16M elements; sort + linear interpolation does not.
    xs = x.reshape(-1).sort().values
    pos = q.to(xs.dtype) * (xs.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo.to(xs.dtype))


class DifferentiableQuantizer(nn.Module):
    """Parametrization: nearest of ``2^bits`` learnable points (in scaled space), STE to weights.

    ``points`` is initialised from ``weight`` at the quantiles ``linspace(0, 1, 2^bits)`` of its
    scaled, unpadded values.
    """

    def __init__(
        self,
        weight: Tensor,
        bits: int = 4,
        scaling: str = "minmax",
        bucket_size: int | None = 256,
    ) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.scaling = _check_scaling(scaling)
        self.bucket_size = _check_bucket_size(bucket_size)
        with torch.no_grad():
            v, _, _ = bucket_scale(weight.detach(), self.scaling, self.bucket_size)
            real = v.reshape(-1)[: weight.numel()]
            levels = torch.linspace(0, 1, 2**self.bits, device=v.device, dtype=v.dtype)
            points = _sorted_quantiles(real, levels)
        self.points = nn.Parameter(points)

    def assign(self, v: Tensor) -> Tensor:
        """Index of the nearest point for each scaled value (points need not stay sorted)."""
        p = self.points.detach()
        sorted_p, order = p.sort()
        mids = (sorted_p[1:] + sorted_p[:-1]) / 2
        return order[torch.bucketize(v, mids)]

    def encode(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(point indices [n_buckets, bucket_len], alpha, beta)`` of ``w``."""
        v, alpha, beta = bucket_scale(w.detach(), self.scaling, self.bucket_size)
        return self.assign(v), alpha, beta

    def forward(self, w: Tensor) -> Tensor:
        idx, alpha, beta = self.encode(w)
        w_hat = bucket_unscale(self.points[idx], alpha, beta, w.shape)
        return _straight_through(w, w_hat)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scaling={self.scaling!r}, bucket_size={self.bucket_size}"


_Quantizer = (UniformQuantizer, DifferentiableQuantizer)


def _quantizer_of(module: nn.Module) -> UniformQuantizer | DifferentiableQuantizer | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, _Quantizer):
            return p
    return None


def _quantized_modules(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Module, UniformQuantizer | DifferentiableQuantizer]]:
    for name, module in model.named_modules():
        q = _quantizer_of(module)
        if q is not None:
            yield name, module, q


def attach_quantizers(
    model: nn.Module,
    bits: int = 4,
    scaling: str = "minmax",
    bucket_size: int | None = 256,
    stochastic: bool = False,
    mode: str = "uniform",
    skip_first_last: bool = True,
) -> list[str]:
    """Quantize the ``weight`` of every Conv2d/Linear of ``model`` in place; return their names.

    ``skip_first_last`` keeps the first Conv2d and the last Linear in module order (the first and
    last layer if the model has no conv or no linear) in full precision.
    """
    _check_bits(bits)
    _check_scaling(scaling)
    _check_bucket_size(bucket_size)
    _check_mode(mode)
    if stochastic and mode != "uniform":
        raise ValueError(f"stochastic={stochastic!r}: stochastic rounding needs mode='uniform'")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    already = [n for n, m in layers if _quantizer_of(m) is not None]
    if already:
        raise ValueError(f"layers {already}: already quantized, expected detach_quantizers first")
    skip: set[str] = set()
    if skip_first_last and layers:
        convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        skip.add(convs[0] if convs else layers[0][0])
        skip.add(linears[-1] if linears else layers[-1][0])
    names = []
    for name, module in layers:
        if name in skip:
            continue
        if mode == "uniform":
            quantizer: nn.Module = UniformQuantizer(bits, scaling, bucket_size, stochastic)
        else:
            quantizer = DifferentiableQuantizer(module.weight, bits, scaling, bucket_size)
        parametrize.register_parametrization(module, "weight", quantizer)
        names.append(name)
    return names


def _own_parametrized_class(module: nn.Module) -> None:
    # A deepcopy shares the dynamic Parametrized* class with its source, and
    # remove_parametrizations deletes the `weight` property from that class, which would break
    # the other copy. A private clone of the class keeps the removal local to this module.
    cls = module.__class__
    members = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, members)


def detach_quantizers(model: nn.Module) -> list[str]:
    """Remove the quantizers, leaving the (deterministically) quantized values in plain weights."""
    names = []
    for name, module, quantizer in list(_quantized_modules(model)):
        quantizer.eval()  # no stochastic draw in the value that stays
        _own_parametrized_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        names.append(name)
    return names


def quantized_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The learnable points of every differentiable quantizer in ``model``."""
    for _, _, quantizer in _quantized_modules(model):
        if isinstance(quantizer, DifferentiableQuantizer):
            yield quantizer.points
