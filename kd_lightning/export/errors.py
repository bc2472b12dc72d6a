"""What every part of the export shares: the program name and the user-facing error."""

from __future__ import annotations

PROG = "kd_lightning.export"


class ExportError(Exception):
    """A problem the user fixes (wrong directory, missing file): one line, exit code 2."""
