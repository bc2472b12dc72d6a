"""Per-image predictions of a trained network on validation and test: the source of every
statistic the project reports (kd_lightning.report.statistics reads them back, torch-free).

Computed in float32 with the network in eval mode and a plain (non-distributed) loader over the
whole split, so the file is the same under DDP, whatever the number of processes; a bf16-mixed
run's test metrics in summary.json come from autocast and may differ in the last digits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.artifacts import PREDICTION_SPLITS, write_predictions

# Inference keeps no activations for backward, so a batch larger than training's costs less per
# image: at data.batch_size=4 a one-batch run spent 57 of its 66 s here, batch by batch. In eval
# mode an image's logits do not depend on its batch (up to float rounding).
PREDICT_BATCH = 256


def inference_loader(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """`loader`'s dataset in the same order, in batches of at least PREDICT_BATCH."""
    if loader.batch_size is None or loader.batch_size >= PREDICT_BATCH:
        return loader
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=PREDICT_BATCH,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


@torch.no_grad()
def split_logits(
    forward: nn.Module, loader: torch.utils.data.DataLoader, after_batch: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K) float32, labels (N,)) of `forward` over `loader`, in loader order."""
    logits, labels = [], []
    device = next(forward.parameters()).device
    for batch in loader:
        images, targets = batch[0], batch[1]  # loaders may also yield sample indices
        logits.append(forward(images.to(device)).float().cpu())
        labels.append(targets.cpu())
        if after_batch is not None:
            after_batch()
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def write_run_predictions(module: nn.Module, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """Write predictions/val.csv and predictions/test.csv for `module` (its current weights:
    the best checkpoint's after trainer.test). Returns {split: (labels, logits)}."""
    was_training = module.training
    module.eval()
    # A distillation module's hooks capture the student's maps during any forward.
    clear = getattr(module, "clear_features", None)
    out: dict[str, Any] = {}
    try:
        for split in PREDICTION_SPLITS:
            loader = inference_loader(getattr(datamodule, f"{split}_dataloader")())
            logits, labels = split_logits(module, loader, clear)
            write_predictions(
                out_dir,
                split,
                datamodule.sample_index[split],
                labels,
                logits,
                datamodule.sample_files.get(split),
            )
            # Statistics in float64 from the float32 logits, as when read back from the file.
            out[split] = (labels, logits.astype(np.float64))
    finally:
        module.train(was_training)
    return out
