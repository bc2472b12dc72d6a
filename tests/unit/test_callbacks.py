"""The `callbacks` config group (conf/callbacks/): composed from the real configs and built entry
by entry by kd_lightning.callbacks.build_callbacks (a real run: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import OmegaConf

from kd_lightning.callbacks import EpochTimer, build_callbacks

PROJECT = Path(__file__).resolve().parents[2]
# The group is wired in by conf/config.yaml's defaults (`- callbacks/default`); until it is, the
# tests that need it say so and skip.


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_group_builds_the_checkpoint_and_the_timer(tmp_path: Path) -> None:
    cfg = _compose("checkpoint.monitor=val/acc")
    assert list(cfg.callbacks) == ["model_checkpoint", "epoch_timer"]
    callbacks, checkpoint, timer = build_callbacks(cfg, tmp_path / "ckpt")
    assert callbacks == [checkpoint, timer] and isinstance(timer, EpochTimer)
    assert isinstance(checkpoint, ModelCheckpoint)
    assert checkpoint.dirpath == str((tmp_path / "ckpt").resolve())
    assert checkpoint.monitor == "val/acc" and checkpoint.mode == "max" and checkpoint.save_last
    assert checkpoint.filename == "best-{epoch:03d}"


def test_optional_callbacks_are_added_and_configured(tmp_path: Path) -> None:
    cfg = _compose(
        "+callbacks=[early_stopping,lr_monitor]",
        "callbacks.early_stopping.patience=3",
        "callbacks.lr_monitor.logging_interval=step",
    )
    callbacks, checkpoint, _ = build_callbacks(cfg, tmp_path)
    stop = next(c for c in callbacks if isinstance(c, EarlyStopping))
    assert stop.monitor == "val/auroc" and stop.patience == 3 and stop.mode == "max"
    monitor = next(c for c in callbacks if isinstance(c, LearningRateMonitor))
    assert monitor.logging_interval == "step"
    assert callbacks[0] is checkpoint and len(callbacks) == 4
    dropped = _compose("+callbacks=early_stopping", "~callbacks.early_stopping")
    assert len(build_callbacks(dropped, tmp_path)[0]) == 2


def test_a_config_without_the_group_gets_the_two_required_callbacks(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"checkpoint": {"monitor": "val/loss", "mode": "min"}})
    callbacks, checkpoint, timer = build_callbacks(cfg, tmp_path)
    assert callbacks == [checkpoint, timer]
    assert checkpoint.monitor == "val/loss" and checkpoint.mode == "min"


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        ({"epoch_timer": {"_target_": "kd_lightning.callbacks.EpochTimer"}}, "model_checkpoint is"),
        (
            {"model_checkpoint": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint"}},
            "timer",
        ),
        ({"x": {"patience": 3}}, r"callbacks.x=.*expected a mapping with _target_"),
        ({"x": {"_target_": "collections.OrderedDict"}}, "built a OrderedDict"),
    ],
)
def test_bad_entries_are_one_line_naming_the_key(
    tmp_path: Path, callbacks: dict, message: str
) -> None:
    cfg = OmegaConf.create({"checkpoint": {"monitor": "val/auroc", "mode": "max"}})
    cfg.callbacks = callbacks
    with pytest.raises(ValueError, match=message):
        build_callbacks(cfg, tmp_path)
