"""Accuracy / AUROC of exported networks and their CPU latency.

The classification numbers come from kd_lightning.report.statistics, the code behind every
number the runs and the report publish, so an export's accuracy is computed as the report's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kd_lightning.export.onnx import INPUT, OUTPUT
from kd_lightning.report.statistics import auroc, softmax, threshold_metrics

BATCHES = (1, 32)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """acc and auroc of the pneumonia score 1 - p(normal), as the run's statistics: binary acc at
    the fixed 0.5 operating point, argmax accuracy for 3 classes; AUROC NaN without both."""
    probs = softmax(logits)
    labels = np.asarray(labels)
    positive = (labels != 0).astype(np.int64)
    score = 1.0 - probs[:, 0]
    if probs.shape[1] == 2:
        acc = threshold_metrics(positive, score, 0.5)["acc"]
    else:
        acc = float((probs.argmax(axis=1) == labels).mean())
    both = 0 < int(positive.sum()) < len(positive)
    return {"acc": float(acc), "auroc": auroc(positive, score) if both else float("nan")}


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def _batch(x: np.ndarray, size: int) -> np.ndarray:
    # Real test images, repeated if the split is smaller than the batch.
    reps = -(-size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:size])


def latency_torch(net: nn.Module, x: np.ndarray, repeats: int) -> dict[str, float]:
    result = {}
    with torch.inference_mode():
        for size in BATCHES:
            inp = torch.from_numpy(_batch(x, size))
            result[f"batch{size}"] = median_ms(
                lambda inp=inp: net(inp), repeats, max(2, repeats // 5)
            )
    return result


def latency_ort(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> dict[str, float]:
    result = {}
    for size in BATCHES:
        feed = {INPUT: _batch(x, size)}
        result[f"batch{size}"] = median_ms(
            lambda feed=feed: session.run([OUTPUT], feed), repeats, max(2, repeats // 5)
        )
    return result
