"""Shared test helpers: the real shared X-rays, and running the real CLI in a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from tests.cli import DATA_DIR

# In-process runs resolve ${data_dir} from the environment, as the CLI does.
os.environ.setdefault("KD_DATA_DIR", str(DATA_DIR))

SHARED_NPZ = DATA_DIR / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def shared_npz() -> Path:
    if not SHARED_NPZ.is_file():
        pytest.fail(f"real data missing: {SHARED_NPZ} (set KD_DATA_DIR to the folder holding it)")
    return SHARED_NPZ
