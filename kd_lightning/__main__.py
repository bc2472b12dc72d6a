"""`python -m kd_lightning [+experiment=NAME] [overrides]`: compose the config, run its task."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import get_method  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import MissingMandatoryValue  # noqa: E402

from kd_lightning.artifacts import DISK_FULL_ERRNOS, DiskFullError  # noqa: E402
from kd_lightning.conf_path import config_dir  # noqa: E402
from kd_lightning.console import quiet_lightning, quiet_warnings  # noqa: E402

# Expected Lightning warnings (the frozen teacher in eval mode, tiny budgets): console.py
quiet_warnings()

# Errors a user can fix from the command line: shown as one line, without a traceback. ValueError
# covers bad settings, unreadable run files (artifacts.ArtifactError), a directory another process
# holds (locks.DirectoryInUseError) and a loss that became NaN (run.NonFiniteLossError);
# DiskFullError is a write that found no space (ENOSPC/EDQUOT).
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, MissingMandatoryValue, DiskFullError)


def error_line(err: BaseException) -> str:
    """The one line printed for a user error."""
    if isinstance(err, DiskFullError):
        message: object = err.strerror
    elif isinstance(err, KeyError) and err.args:
        message = err.args[0]
    else:
        message = err
    return "kd_lightning: error: " + " ".join(str(message).split())


def disk_full_cause(err: BaseException) -> OSError | None:
    """The write that found no space (ENOSPC/EDQUOT) among `err` and what it was raised from or
    while handling (a logger's teardown write often fails again): a DiskFullError if any, else
    the earliest such OSError; None if the disk was not full."""
    found, seen = None, set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return current  # a run file's write: its own line (file, what was kept)
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            found = current
        current = current.__cause__ or current.__context__
    return found


def written_file(err: OSError) -> str | None:
    """The file a failed write was writing: the error's filename, else the file object nearest
    to where it was raised (a plain `open(...).write` or fsspec's file in Lightning's loggers)."""
    if err.filename:
        return os.fsdecode(err.filename)
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if not isinstance(value, io.IOBase):
                continue
            for attr in ("path", "name"):
                try:
                    name = getattr(value, attr, None)
                except Exception:
                    continue
                if isinstance(name, (str, bytes)):
                    return os.fsdecode(name)
    return None


def disk_full_line(err: OSError) -> str:
    """One line for a full disk met by any write (Lightning's CSV logger, Hydra's log file...);
    writes of run files and checkpoints raise DiskFullError, with its own line, instead."""
    if isinstance(err, DiskFullError):
        return error_line(err)
    reason = err.strerror or os.strerror(err.errno or 0)
    return (
        f"kd_lightning: error: {reason} writing {written_file(err) or 'a file'}; "
        "free some space and rerun the same command"
    )


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> Any:
    quiet_lightning()  # each log line once, without Lightning's per-run notices
    try:
        result = get_method(cfg.task)(cfg)
    except Exception as err:
        # Hydra wraps errors raised while building objects; the user needs the original one.
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        full = disk_full_cause(err)  # a full disk under any write, first of all
        if os.environ.get("KD_DEBUG") or (full is None and not isinstance(cause, USER_ERRORS)):
            raise
        print(disk_full_line(full) if full is not None else error_line(cause), file=sys.stderr)
        sys.exit(2)
    # Sweepers (Optuna) optimize the value main returns.
    objective = cfg.get("objective")
    if isinstance(result, dict) and objective:
        return result.get("best_val", {}).get(objective, result.get("test", {}).get(objective))
    return result


if __name__ == "__main__":
    main()
