"""What `python -m kd_lightning` prints: each log line once, without Lightning's per-run notices
that say nothing to this user, and a full disk under any log file as one error line.

Kept: Lightning's progress bar, real warnings and every other log line (through Hydra's root
handler: the console and the run's log file), and the `[kd_lightning]` lines.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from kd_lightning.artifacts import DISK_FULL_ERRNOS

# Lightning's per-Trainer notices, printed again for every step of a study: the accelerators it
# looked for (the trainer config already says which one is used) and an advertisement.
QUIET_NOTICES = ("GPU available:", "TPU available:", "HPU available:", "litlogger")
LIGHTNING_NOTICE_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


def quiet_warnings() -> None:
    """Lightning warnings that are expected here (applied at import of the CLI)."""
    # Distillation freezes the teacher in eval mode on purpose, so Lightning's "Found N module(s)
    # in eval mode at the start of training" is always true for a distilled student.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # Tiny test budgets have fewer batches than the logging interval.
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in QUIET_NOTICES)


def quiet_lightning() -> None:
    """Call once Hydra has configured logging (inside the task function): every line once,
    without the notices in QUIET_NOTICES. Idempotent (multirun jobs call it again)."""
    import lightning.pytorch  # noqa: F401  (it adds its own stderr handlers when imported)

    # Lightning prints through its own handlers on "lightning", "lightning.pytorch" and
    # "lightning.fabric" and propagates to the root logger, where Hydra's handler prints the same
    # line again with a timestamp (and writes the run's log file): keep Hydra's only.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in LIGHTNING_NOTICE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())
    raise_disk_full_from_log_files()


def raise_disk_full_from_log_files() -> None:
    """A log file handler (Hydra's `<job>.log`) that hits a full disk raises the error (naming
    its file) to the code that logged, which ends the run as one line; logging's default would
    print a "--- Logging error ---" traceback for every later line and go on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and not getattr(handler, "_kd_raises", False):
            handler.handleError = _raising_handle_error(handler)  # type: ignore[method-assign]
            handler._kd_raises = True  # type: ignore[attr-defined]


def _raising_handle_error(handler: logging.FileHandler) -> Any:
    original = handler.handleError

    def handle_error(record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            raise OSError(err.errno, err.strerror, handler.baseFilename) from err
        original(record)

    return handle_error
