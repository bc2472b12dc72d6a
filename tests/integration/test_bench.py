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
