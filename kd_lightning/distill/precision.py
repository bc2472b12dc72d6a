"""The precision every distillation loss computes in: float32 (float64 inputs stay float64) with
autocast disabled inside, since bf16/fp16 products lose the small differences these losses are made
of (MMD^2, KL between near-equal distributions)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    # Autocast would silently run the losses' matrix products in bf16/fp16; some device types
    # (meta) have no autocast at all, and there is nothing to disable.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(*xs: Tensor) -> torch.dtype:
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32
