"""Running the real CLI in a subprocess, with the shared data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("KD_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KD_DATA_DIR": str(DATA_DIR),
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "WANDB_SILENT": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run_cli(
    args: list[str],
    cwd: Path,
    module: str = "kd_lightning",
    timeout: float = 600,
    check: bool = True,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> args` for real; on failure show its output."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


# Tiny but real budgets for CLI runs on the shared data.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
]
