import torch
from sklearn.metrics import roc_auc_score

from kd_lightning.modules.metrics import StageMetrics


def _logits_for(p1: torch.Tensor) -> torch.Tensor:
    # Two-class logits whose softmax gives p(class 1) = p1.
    return torch.stack([torch.zeros_like(p1), torch.log(p1 / (1 - p1))], dim=1)


def test_binary_metrics_match_hand_counts() -> None:
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = torch.tensor([0.1, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95])
    metrics = StageMetrics("test", num_classes=2)
    metrics.update(_logits_for(p1), targets)
    values = metrics.compute()
    # predictions at 0.5: [0,1,0,1,1,0,1,1]; TP=4 FN=1 TN=2 FP=1
    assert abs(values["test/acc"] - 6 / 8) < 1e-6
    assert abs(values["test/sensitivity"] - 4 / 5) < 1e-6
    assert abs(values["test/specificity"] - 2 / 3) < 1e-6
    assert abs(values["test/f1"] - 2 * 4 / (2 * 4 + 1 + 1)) < 1e-6
    assert abs(values["test/auroc"] - roc_auc_score(targets, p1)) < 1e-6
    assert metrics.confusion_matrix() == [[2, 1], [1, 4]]


def test_three_class_keeps_pneumonia_vs_normal_sensitivity() -> None:
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    probs = torch.tensor(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.2, 0.6],
            [0.1, 0.1, 0.8],
            [0.7, 0.2, 0.1],
        ]
    )
    metrics = StageMetrics("val", num_classes=3)
    metrics.update(probs.log(), targets)
    values = metrics.compute()
    assert abs(values["val/acc"] - 3 / 6) < 1e-6  # argmax 0,1,1,2,2,0 vs 0,0,1,1,2,2
    # pneumonia = not normal; predicted pneumonia where p(normal) < 0.5: [0,1,1,1,1,0]
    assert abs(values["val/sensitivity"] - 3 / 4) < 1e-6
    assert abs(values["val/specificity"] - 1 / 2) < 1e-6
    assert abs(values["val/auroc"] - roc_auc_score(targets != 0, 1 - probs[:, 0])) < 1e-6
    assert "val/auroc_macro" in values and "val/f1" in values
    assert len(metrics.confusion_matrix()) == 3


def test_reset_forgets_previous_epoch() -> None:
    metrics = StageMetrics("val", num_classes=2)
    metrics.update(_logits_for(torch.tensor([0.9, 0.1])), torch.tensor([0, 1]))
    assert metrics.compute()["val/acc"] == 0.0
    metrics.reset()
    metrics.update(_logits_for(torch.tensor([0.1, 0.9])), torch.tensor([0, 1]))
    assert metrics.compute()["val/acc"] == 1.0
