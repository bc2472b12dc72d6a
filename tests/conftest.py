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


@pytest.fixture
def connection_timeouts(monkeypatch) -> list:
    """The timeout each outgoing connection was opened with (http.client looks up
    socket.create_connection per connection). Download tests assert that every attempt is
    bounded instead of timing the attempt with a wall clock."""
    import socket

    seen: list = []
    real = socket.create_connection

    def spy(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, *args, **kwargs):
        default = timeout is socket._GLOBAL_DEFAULT_TIMEOUT
        seen.append(socket.getdefaulttimeout() if default else timeout)
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen
