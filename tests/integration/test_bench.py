"""`make bench` runs every benchmark end to end (reduced sizes) and prints its ratio tables."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import ROOT, cli_env

pytestmark = pytest.mark.slow


def test_make_bench_quick_prints_every_table() -> None:
    venv = Path(sys.prefix)
    proc = subprocess.run(
        # -o: the test's interpreter is already installed; never pip-install from a test.
        [
            "make",
            "-o",
            "install",
            "-o",
            f"{venv}/.installed",
            "bench",
            f"VENV={venv}",
            "BENCH_ARGS=--quick",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # One header from each benchmark's tables, and no goal column left empty.
    for header in (
        "cache vs draft decode",  # bench_data
        "naive / auto",  # bench_nst table 1
        "largest tensor MB",  # bench_nst table 2
        "dense / blocked",  # bench_nst table 3
        "module / hand (step)",  # bench_distill throughput
        "without teacher term",  # bench_distill NST share
        "share of student-only step",  # bench_methods: each method's share and peak memory
        "bf16 + channels_last",  # bench_teacher_pass: precision and layout
        "cached / live (study wall)",  # bench_study: a whole study with and without the cache
    ):
        assert header in out, f"missing {header!r} in make bench output:\n{out[-3000:]}"
    # A float32 study trained from the teacher cache must test exactly as with the live teacher.
    assert re.search(r"\| [\d.]+x \| [\d.]+x \| (yes|NO) \| yes \|", out), out[-2000:]


def test_the_distillation_step_bench_runs_under_bf16_autocast() -> None:
    """gpu_check.sh's bf16 path (module under Trainer(precision="bf16-mixed") vs the hand loop
    under bf16 autocast), here on the CPU at a tiny size."""
    args = ["--quick", "--precision", "bf16-mixed", "--size", "32", "--steps", "2"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_distill.py"),
            *args,
            "--skip",
            "layer1",
            "memory",
        ],
        cwd=ROOT,
        env=cli_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bf16-mixed" in proc.stdout.splitlines()[0]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet50 -> resnet18")]
    assert len(rows) == 4, proc.stdout  # two throughput rows, two NST-share rows
