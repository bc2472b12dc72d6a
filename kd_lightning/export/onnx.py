"""fp32 ONNX export of a network, checked by onnx, and onnxruntime sessions to run it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT, OUTPUT = "images", "logits"
OPSET = 17


def export_onnx(net: nn.Module, sample: np.ndarray, path: Path) -> None:
    """fp32 ONNX with a dynamic batch axis (legacy TorchScript exporter: the dynamo exporter needs
    onnxscript, which is not a dependency). Eval mode folds BatchNorm into the convolutions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.from_numpy(sample[:1]),),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 128) -> np.ndarray:
    out = [session.run([OUTPUT], {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out)


def torch_logits(net: nn.Module, x: np.ndarray, batch: int = 128) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(net(torch.from_numpy(x[i : i + batch])).float().numpy())
    return np.concatenate(out)


def check_onnx(torch_out: np.ndarray, onnx_out: np.ndarray, atol: float) -> dict[str, object]:
    """Max abs difference of the logits of torch and onnxruntime on the same images."""
    max_diff = float(np.abs(torch_out - onnx_out).max())
    return {"max_abs_diff": max_diff, "atol": atol, "passed": max_diff < atol}
