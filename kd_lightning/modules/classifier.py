"""Plain classification (the teacher, TAs trained from scratch, and the paper's Base student)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.networks import build_model
from kd_lightning.modules.metrics import StageMetrics

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class ClassifierModule(L.LightningModule):
    """A ResNet trained with cross-entropy; validation and test report `stage/metric` keys.

    The network is built from `model` (a plain dict: arch, in_channels, stem, pretrained,
    weights_path), which is saved as a hyperparameter so that any checkpoint rebuilds its own
    architecture, e.g. when it becomes the teacher of the next step of a chain.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        num_classes: int = 2,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        class_weights: list[float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # Subclasses' loss objects are rebuilt from config, never pickled into hparams.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "nst", "kd"])
        self.model = build_model(model, num_classes)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_metrics = StageMetrics("val", num_classes)
        self.test_metrics = StageMetrics("test", num_classes)
        self.test_confusion: list[list[int]] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted CE over the labelled images of the batch; images whose label is hidden
        (target -100, data.labeled_fraction < 1) are skipped. A batch with no labelled image
        gives 0 (not the 0/0 NaN of F.cross_entropy), connected to the graph."""
        labelled = targets != -100
        if not bool(labelled.any()):
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), targets, weight=self.class_weights)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        loss = self.cross_entropy(self(images), targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: StageMetrics) -> None:
        images, targets = batch
        logits = self(images)
        loss = self.cross_entropy(logits, targets)
        self.log(f"{metrics.stage}/loss", loss, on_epoch=True, sync_dist=True)
        metrics.update(logits, targets)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_confusion = self.test_metrics.confusion_matrix()
        self.test_metrics.reset()

    def deployable_state_dict(self) -> dict[str, torch.Tensor]:
        """The network's weights as a plain torchvision ResNet state dict (what model.pt holds)."""
        return self.model.state_dict()

    def write_artifacts(self, out_dir: Path) -> dict[str, Any]:
        """Extra files a module writes beside model.pt; returns entries for summary.json."""
        return {}

    def trainable_modules(self) -> nn.Module:
        """What the optimizer updates; a distillation module narrows this to the student."""
        return self.model

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one of every trainable parameter. A subclass that
        trains some parameters differently (own rate, no weight decay) splits them here."""
        return [{"params": [p for p in self.trainable_modules().parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        optimizer = (self.optimizer_factory or torch.optim.Adam)(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
