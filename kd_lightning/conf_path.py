"""Where the Hydra configs live: `conf/` beside the package in a checkout, `kd_lightning/conf`
once installed (pyproject maps the top-level conf/ into the package)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Hydra configs found in {_PACKAGE / 'conf'} or {_PACKAGE.parent / 'conf'}; "
        "reinstall kd_lightning (pip install .) or run from a checkout"
    )
