"""The networks an export measures: the run's student and, when there is one, its teacher.

Both come through kd_lightning.models.loading.load_run_network (summary.json's architecture,
model.pt's weights); a teacher given as a Lightning checkpoint goes through the training code's
own kd_lightning.modules.teacher.load_teacher. File names come from kd_lightning.artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kd_lightning.artifacts import MODEL_FILE, SUMMARY_FILE, ArtifactError
from kd_lightning.export.errors import ExportError
from kd_lightning.models.loading import load_run_network


@dataclass
class LoadedModel:
    net: nn.Module
    spec: dict[str, Any]
    file: Path
    source: str


def load_run_model(run_dir: Path) -> tuple[LoadedModel, dict[str, Any]]:
    """The run's student (model.pt, architecture from summary.json) and its summary."""
    if not run_dir.is_dir():
        raise ExportError(
            f"run directory {run_dir} does not exist; expected a finished kd_lightning run "
            f"(with {SUMMARY_FILE} and {MODEL_FILE})"
        )
    try:
        net, summary = load_run_network(run_dir)
    except ArtifactError as err:
        raise ExportError(str(err)) from err
    return LoadedModel(net, dict(summary["model"]), run_dir / MODEL_FILE, str(run_dir)), summary


def load_teacher_model(source: str, base: Path, num_classes: int) -> LoadedModel:
    """A teacher from its run directory / summary.json / model.pt, or a Lightning checkpoint."""
    path = Path(source).expanduser()
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path  # a relative path recorded when the student was trained elsewhere
    if path.is_file() and (path.name == SUMMARY_FILE or (path.parent / SUMMARY_FILE).is_file()):
        path = path.parent  # summary.json or model.pt of a run: the run directory
    if path.is_dir():
        try:
            net, summary = load_run_network(path)
        except ArtifactError as err:
            raise ExportError(f"teacher {err} (or pass a .ckpt file)") from err
        return LoadedModel(net, dict(summary["model"]), path / MODEL_FILE, str(path))
    if path.is_file() and path.suffix == ".ckpt":
        from kd_lightning.modules.teacher import load_teacher

        try:
            net, spec = load_teacher(path, num_classes)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ExportError(
                f"cannot load teacher checkpoint {path} ({type(err).__name__}: {first}); "
                "expected a kd_lightning ClassifierModule/DistillModule .ckpt, or pass the run "
                "directory"
            ) from err
        return LoadedModel(net.eval(), {**spec, "num_classes": num_classes}, path, str(path))
    if path.is_file():
        raise ExportError(
            f"teacher {source} is a weights file without a {SUMMARY_FILE} beside it (no "
            f"architecture); expected a run directory, {SUMMARY_FILE} or .ckpt (use --teacher)"
        )
    raise ExportError(
        f"teacher {source} does not exist; expected a run directory, {SUMMARY_FILE} or .ckpt"
    )
