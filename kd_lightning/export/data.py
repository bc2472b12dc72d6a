"""The images an export is measured on: the whole test split and un-augmented training images
for int8 calibration, from the DataModule the run itself was built with.

A run writes run_config.yaml (kd_lightning.artifacts.RUN_CONFIG_FILE, also for chain steps): its
`data` section is instantiated with Hydra, as run.py does, with only what an export needs
changed (EXPORT_DATA_OVERRIDES). Runs written before that file existed fall back to
`data_settings` (summary.json's data entry and the saved .hydra/config.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import RUN_CONFIG_FILE, SUMMARY_FILE
from kd_lightning.export.errors import ExportError

DATAMODULE = "kd_lightning.data.datamodule.XRayDataModule"
# The whole test split (a run's eval_subset is ignored), the whole training split to draw the
# calibration images from, no augmentation, no download, no worker processes.
EXPORT_DATA_OVERRIDES: dict[str, Any] = {
    "batch_size": 256,
    "num_workers": 0,
    "download": False,
    "train_transform": None,
    "train_subset": None,
    "eval_subset": None,
    "return_index": False,
}
# The settings the report records (and the legacy fallback passes to the DataModule).
REPORTED = (
    "path",
    "image_size",
    "num_classes",
    "in_channels",
    "mean",
    "std",
    "clahe",
    "split_seed",
    "val_fraction",
    "cache_dir",
)


@dataclass
class Images:
    test_x: np.ndarray
    test_y: np.ndarray
    calib_x: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSource:
    """A DataModule config (with `_target_`) and the settings the report shows."""

    config: DictConfig
    settings: dict[str, Any]


def run_config_data(run_dir: Path) -> DataSource | None:
    """The `data` section of the run's run_config.yaml, resolved; None for older runs (or a
    section that cannot be resolved outside Hydra)."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
        data = cfg.get("data") if isinstance(cfg, DictConfig) else None
        if data is None or "_target_" not in data:
            return None
        data = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
    except Exception:
        return None
    found = [k for k in REPORTED if k in data]
    settings = {k: data[k] for k in found}
    settings["sources"] = {str(path): sorted(found)}
    return DataSource(data, settings)


def _select(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # an interpolation that needs Hydra's runtime: treat as not given
        return None


def data_settings(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Legacy runs (no run_config.yaml): XRayDataModule arguments from summary.json's data entry
    (resolved at training time) first, the rest (normalization, CLAHE, split seed) from the
    saved Hydra config.

    A chain step's directory has no .hydra/ of its own: the chain's (one or two levels up) is
    used; a chain's step overrides rarely touch data, and path and image size come from the
    step's own summary.json anyway.
    """
    settings: dict[str, Any] = {
        "mean": 0.5,
        "std": 0.5,
        "clahe": False,
        "split_seed": 0,
        "val_fraction": 0.1,
        "cache_dir": None,
        "in_channels": int(summary.get("model", {}).get("in_channels", 1)),
    }
    sources = {"defaults": sorted(settings)}
    # The run's own, else its chain's: chain/<step> (one seed) or chain/seed<k>/<step>.
    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):
        config = folder / ".hydra" / "config.yaml"
        if not config.is_file():
            continue
        cfg = OmegaConf.load(config)
        found = {}
        for key in ("path", "image_size", "num_classes", *settings):
            value = _select(cfg, f"data.{key}")
            if value is not None:
                found[key] = value
        settings.update(found)
        sources = {str(config): sorted(found)}
        break
    data = summary.get("data") or {}
    for key in ("path", "image_size", "num_classes"):
        if key in data:
            settings[key] = data[key]
    for key in ("mean", "std", "in_channels", "clahe"):  # newer summaries may record these
        if key in data:
            settings[key] = data[key]
    if "path" not in settings or "image_size" not in settings:
        raise ExportError(
            f"{run_dir}: neither {SUMMARY_FILE}'s data entry nor .hydra/config.yaml names "
            "data.path and data.image_size; expected a run written by python -m kd_lightning"
        )
    settings.setdefault("num_classes", int(summary.get("model", {}).get("num_classes", 2)))
    settings["sources"] = sources
    return settings


def run_data_source(run_dir: Path, summary: dict[str, Any]) -> DataSource:
    """run_config.yaml's data section, else the legacy settings as an XRayDataModule config."""
    source = run_config_data(run_dir)
    if source is not None:
        return source
    settings = data_settings(run_dir, summary)
    config = {"_target_": DATAMODULE, **{k: settings[k] for k in REPORTED if k in settings}}
    return DataSource(OmegaConf.create(config), settings)


def load_images(source: DataSource, calib_images: int, seed: int = 0) -> Images:
    """The whole test split and `calib_images` un-augmented training images, as float32 arrays."""
    path = Path(str(source.config.path)).expanduser()
    if not path.exists():
        raise ExportError(
            f"data.path={path} (from the run's settings) does not exist; expected the data the "
            "run was trained on (set KD_DATA_DIR or move the file back)"
        )
    dm = instantiate(source.config, **{**EXPORT_DATA_OVERRIDES, "path": str(path)})
    dm.prepare_data()
    dm.setup("test")
    xs, ys = [], []
    for x, y in dm.test_dataloader():
        xs.append(x.numpy())
        ys.append(y.numpy())
    train = dm.datasets["train"]  # train_transform=None: no augmentation
    rng = np.random.default_rng(seed)
    take = rng.choice(len(train), size=min(calib_images, len(train)), replace=False)
    calib = np.stack([train[int(i)][0].numpy() for i in np.sort(take)])
    return Images(np.concatenate(xs), np.concatenate(ys), calib.astype(np.float32), source.settings)
