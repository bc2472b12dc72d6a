"""A student trained against a frozen teacher: CE + sum_i lambda_i * NST_i + beta * KD.

Teacher rules: frozen (requires_grad False), always in eval mode (train() is overridden), never in
the optimizer, never a hyperparameter, run under torch.no_grad(), and left out of checkpoints
unless `keep_teacher_in_checkpoint` (it is reloaded from its own source instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.distill import FeatureHooks, KDLoss, NSTLoss
from kd_lightning.modules.classifier import ClassifierModule, OptimizerFactory, SchedulerFactory
from kd_lightning.modules.teacher import load_teacher


class DistillModule(ClassifierModule):
    """Student + frozen teacher + hooked layer pairs.

    `feature_pairs`: [{"student": "layer4", "teacher": "layer4", "weight": 50.0}, ...]; each pair's
    NST term is logged as `train/nst_<student layer>`; `kd_weight` 0 turns KD off.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        teacher: str,
        num_classes: int = 2,
        teacher_model: Mapping[str, Any] | None = None,
        nst: NSTLoss | None = None,
        feature_pairs: Sequence[Mapping[str, Any]] = (),
        kd: KDLoss | None = None,
        kd_weight: float = 0.0,
        ce_weight: float = 1.0,
        keep_teacher_in_checkpoint: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        class_weights: list[float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(model, num_classes, optimizer, scheduler, class_weights, channels_last)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "nst", "kd"])
        teacher_net, self.teacher_spec = load_teacher(teacher, num_classes, teacher_model)
        self.teacher = teacher_net.requires_grad_(False).eval()
        if channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.teacher_source = str(Path(teacher).resolve())
        self.pairs = [dict(pair) for pair in feature_pairs]
        if self.pairs and nst is None:
            raise ValueError(
                "module.feature_pairs is set but module.nst is null; expected an NSTLoss"
            )
        self.nst = nst
        self.kd = kd if kd is not None else KDLoss()
        self.kd_weight = float(kd_weight)
        self.ce_weight = float(ce_weight)
        self.keep_teacher = keep_teacher_in_checkpoint
        # KD alone needs no hooks; with pairs, an unknown layer name fails here, before training.
        self.hooks = []
        if self.pairs:
            self.student_hooks = FeatureHooks(self.model, [p["student"] for p in self.pairs])
            self.teacher_hooks = FeatureHooks(self.teacher, [p["teacher"] for p in self.pairs])
            self.hooks = [self.student_hooks, self.teacher_hooks]

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def trainable_modules(self) -> nn.Module:
        return self.model

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        with torch.no_grad():
            teacher_logits = self.teacher(self._layout(images))
        logits = self(images)
        terms = {"ce": self.cross_entropy(logits, targets)}
        weighted = [self.ce_weight * terms["ce"]]
        for pair in self.pairs:
            name = f"nst_{pair['student']}"
            terms[name] = self.nst(
                self.student_hooks.features[pair["student"]],
                self.teacher_hooks.features[pair["teacher"]],
            )
            weighted.append(float(pair["weight"]) * terms[name])
        if self.kd_weight:
            terms["kd"] = self.kd(logits, teacher_logits)
            weighted.append(self.kd_weight * terms["kd"])
        self.clear_features()
        loss = torch.stack(weighted).sum()
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def clear_features(self) -> None:
        for hooks in self.hooks:
            hooks.clear()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        # Evaluation runs only the student; its hooks still fire, so drop what they caught.
        self.clear_features()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.clear_features()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.keep_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved without the teacher gets the teacher this module already loaded.
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)
