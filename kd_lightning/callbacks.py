"""Trainer callbacks: the project's own (EpochTimer) and `build_callbacks`, which builds the
`callbacks` config group (conf/callbacks/) entry by entry from each `_target_`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
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


class EpochTestEvaluation(Callback):
    """Test AUROC and accuracy after every training epoch, for convergence curves (the paper's
    Figures 3 and 4 claim faster convergence). A per-epoch pass over the test split in eval
    mode, float32, under no_grad; the values go to `<run dir>/epoch_test.json` (rewritten
    atomically each epoch, so a resumed run keeps the epochs before its interruption) and to the
    logger as `epoch_test/auroc`, `epoch_test/acc`. Never read by checkpointing or early
    stopping, which monitor validation only: the test set does not choose the model.

    Accuracy is at the argmax (0.5 for two classes): a per-epoch threshold would need its own
    validation pass. The global RNG state is saved and restored around the pass, so training
    draws the same random numbers with or without this callback.
    """

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from kd_lightning.artifacts import EPOCH_TEST_FILE, read_json

        path = Path(self.run_dir or trainer.default_root_dir) / EPOCH_TEST_FILE
        self.path = path
        self.history = read_json(path, "a list of per-epoch test metrics") if path.is_file() else []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # A resumed run starts at trainer.current_epoch; later rows were from epochs redone now (or
        # from an earlier run into this directory). Not in on_fit_start: Lightning restores the
        # loops' epoch from the checkpoint after on_fit_start, where current_epoch is still 0.
        self.history = [row for row in self.history if row["epoch"] < trainer.current_epoch]

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from kd_lightning.artifacts import write_json_atomic
        from kd_lightning.modules.metrics import StageMetrics
        from kd_lightning.predict import inference_loader

        datamodule = trainer.datamodule
        datamodule.setup("test")
        metrics = StageMetrics("epoch_test", int(datamodule.num_classes))
        was_training = module.training
        module.eval()
        clear = getattr(module, "clear_features", None)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in inference_loader(datamodule.test_dataloader()):
                images, targets = batch[0].to(module.device), batch[1].to(module.device)
                metrics.update(module(images).float().cpu(), targets.cpu())
                if clear is not None:
                    clear()
        module.train(was_training)
        values = metrics.compute()
        row = {
            "epoch": int(trainer.current_epoch),
            "auroc": values["epoch_test/auroc"],
            "acc": values["epoch_test/acc"],
        }
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        if trainer.is_global_zero:
            write_json_atomic(self.path, self.history)
        module.log_dict({"epoch_test/auroc": row["auroc"], "epoch_test/acc": row["acc"]})
