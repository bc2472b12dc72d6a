"""`python -m kd_lightning [+experiment=NAME] [overrides]`: compose the config, run its task."""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from hydra.utils import get_method  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from kd_lightning.conf_path import config_dir  # noqa: E402

# Errors a user can fix from the command line: shown as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> Any:
    try:
        result = get_method(cfg.task)(cfg)
    except USER_ERRORS as err:
        if os.environ.get("KD_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"kd_lightning: error: {message}", file=sys.stderr)
        sys.exit(2)
    # Sweepers (Optuna) optimize the value main returns.
    objective = cfg.get("objective")
    if isinstance(result, dict) and objective:
        return result.get("best_val", {}).get(objective, result.get("test", {}).get(objective))
    return result


if __name__ == "__main__":
    main()
