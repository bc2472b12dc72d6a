"""`python -m kd_lightning [+experiment=NAME] [overrides]`: compose the config, run its task."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import get_method  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import MissingMandatoryValue  # noqa: E402

from kd_lightning.artifacts import DiskFullError  # noqa: E402
from kd_lightning.conf_path import config_dir  # noqa: E402

# Lightning notices that are expected here: the frozen teacher is in eval mode by design, and tiny
# test budgets have fewer batches than the logging interval.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

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


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> Any:
    # Lightning adds its own console handler when imported; Hydra's handler already prints (and
    # writes the run's log file), so keep one of them to avoid every line printed twice.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    try:
        result = get_method(cfg.task)(cfg)
    except (*USER_ERRORS, InstantiationException) as err:
        # Hydra wraps errors raised while building objects; the user needs the original one.
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if os.environ.get("KD_DEBUG") or not isinstance(cause, USER_ERRORS):
            raise
        print(error_line(cause), file=sys.stderr)
        sys.exit(2)
    # Sweepers (Optuna) optimize the value main returns.
    objective = cfg.get("objective")
    if isinstance(result, dict) and objective:
        return result.get("best_val", {}).get(objective, result.get("test", {}).get(objective))
    return result


if __name__ == "__main__":
    main()
