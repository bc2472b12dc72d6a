"""Training-time safeguards: atomic checkpoint writes, a stop on a non-finite loss, and the
random states a resumed run needs to continue exactly where it stopped."""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kd_lightning.artifacts import (
    write_bytes_atomic,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every other run file (artifacts.write_bytes_atomic): a temporary
    file, fsync, rename. A full disk raises one DiskFullError naming the checkpoint and leaves
    the previous last.ckpt / best-*.ckpt whole, so the rerun resumes from it."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(Path(path), buffer.getvalue())


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the message names the step and the term."""


class FiniteLossGuard(Callback):
    """Stop at the first training batch whose loss is NaN or infinite, before its backward pass
    and optimizer step, naming the global step and the logged terms (train/<term>) that are not
    finite. Raising here writes no checkpoint of the bad step: last.ckpt stays the last good
    epoch and the weights in memory are never updated from a non-finite gradient."""

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = Path(last_checkpoint)
        self._batch = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self._batch = idx

    def on_before_backward(
        self, trainer: L.Trainer, module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        bad = sorted({k for k, v in _logged_train_values(trainer) if not math.isfinite(v)})
        terms = [k for k in bad if k not in ("train/loss", "train/loss_step", "train/loss_epoch")]
        kept = (
            f"last good checkpoint {self.last_checkpoint} is kept"
            if self.last_checkpoint.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"training loss became {float(loss.detach().float())} at global step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch}); "
            f"non-finite term(s): {', '.join(terms) or 'train/loss'}; {kept}; lower optimizer.lr "
            "or that term's weight and rerun with resume=false (or another hydra.run.dir)"
        )


def _logged_train_values(trainer: L.Trainer) -> Iterator[tuple[str, float]]:
    """(name, value) of what training_step logged so far this epoch: the step values, and the
    running epoch accumulations (a non-finite batch term makes its running sum non-finite)."""
    for key, value in trainer.callback_metrics.items():
        if key.startswith("train/"):
            yield key, float(value)
    results = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    results = getattr(results, "_results", None)
    for key, metric in (results or {}).items():
        name = str(key).split(".", 1)[-1]
        value = getattr(metric, "value", None)
        if name.startswith("train/") and isinstance(value, torch.Tensor) and value.numel() == 1:
            yield name, float(value)


class ResumeRngState(Callback):
    """Saves the random-number state with every checkpoint and restores it when a resumed run
    starts its next epoch, so that what draws from the global generators after a resume (torch,
    numpy, Python: e.g. a sampler without its own seed, CRD's negatives) draws as in an
    uninterrupted run. With data.deterministic_stream (the default) the training order and each
    image's augmentation are already pure functions of (seed, epoch, item); without it, the
    training transform's albumentations generators are restored too (exact with
    data.num_workers=0: persistent workers are new processes after a resume)."""

    def __init__(self) -> None:
        self._dataset: Any = None
        self._pending: dict[str, Any] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        self._dataset = getattr(loader, "dataset", None)
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        random.setstate(state["python"])
        stream = getattr(self._dataset, "stream_seed", None) is not None
        if (
            state.get("transform") is not None
            and not stream
            and hasattr(self._dataset, "_seed_transform")
        ):
            self._dataset._seed_transform()  # seed once in this process, then overwrite the state
            for generators, (numpy_state, python_state) in zip(
                _transform_generators(self._dataset), state["transform"], strict=False
            ):
                generators.random_generator.bit_generator.state = numpy_state
                generators.py_random.setstate(python_state)

    def state_dict(self) -> dict[str, Any]:
        seeded = getattr(self._dataset, "_seeded_pid", None) == os.getpid()
        return {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
            "transform": [
                (t.random_generator.bit_generator.state, t.py_random.getstate())
                for t in _transform_generators(self._dataset)
            ]
            if seeded
            else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)


def _numpy_state() -> tuple[Any, ...]:
    # Plain Python values: checkpoints are read back with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached))


def _transform_generators(dataset: Any) -> list[Any]:
    """The training transform and its sub-transforms that carry their own generators."""
    found: list[Any] = []

    def walk(transform: Any) -> None:
        if hasattr(transform, "random_generator") and hasattr(transform, "py_random"):
            found.append(transform)
        for child in getattr(transform, "transforms", None) or []:
            walk(child)

    walk(getattr(dataset, "transform", None))
    return found
