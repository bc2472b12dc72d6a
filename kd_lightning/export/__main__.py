"""`python -m kd_lightning.export RUN_DIR ...`: see kd_lightning.export.cli."""

from __future__ import annotations

import sys

from kd_lightning.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
