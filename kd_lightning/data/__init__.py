"""Data layer: sources (npz, Kermany folders), the resize-once cache and the DataModule.

Exports are loaded lazily: the decode pool's spawned workers import this package, and they must
not pay for importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "XRayDataModule": "kd_lightning.data.datamodule",
    "XRayDataset": "kd_lightning.data.dataset",
    "build_image_cache": "kd_lightning.data.cache",
    "default_cache_dir": "kd_lightning.data.cache",
    "decode_image": "kd_lightning.data.cache",
    "ensure_npz": "kd_lightning.data.npz",
    "load_npz": "kd_lightning.data.npz",
    "scan_kermany": "kd_lightning.data.kermany",
    "carve_val": "kd_lightning.data.kermany",
    "stratified_subset": "kd_lightning.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kd_lightning.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
