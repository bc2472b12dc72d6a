"""Shared test helpers: the real shared X-rays, and running the real CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from tests.cli import DATA_DIR

# In-process runs resolve ${data_dir} from the environment, as the CLI does.
os.environ.setdefault("KD_DATA_DIR", str(DATA_DIR))

SHARED_NPZ = DATA_DIR / "pneumoniamnist.npz"

# The image and teacher caches are content-keyed and never pruned: every test teacher would add an
# entry to the user's ~/.cache. Tests (and the CLI runs they start, which inherit this environment)
# get a folder of their own, removed when the session ends.
_TEST_CACHE = tempfile.mkdtemp(prefix="kd_lightning_test_cache_")
os.environ["KD_CACHE_DIR"] = _TEST_CACHE

# Shared across modules on purpose (tests/integration/test_sweeps.py trains it once per session).
_SESSION_WIDE = {"tiny_teacher"}


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _free_module_folders(tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[None]:
    """Remove the folders a module's fixtures made once the module is done, unless one of its tests
    failed. pytest keeps tmp_path_factory folders until the session ends, and these hold real
    checkpoints (about 300 MB per ResNet-18 run): kept, they add up to gigabytes, which filled the
    disk of a CI machine with little free space (tmp_path_retention_policy only frees tmp_path)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed != failed_before:
        return
    for path in set(base.iterdir()) - before:
        if path.name not in _SESSION_WIDE:
            shutil.rmtree(path, ignore_errors=True)


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
