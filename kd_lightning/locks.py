"""One process at a time per run or study directory.

`directory_lock(dir)` takes an exclusive `fcntl.flock` on `<dir>/.kd_lightning.lock` (the file
holds the holder's pid, for the message only). A second process asking for the same directory is
refused at once with one line naming the holder's pid. The kernel drops a flock when its holder
dies, SIGKILL included, so a killed run never leaves the directory stuck: the stale pid in the file
is simply overwritten by the next holder. The file itself is never deleted (deleting it while
another process opens it would let two processes lock two different files).

Locks are per directory and re-entrant within a process: a chain holds its study directory while
each step's run_stage holds the step's own directory, and a nested request for a directory this
process already holds only counts up. Secondary DDP ranks (LOCAL_RANK or NODE_RANK not 0, started
by Lightning to run the same command) skip the lock: rank 0 of node 0 holds it for all of them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".kd_lightning.lock"

# resolved directory -> [file descriptor, nesting depth] for the locks this process holds
_held: dict[Path, list[int]] = {}


class DirectoryInUseError(ValueError):
    """Another live process holds the directory; the message is one line naming its pid."""


def _secondary_rank() -> bool:
    return any(os.environ.get(key, "0") not in ("", "0") for key in ("LOCAL_RANK", "NODE_RANK"))


def _holder_pid(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextmanager
def directory_lock(directory: Path, what: str = "run directory") -> Iterator[Path]:
    """Hold `directory` (created if missing) for the duration of the block."""
    key = Path(directory).resolve()
    if _secondary_rank():
        yield key
        return
    if key in _held:
        _held[key][1] += 1
        try:
            yield key
        finally:
            _held[key][1] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUseError(
            f"{what} {key} is in use by another kd_lightning process (pid {_holder_pid(path)}, "
            f"lock {path}); wait for it to finish or stop it, or choose another hydra.run.dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # a full disk: the lock holds anyway, only the pid in the message is missing
    _held[key] = [fd, 1]
    try:
        yield key
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def held_directories() -> list[Path]:
    """The directories this process holds now (for tests and messages)."""
    return sorted(_held)
