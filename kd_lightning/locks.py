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

The CLI takes the lock before Hydra writes anything into the directory (`.hydra/`, the job's log
file, `multirun.yaml`): HydraDirectoryLock, a Hydra callback in conf/config.yaml.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

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


def acquire(directory: Path, what: str = "run directory") -> Path:
    """Take (or count up) this process's lock on `directory` (created if missing); release it
    with `release`. Raises DirectoryInUseError, naming the holder's pid, if another process holds
    it. Secondary DDP ranks get the key without locking."""
    key = Path(directory).resolve()
    if _secondary_rank():
        return key
    if key in _held:
        _held[key][1] += 1
        return key
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        setting = "hydra.sweep.dir" if what.startswith("sweep") else "hydra.run.dir"
        raise DirectoryInUseError(
            f"{what} {key} is in use by another kd_lightning process (pid {_holder_pid(path)}, "
            f"lock {path}); wait for it to finish or stop it, or choose another {setting}"
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
    return key


def release(directory: Path) -> None:
    """Count down this process's lock on `directory`; the last release unlocks it. A directory
    this process does not hold (a secondary DDP rank's) is ignored."""
    key = Path(directory).resolve()
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        fd = _held.pop(key)[0]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def directory_lock(directory: Path, what: str = "run directory") -> Iterator[Path]:
    """Hold `directory` (created if missing) for the duration of the block."""
    key = acquire(directory, what)
    try:
        yield key
    finally:
        release(key)


def held_directories() -> list[Path]:
    """The directories this process holds now (for tests and messages)."""
    return sorted(_held)


class HydraDirectoryLock(HydraCallback):
    """Hydra callback (conf/config.yaml `hydra.callbacks.directory_lock`): the same directory lock,
    taken before Hydra writes anything into the directory.

    Hydra 1.3 (hydra/_internal/hydra.py `Hydra.run`) calls `on_run_start` before `run_job`
    (hydra/core/utils.py), which creates the output directory, opens the job's log file
    (`configure_log`) and writes `.hydra/{config,hydra,overrides}.yaml` (`_save_config`), all
    before `on_job_start`. So the lock is taken here, and a refused second process leaves the
    holder's `.hydra/` and log file untouched. It is held until the run ends (or the process
    exits: a flock dies with its holder); run_stage / run_chain take it again re-entrantly. A
    multirun locks its sweep directory in `on_multirun_start`, before the sweeper writes
    `multirun.yaml`; each job's run_stage / run_chain locks the job directory for itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = str(config.get("task", ""))
        _acquire_or_exit(
            _hydra_dir(config, "hydra.run.dir"),
            "study directory" if task.endswith("run_chain") else "run directory",
        )

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(_hydra_dir(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _acquire_or_exit(_hydra_dir(config, "hydra.sweep.dir"), "sweep directory")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(_hydra_dir(config, "hydra.sweep.dir"))


def _hydra_dir(config: DictConfig, key: str) -> Path:
    # As run_job does before it reads the directory: `${hydra:...}` interpolations need it.
    # `${now:...}` is cached by Hydra, so this is the directory run_job will use.
    HydraConfig.instance().set_config(config)
    return Path(str(OmegaConf.select(config, key)))


def _acquire_or_exit(directory: Path, what: str) -> None:
    try:
        acquire(directory, what)
    except DirectoryInUseError as err:
        if os.environ.get("KD_DEBUG"):
            raise
        # Same one line as kd_lightning.__main__.error_line (exit 2, no traceback).
        print("kd_lightning: error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
