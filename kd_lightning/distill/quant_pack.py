"""Integer storage of quantized weights (the ``model_int.pt`` of a quantized distillation run).

Polino's code kept quantized weights as float tensors, so their "compressed" student was as
large on disk as the full-precision one. :func:`pack_quantized` stores each quantized weight as
``bits``-wide codes bit-packed into uint8 (``ceil(numel * bits / 8)`` bytes) plus a float
alpha/beta per bucket (and the points in differentiable mode); everything else stays float.
:func:`unpack_quantized` rebuilds a plain state_dict with exactly the weights the eval-mode
forward uses; :func:`packed_nbytes` counts the tensor bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distill.quant import (
    MODES,
    DifferentiableQuantizer,
    UniformQuantizer,
    _check_bits,
    _quantized_modules,
    bucket_unscale,
)

PACK_FORMAT = "kd_lightning.quant.v1"

__all__ = [
    "PACK_FORMAT",
    "pack_codes",
    "pack_quantized",
    "packed_nbytes",
    "unpack_codes",
    "unpack_quantized",
]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Bit-pack integer codes in ``0..2^bits-1`` into ``ceil(numel * bits / 8)`` uint8 bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = F.pad(stream, (0, -stream.numel() % 8))
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` codes as uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel].clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = 2 ** torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream.view(numel, bits).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def _key(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def pack_quantized(model: nn.Module) -> dict:
    """Integer export of a model with quantizers attached (deterministic rounding).

    Returns ``{"format", "quantized": {key: entry}, "float": {key: tensor}}`` where ``key`` is the
    plain state_dict key (``layer1.0.conv1.weight``) and ``entry`` holds ``codes`` (bit-packed
    uint8), ``alpha``/``beta`` per bucket, ``points`` (differentiable mode), ``bits``, ``shape``,
    ``bucket_len`` and ``mode``. Loadable with ``torch.load(..., weights_only=True)``.
    """
    quantized: dict[str, dict] = {}
    with torch.no_grad():
        for name, module, quantizer in _quantized_modules(model):
            w = module.parametrizations.weight.original
            codes, alpha, beta = quantizer.encode(w)
            entry = {
                "mode": "uniform" if isinstance(quantizer, UniformQuantizer) else "differentiable",
                "bits": quantizer.bits,
                "shape": tuple(int(d) for d in w.shape),
                "bucket_len": int(codes.shape[1]),
                "codes": pack_codes(codes.reshape(-1)[: w.numel()], quantizer.bits),
                "alpha": alpha.reshape(-1).clone(),
                "beta": beta.reshape(-1).clone(),
            }
            if isinstance(quantizer, DifferentiableQuantizer):
                entry["points"] = quantizer.points.detach().clone()
            quantized[_key(name, "weight")] = entry
    floats = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not (k.startswith("parametrizations.") or ".parametrizations." in k)
    }
    return {"format": PACK_FORMAT, "quantized": quantized, "float": floats}


def _dequantize_entry(entry: dict) -> Tensor:
    shape = tuple(entry["shape"])
    numel = 1
    for d in shape:
        numel *= d
    bits = entry["bits"]
    alpha, beta = entry["alpha"].unsqueeze(1), entry["beta"].unsqueeze(1)
    codes = unpack_codes(entry["codes"], bits, numel)
    # Re-pad like bucket_scale did so the bucket view lines up; padded values are dropped again.
    padded = F.pad(codes.long(), (0, alpha.numel() * entry["bucket_len"] - numel))
    padded = padded.view(-1, entry["bucket_len"])
    if entry["mode"] == "uniform":
        v = padded.to(alpha.dtype) / (2**bits - 1)
    elif entry["mode"] == "differentiable":
        v = entry["points"][padded]
    else:
        raise ValueError(f"mode={entry['mode']!r}: expected one of {MODES}")
    return bucket_unscale(v, alpha, beta, shape)


def unpack_quantized(packed: dict) -> dict[str, Tensor]:
    """Plain state_dict (no parametrizations) from :func:`pack_quantized` output."""
    if not isinstance(packed, dict) or packed.get("format") != PACK_FORMAT:
        got = packed.get("format") if isinstance(packed, dict) else type(packed).__name__
        raise ValueError(f"format={got!r}: expected a dict from pack_quantized ({PACK_FORMAT})")
    state = dict(packed["float"])
    for key, entry in packed["quantized"].items():
        state[key] = _dequantize_entry(entry)
    return state


def packed_nbytes(packed: dict) -> int:
    """Bytes of all tensors in ``packed`` (metadata such as shapes and bit widths not counted)."""

    def walk(obj: object) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(packed)
