"""What every image source shares: split names, class names and the seeded stratified subset.

The sources themselves: MedMNIST-format npz files (`kd_lightning.data.npz`) and Kermany's
chest_xray folders (`kd_lightning.data.kermany`). Plain numpy only: no torch, Lightning or Hydra
here, so the decode pool's spawned workers (which import the package) start fast.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")

BINARY_CLASSES = ("normal", "pneumonia")
THREE_CLASSES = ("normal", "bacteria", "virus")


def class_names(num_classes: int) -> list[str]:
    """Class names for the binary (normal/pneumonia) or 3-class (normal/bacteria/virus) task."""
    if num_classes == 2:
        return list(BINARY_CLASSES)
    if num_classes == 3:
        return list(THREE_CLASSES)
    raise ValueError(f"num_classes={num_classes!r}: expected 2 (normal/pneumonia) or 3")


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of size n with class proportions kept (largest
    remainder), at least one item per present class when n allows."""
    labels = np.asarray(labels)
    if n <= 0:
        raise ValueError(f"subset size {n!r}: expected a positive integer")
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() < n:
        gaps = np.where(take < counts, exact - take, -np.inf)
        take[int(np.argmax(gaps))] += 1
    while take.sum() > n:
        take[int(np.argmax(take))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))
