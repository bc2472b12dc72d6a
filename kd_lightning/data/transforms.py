"""Deterministic image steps done once per split (resize, CLAHE) and the per-item tensor conversion.

Augmentations themselves are albumentations pipelines built from YAML by Hydra; this module only
holds what the DataModule applies around them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import cv2
import numpy as np
import torch


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a (N, H, W) or (N, H, W, 3) uint8 stack to (N, size, size[, 3]), center-cropping
    non-square images.

    INTER_AREA when shrinking (it averages, so no aliasing), bilinear when enlarging (28 -> 64).
    """
    n, height, width = images.shape[:3]
    if height == width == size:
        return images
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    out = np.empty((n, size, size, *images.shape[3:]), dtype=np.uint8)
    for i in range(n):
        crop = images[i, top : top + side, left : left + side]
        out[i] = cv2.resize(crop, (size, size), interpolation=interpolation)
    return out


def clahe_stack(images: np.ndarray, clip_limit: float = 2.0) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of each (S, S) uint8 image.

    Tiles are kept at >= 16 px (8x8 grid from 128 px up, 1 tile at 28 px): smaller tiles mostly
    amplify noise.
    """
    size = images.shape[-1]
    grid = max(1, min(8, size // 16))
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(grid, grid))
    out = np.empty_like(images)
    for i in range(len(images)):
        out[i] = clahe.apply(np.ascontiguousarray(images[i]))
    return out


AlbumentationsLike = Callable[..., dict]


class ToNormalizedTensor:
    """uint8 (H, W) image -> float32 (C, H, W) tensor, ((x / 255) - mean) / std, channels repeated.

    Explicit single-channel statistics on purpose: albumentations' Normalize on one channel
    silently uses only ImageNet's first channel statistics.
    """

    def __init__(self, mean: float = 0.5, std: float = 0.5, in_channels: int = 1) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels!r}: expected 1 or 3")
        if not std > 0:
            raise ValueError(f"std={std!r}: expected a positive number")
        self.mean, self.std, self.in_channels = float(mean), float(std), in_channels

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        # astype copies: memmap rows are read-only, which torch.from_numpy warns about.
        x = torch.from_numpy(np.asarray(image).astype(np.float32))
        if x.ndim == 3:  # (H, W, 3) RGB: channels first, no repeat
            return x.div_(255.0).sub_(self.mean).div_(self.std).permute(2, 0, 1).contiguous()
        x = x.div_(255.0).sub_(self.mean).div_(self.std).unsqueeze(0)
        # expand is a view; the collate's stack makes the batch contiguous.
        return x.expand(self.in_channels, -1, -1) if self.in_channels > 1 else x


def apply_augmentation(transform: AlbumentationsLike, image: np.ndarray, name: str) -> np.ndarray:
    """Run an albumentations-style transform and check it returned a uint8 (H, W) image."""
    out = transform(image=image)["image"]
    if out.ndim == 3 and out.shape[-1] == 1:
        out = out[..., 0]
    if out.dtype != np.uint8 or out.shape[2:] not in ((), (3,)) or out.ndim not in (2, 3):
        raise ValueError(
            f"{name} returned an image of shape {out.shape} dtype {out.dtype}; expected uint8 "
            "(H, W) or (H, W, 3) - leave normalization (A.Normalize, ToTensorV2) out, the "
            "DataModule does it"
        )
    return out


def seed_augmentation(transform: AlbumentationsLike, seed: int) -> bool:
    """Seed an albumentations pipeline's own generators (2.x draws from them, not from numpy's
    global state); False when the transform has no `set_random_seed` (nothing to seed)."""
    set_seed = getattr(transform, "set_random_seed", None)
    if not callable(set_seed):
        return False
    set_seed(int(seed) % 2**32)
    return True


def transform_fingerprint(transform: AlbumentationsLike | None) -> str:
    """A stable text naming what a transform does: albumentations' own serialization (every
    argument, probabilities included) plus the library versions whose random draws it depends on;
    repr() for anything else. Two pipelines with the same fingerprint augment alike."""
    if transform is None:
        return "identity"
    try:
        import albumentations as A

        spec = json.dumps(A.to_dict(transform), sort_keys=True, default=str)
        return f"albumentations {A.__version__} cv2 {cv2.__version__}: {spec}"
    except Exception:  # not an albumentations pipeline (or not serializable)
        return f"{type(transform).__module__}.{type(transform).__qualname__}: {transform!r}"
