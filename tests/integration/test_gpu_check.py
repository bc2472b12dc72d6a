"""benchmarks/gpu_check.sh on a machine without a GPU: one line saying so, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.cli import ROOT, cli_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run the check")
def test_gpu_check_refuses_without_a_gpu_in_one_line() -> None:
    before = set((ROOT / "benchmarks" / "results").iterdir())
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=cli_env(PY=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"
    ]
    assert set((ROOT / "benchmarks" / "results").iterdir()) == before
