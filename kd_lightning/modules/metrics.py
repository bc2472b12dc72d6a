"""Medical classification metrics with torchmetrics, keyed `stage/name`.

Binary mode reports AUROC on the pneumonia probability, as MedMNIST does, so numbers compare with
its benchmark. Three-class mode (normal / bacteria / virus) reports macro multiclass accuracy, AUROC
and F1, and keeps sensitivity and specificity as pneumonia-vs-normal, where they mean what a
clinician expects: recall of any pneumonia, and recall of normal.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)


class StageMetrics(nn.Module):
    """Accumulates one stage's predictions; `compute()` returns `{f"{stage}/{name}": float}`."""

    def __init__(self, stage: str, num_classes: int) -> None:
        super().__init__()
        self.stage = stage
        self.num_classes = num_classes
        self.pneumonia = MetricCollection(
            {
                "auroc": BinaryAUROC(),
                "sensitivity": BinaryRecall(),
                "specificity": BinarySpecificity(),
            }
        )
        if num_classes == 2:
            self.overall = MetricCollection({"acc": BinaryAccuracy(), "f1": BinaryF1Score()})
            self.confusion = BinaryConfusionMatrix()
        else:
            self.overall = MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "auroc_macro": MulticlassAUROC(num_classes),
                    "f1": MulticlassF1Score(num_classes, average="macro"),
                }
            )
            self.confusion = MulticlassConfusionMatrix(num_classes)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        probs = logits.float().softmax(dim=1)
        # Class 0 is normal in both modes, so 1 - p(normal) is the pneumonia score.
        pneumonia_score = 1.0 - probs[:, 0]
        pneumonia_target = (targets != 0).long()
        self.pneumonia.update(pneumonia_score, pneumonia_target)
        if self.num_classes == 2:
            self.overall.update(probs[:, 1], targets)
            self.confusion.update(probs[:, 1], targets)
        else:
            self.overall.update(probs, targets)
            self.confusion.update(probs, targets)

    def compute(self) -> dict[str, float]:
        values = {**self.pneumonia.compute(), **self.overall.compute()}
        return {f"{self.stage}/{name}": float(value) for name, value in values.items()}

    def confusion_matrix(self) -> list[list[int]]:
        return self.confusion.compute().long().tolist()

    def reset(self) -> None:
        self.pneumonia.reset()
        self.overall.reset()
        self.confusion.reset()
