"""Trainer callbacks: the project's own (EpochTimer) and `build_callbacks`, which builds the
`callbacks` config group (conf/callbacks/) entry by entry from each `_target_`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

CHECKPOINT_KEY = "model_checkpoint"
TIMER_KEY = "epoch_timer"


class EpochTimer(Callback):
    """Wall seconds of each training epoch, for the seconds-per-epoch figure in summary.json."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _default_entries(cfg: DictConfig) -> dict[str, Any]:
    """conf/callbacks/default.yaml's two entries, for a config composed without the group."""
    return {
        CHECKPOINT_KEY: {
            "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
            "filename": "best-{epoch:03d}",
            "monitor": cfg.checkpoint.monitor,
            "mode": cfg.checkpoint.mode,
            "save_last": True,
        },
        TIMER_KEY: {"_target_": f"{__name__}.EpochTimer"},
    }


def build_callbacks(
    cfg: DictConfig, ckpt_dir: Path
) -> tuple[list[Callback], ModelCheckpoint, EpochTimer]:
    """(every callback, the best-checkpoint callback, the epoch timer) from `cfg.callbacks`.

    Each entry is {_target_: ..., settings}; a null entry is left out. `model_checkpoint` gets
    `dirpath=ckpt_dir` and must be a ModelCheckpoint, `epoch_timer` an EpochTimer: run.py tests
    the best checkpoint and reports seconds per epoch. A config without a `callbacks` section
    gets those two (default.yaml's entries).
    """
    entries = cfg.get("callbacks")
    if entries is None:
        entries = OmegaConf.create(_default_entries(cfg))
    if not isinstance(entries, Mapping):
        raise ValueError(
            f"callbacks={entries!r}: expected a mapping name -> {{_target_: ..., settings}} "
            "(the conf/callbacks group)"
        )
    built: dict[str, Callback] = {}
    for key, entry in entries.items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ValueError(
                f"callbacks.{key}={entry!r}: expected a mapping with _target_ (a Lightning "
                "Callback class), e.g. lightning.pytorch.callbacks.EarlyStopping"
            )
        extra = {"dirpath": str(ckpt_dir)} if key == CHECKPOINT_KEY else {}
        callback = instantiate(entry, **extra)
        if not isinstance(callback, Callback):
            raise ValueError(
                f"callbacks.{key}: {entry['_target_']} built a {type(callback).__name__}; "
                "expected a lightning.pytorch Callback"
            )
        built[str(key)] = callback
    checkpoint = _required(built, CHECKPOINT_KEY, ModelCheckpoint, "tests the best checkpoint")
    timer = _required(built, TIMER_KEY, EpochTimer, "reports seconds per epoch")
    return list(built.values()), checkpoint, timer


def _required(built: dict[str, Callback], key: str, kind: type, why: str) -> Any:
    callback = built.get(key)
    if not isinstance(callback, kind):
        got = "missing" if callback is None else type(callback).__name__
        raise ValueError(
            f"callbacks.{key} is {got}; expected a {kind.__module__}.{kind.__name__} (run.py "
            f"{why}; conf/callbacks/{key}.yaml)"
        )
    return callback
