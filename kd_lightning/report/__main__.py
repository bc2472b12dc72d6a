"""`python -m kd_lightning.report DIR...`: see kd_lightning.report."""

import sys

from kd_lightning.report import main

sys.exit(main())
