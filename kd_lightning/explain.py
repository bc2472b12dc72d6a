"""Where teacher and student look, and what NST transferred, on real test X-rays.

    python -m kd_lightning.explain RUN_DIR [--teacher RUN_DIR] [--images N] [--out FILE]
                                   [--split test]

One row per image (half the student's most confident correct cases, half its most confident
wrong ones, from predictions/<split>.csv at threshold 0.5 on 1 - p(normal)): the X-ray, Grad-CAM
(pytorch-grad-cam) of the teacher and the student for that pneumonia score, and for every NST
feature pair the top-firing channel's normalised map of each network with the per-image MMD^2
that the run's own NSTLoss settings give (kd_lightning.distill.nst_mmd2). Writes FILE (default
RUN_DIR/explain.png) and the same numbers as a CSV beside it (explain.csv for explain.png).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd_lightning.artifacts import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    PREDICTION_SPLITS,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    ArtifactError,
    predictions_path,
    read_predictions,
    read_summary,
    write_bytes_atomic,
)
from kd_lightning.distill import FeatureHooks, nst_mmd2
from kd_lightning.distill.nst import _match_spatial, _unit_channels
from kd_lightning.models.loading import load_run_network

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before instantiate imports the data

PROG = "kd_lightning.explain"
CELL_INCHES, DPI = 2.0, 100  # each grid cell is 200 x 200 px, so the PNG's size is predictable
ONLY_STUDENT = "Grad-CAM of the student only, no teacher or NST columns"
NO_PAIRS = "Grad-CAM of teacher and student, no NST columns"


class ExplainError(Exception):
    """Bad input the user fixes: one line on stderr, exit code 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise ExplainError(message)


class PneumoniaScore:
    """Grad-CAM target: 1 - p(normal), the score the predictions and the threshold are on."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.softmax(output, dim=-1)[..., 0]


def load_run(path: Path, what: str) -> tuple[nn.Module, dict[str, Any]]:
    """A finished run's network; a missing directory is said as such, not as missing files."""
    if not path.is_dir():
        raise ExplainError(
            f"{what} {path} does not exist; expected a finished kd_lightning run directory "
            f"({SUMMARY_FILE} and {MODEL_FILE})"
        )
    return load_run_network(path)


def teacher_dir(source: str) -> Path:
    """summary.json's teacher may name the run's summary.json, model.pt or a checkpoint in it."""
    path = Path(source).expanduser()
    if path.is_file() and path.name in (SUMMARY_FILE, MODEL_FILE):
        return path.parent
    if path.is_file() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    return path


def check_teacher(teacher: dict[str, Any], student: dict[str, Any], where: Path) -> None:
    """A teacher that cannot see the same images or score the same classes explains nothing."""
    for key, name, default in (("num_classes", "classes", 2), ("in_channels", "channels", 1)):
        t, s = (int(run["model"].get(key, default)) for run in (teacher, student))
        if t != s:
            raise ExplainError(f"teacher {where} has {t} {name}; the student has {s}")


def choose(predictions: Any, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows of the most confident correct and most confident wrong cases (|score - 0.5|, ties by
    row), wrong ones up to n // 2; a shortfall on either side is filled from the other."""
    score = predictions.positive_score
    correct = (score >= 0.5) == (predictions.label != 0)
    order = np.argsort(-np.abs(score - 0.5), kind="stable")
    right, wrong = order[correct[order]], order[~correct[order]]
    n_wrong = min(n // 2, len(wrong))
    n_wrong = max(n_wrong, n - len(right))
    note = ""
    if n_wrong < n // 2:
        note = f"; only {len(wrong)} wrong case(s) in the split, filled with correct ones"
    elif n_wrong > n // 2:
        note = f"; only {len(right)} correct case(s) in the split, filled with wrong ones"
    rows = np.concatenate([right[: n - n_wrong], wrong[:n_wrong]])
    return rows, correct[rows], note


def split_images(cfg: Any, split: str, predictions: Any, files: tuple[Path, Path]) -> Any:
    """The run's split rebuilt from its own data settings (eval transform), checked row by row
    against the predictions so every picture shows the image its probability belongs to."""
    try:
        dm = instantiate(cfg.data, download=False, num_workers=0)
        dm.prepare_data()
        dm.setup("test")
    except InstantiationException as err:
        raise ExplainError(f"{files[0]}: cannot build its data ({err.__cause__ or err})") from err
    labels, index = dm.datasets[split].labels, dm.sample_index[split]
    same = len(labels) == len(predictions.label)
    if not (same and (labels == predictions.label).all() and (index == predictions.index).all()):
        raise ExplainError(
            f"the {split} split rebuilt from {files[0]} ({len(labels)} images) does not match "
            f"the labels/rows of {files[1]} ({len(predictions.label)} rows); expected the same"
        )
    return dm


def grad_cam(net: nn.Module, images: torch.Tensor, pairs: Sequence[dict], side: str) -> tuple:
    """(Grad-CAM maps (B, S, S) of the pneumonia score at layer4's last block, or the last
    pair's layer, and that layer's spatial size: at 1 x 1 every map is flat)."""
    from pytorch_grad_cam import GradCAM

    if hasattr(net, "layer4"):
        layer = net.layer4[-1]
    elif pairs:
        layer = net.get_submodule(pairs[-1][side])
    else:
        raise ExplainError(f"{type(net).__name__} has no layer4 and the run no feature pairs")
    net.requires_grad_(True)
    with GradCAM(model=net, target_layers=[layer]) as cam:
        maps = cam(images, targets=[PneumoniaScore()] * len(images))
        return maps, tuple(cam.activations_and_grads.activations[0].shape[-2:])


def forward_features(net: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> tuple:
    """(pneumonia score (B,), {layer: map}) of one no-grad forward with the project's hooks."""
    hooks = FeatureHooks(net, layers) if layers else contextlib.nullcontext()
    with hooks, torch.no_grad():
        logits = net(images)
        feats = dict(hooks.features) if layers else {}
    return (1.0 - torch.softmax(logits, dim=1)[:, 0]).numpy(), feats


def nst_columns(f_s: torch.Tensor, f_t: torch.Tensor, nst: Any, size: int) -> dict[str, Any]:
    """NST's per-image MMD^2 with the run's kernel settings, and what it compares: each side's
    L2-normalised channel maps (after NST's own spatial matching); the channel with the highest
    mean activation on the image is shown, upsampled to the image size."""
    options = {k: getattr(nst, k) for k in ("degree", "c", "sigma2", "form", "teacher_term")}
    mmd = nst_mmd2(f_s, f_t, nst.kernel, **options)
    out: dict[str, Any] = {"mmd2": mmd.double().numpy()}
    for side, f in zip(("s", "t"), _match_spatial(f_s, f_t), strict=True):
        top = f.mean(dim=(2, 3)).argmax(dim=1)
        unit = _unit_channels(f).reshape(f.shape)[torch.arange(len(f)), top]
        up = F.interpolate(unit[:, None], size=(size, size), mode="bilinear", align_corners=False)
        out[side], out[f"{side}_channel"] = up[:, 0].numpy(), top.numpy()
    return out


def render(rows: list[dict], columns: list[str]) -> bytes:
    """The grid as PNG bytes: rows x columns cells of CELL_INCHES at DPI (no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(len(columns) * CELL_INCHES, len(rows) * CELL_INCHES))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            ax, (kind, image, title) = axes[r, c], row["cells"][c]
            ax.imshow(row["xray"], cmap="gray")
            if kind == "cam":
                ax.imshow(image, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            elif kind == "nst":
                ax.imshow(image, cmap="magma", vmin=0.0)
            ax.set_title(f"{column}\n{title}" if r == 0 else title, fontsize=6)
            ax.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def resolve_teacher(args: Any, run: Path, summary: dict, cfg: Any) -> tuple:
    """(teacher or None, NST pairs, NSTLoss, note): what the run can be compared with."""
    source = args.teacher or summary.get("teacher")
    if source is None:
        why = f"no teacher in {SUMMARY_FILE}, no --teacher"
        return None, [], None, f"{run} is not a distilled student ({why}): " + ONLY_STUDENT
    where = teacher_dir(str(source))
    if where.is_dir() and isinstance((read_summary(where) or {}).get("model"), dict):
        check_teacher(read_summary(where), summary, where)  # before its weights are loaded
    teacher, _ = load_run(where, "teacher")
    module = cfg.get("module") or {}
    pairs = [dict(p) for p in (module.get("feature_pairs") or [])]
    if pairs and module.get("nst") is not None:
        return teacher, pairs, instantiate(module.nst), None
    why = f"module.feature_pairs in {RUN_CONFIG_FILE}"
    return teacher, [], None, f"{run} has no NST feature pairs ({why}): " + NO_PAIRS


def explain(args: argparse.Namespace) -> None:
    run = Path(args.run_dir)
    student, summary = load_run(run, "run directory")
    if args.images < 1:
        raise ExplainError(f"--images {args.images}: expected at least 1")
    predictions = read_predictions(run, args.split)
    config_file, pred_file = run / RUN_CONFIG_FILE, predictions_path(run, args.split)
    if not config_file.is_file():
        raise ExplainError(
            f"{config_file} does not exist; expected the config kd_lightning.run "
            "writes (retrain the run with this version to get it)"
        )
    if args.images > len(predictions.label):
        raise ExplainError(
            f"--images {args.images}: image index out of range, the {args.split} split of {run} "
            f"holds {len(predictions.label)} images"
        )
    cfg = OmegaConf.load(config_file)
    teacher, pairs, nst, note = resolve_teacher(args, run, summary, cfg)
    chosen, correct, fill = choose(predictions, args.images)
    dm = split_images(cfg, args.split, predictions, (config_file, pred_file))
    images = torch.stack([dm.datasets[args.split][int(i)][0] for i in chosen])
    size = images.shape[-1]

    nets = {"teacher": teacher, "student": student} if teacher is not None else {"student": student}
    p_score, feats, cams = {}, {}, {}
    for side, net in nets.items():
        p_score[side], feats[side] = forward_features(net, images, [p[side] for p in pairs])
        cams[side] = grad_cam(net, images, pairs, side)
    p_score["student"] = predictions.positive_score[chosen]  # what the selection was made on
    maps = [
        nst_columns(feats["student"][p["student"]], feats["teacher"][p["teacher"]], nst, size)
        for p in pairs
    ]
    columns = ["X-ray", *(f"Grad-CAM {side}" for side in nets)]
    for p in pairs:
        columns += [f"NST teacher {p['teacher']}", f"NST student {p['student']}"]

    header = ["index", "label", "case", "student_p", "teacher_p"]
    header += [f"mmd2_{p['student']}_{p['teacher']}" for p in pairs]
    table, rows = [], []
    for k, i in enumerate(chosen):
        label, case = int(predictions.label[i]), "correct" if correct[k] else "wrong"
        p = {side: float(p_score[side][k]) for side in nets}
        mmd = [float(m["mmd2"][k]) for m in maps]
        teacher_p = p.get("teacher", float("nan"))
        table.append([int(predictions.index[i]), label, case, p["student"], teacher_p, *mmd])
        title = f"#{predictions.index[i]} {dm.class_names[label]} ({case})\nS p={p['student']:.3f}"
        title += f" T p={p['teacher']:.3f}" if "teacher" in p else ""
        cells = [("xray", None, title)]
        cells += [("cam", cams[side][0][k], f"{side} p={p[side]:.3f}") for side in nets]
        for m, v in zip(maps, mmd, strict=True):
            cells += [
                ("nst", m["t"][k], f"ch {m['t_channel'][k]}"),
                ("nst", m["s"][k], f"ch {m['s_channel'][k]} MMD²={v:.4g}"),
            ]
        rows.append({"xray": images[k, 0].numpy(), "cells": cells})

    png = render(rows, columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([header, *([*r[:3], *(f"{v:.9g}" for v in r[3:])] for r in table)])
    out = Path(args.out) if args.out else run / "explain.png"
    out_csv = out.with_name(f"{out.stem}.csv")
    write_bytes_atomic(out, png)
    write_bytes_atomic(out_csv, buffer.getvalue().encode())

    n_wrong = int((~correct).sum())
    print(
        f"{PROG}: {len(chosen)} {args.split} images of {run}: {len(chosen) - n_wrong} correct, "
        f"{n_wrong} wrong (threshold 0.5 on 1 - p(normal)){fill}"
    )
    if note:
        print(f"{PROG}: {note}")
    if any(hw == (1, 1) for _, hw in cams.values()):
        print(
            f"{PROG}: note: Grad-CAM is flat: its layer is 1 x 1 at {size} px "
            "(model.stem=small or a larger data.image_size gives it a spatial extent)"
        )
    for row in table:
        mmd = " ".join(f"{h[5:]}={v:.6g}" for h, v in zip(header[5:], row[5:], strict=True))
        print(
            f"index={row[0]} label={row[1]} {row[2]} student_p={row[3]:.4f} "
            f"teacher_p={row[4]:.4f}" + (f" mmd2 {mmd}" if mmd else "")
        )
    print(f"{PROG}: wrote {out} and {out_csv}")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code 0, or 2 with one `kd_lightning.explain: error:` line (KD_DEBUG=1 re-raises)."""
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run directory (summary.json, model.pt)")
    parser.add_argument("--teacher", help="teacher run directory (default: summary.json's)")
    parser.add_argument("--images", type=int, default=8, help="rows in the grid (default 8)")
    parser.add_argument("--out", help="PNG to write (default RUN_DIR/explain.png)")
    parser.add_argument("--split", default="test", choices=PREDICTION_SPLITS)
    try:
        explain(parser.parse_args(argv))
    except (ExplainError, ArtifactError, ValueError, FileNotFoundError, KeyError) as err:
        if os.environ.get("KD_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
