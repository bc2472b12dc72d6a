"""Logger factories that Hydra builds with `_target_`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that is offline when no API key is set, so it never waits on the network.

    `offline=None` decides from the environment; WANDB_MODE=offline/disabled also wins.
    """
    mode = os.environ.get("WANDB_MODE", "")
    if mode == "disabled":
        return WandbLogger(mode="disabled", **kwargs)
    if offline is None:
        offline = mode == "offline" or not _has_wandb_key()
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(offline=offline, **kwargs)
