"""Predictions run in batches larger than training's, with the rows of batch-by-batch inference."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.models.networks import build_model
from kd_lightning.predict import PREDICT_BATCH, inference_loader, split_logits


def test_inference_loader_keeps_order_and_logits_of_the_small_batch_loader() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(300, 1, 32, 32, generator=g)
    labels = torch.arange(300) % 2
    small = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=False)
    big = inference_loader(small)
    assert big.batch_size == PREDICT_BATCH and len(big) == 2  # 256 + 44
    torch.manual_seed(0)
    net = build_model({"arch": "resnet18", "stem": "imagenet", "in_channels": 1}, 2, untrained=True)
    net.eval()
    logits_small, labels_small = split_logits(net, small)
    logits_big, labels_big = split_logits(net, big)
    assert (labels_small == labels_big).all() and (labels_big == labels.numpy()).all()
    assert logits_big.shape == (300, 2)
    assert abs(logits_big - logits_small).max() < 1e-4 * (1 + abs(logits_small).max())


def test_a_loader_already_at_or_above_the_inference_batch_is_used_as_is() -> None:
    data = TensorDataset(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    loader = DataLoader(data, batch_size=PREDICT_BATCH)
    assert inference_loader(loader) is loader
