"""`python -m kd_lightning.explain` on a real tiny teacher and NST student trained on the shared
X-rays through the CLI: the grid's size, the CSV's MMD^2 against the project's NSTLoss, the
Base-run and KD-only layouts, and every bad input as one line with exit code 2."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning.artifacts import Predictions, read_predictions
from kd_lightning.distill import FeatureHooks
from kd_lightning.explain import choose, main
from kd_lightning.models.loading import load_run_network
from tests.cli import TINY, run_cli

CELL = 200  # px per grid cell: explain.CELL_INCHES * explain.DPI
EVAL = 48  # images in the runs' val and test splits (data.eval_subset)
SMALL = [*TINY, "model.stem=small", "data.image_size=32", "data.train_subset=64"]
PREFIX = "kd_lightning.explain: error:"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_npz: Path) -> dict[str, Path]:
    """A tiny ResNet-18 teacher (a Base run) and an NST-poly ResNet-18 student, small stem so
    layer4 is 4 x 4 at 32 px (the ImageNet stem leaves 1 x 1, a flat Grad-CAM)."""
    work = tmp_path_factory.mktemp("explain")
    common = [*SMALL, f"data.eval_subset={EVAL}"]
    teacher, student = work / "outputs" / "teacher", work / "outputs" / "nst_poly"
    run_cli(["+experiment=base", "name=teacher", f"hydra.run.dir={teacher}", *common], cwd=work)
    run_cli(
        ["+experiment=nst_poly", f"module.teacher={teacher}", f"hydra.run.dir={student}", *common],
        cwd=work,
    )
    return {"teacher": teacher, "student": student}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _explain(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_student_grid_and_csv_through_the_cli(runs: dict[str, Path]) -> None:
    student = runs["student"]
    proc = run_cli([str(student), "--images", "4"], cwd=student, module="kd_lightning.explain")
    png, table = student / "explain.png", student / "explain.csv"
    # X-ray, Grad-CAM teacher and student, NST teacher and student map of the one layer4 pair.
    assert matplotlib.image.imread(png).shape[:2] == (4 * CELL, 5 * CELL)
    rows = _csv(table)
    assert len(rows) == 4 and "mmd2_layer4_layer4" in rows[0]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("index=")]
    assert len(lines) == 4 and all("mmd2 layer4_layer4=" in line for line in lines)
    assert "correct" in proc.stdout and f"wrote {png}" in proc.stdout

    predictions = read_predictions(student, "test")
    score = dict(zip(predictions.index.tolist(), predictions.positive_score, strict=True))
    mmd = [float(r["mmd2_layer4_layer4"]) for r in rows]
    assert all(math.isfinite(v) and v > -1e-6 for v in mmd), rows
    for row in rows:
        assert float(row["student_p"]) == pytest.approx(score[int(row["index"])], abs=1e-8)
        assert 0.0 <= float(row["teacher_p"]) <= 1.0
    assert sum(r["case"] == "wrong" for r in rows) <= 2

    # The same numbers from the run's own NSTLoss, one image at a time (batch mean = the value).
    cfg = OmegaConf.load(student / "run_config.yaml")
    nst = instantiate(cfg.module.nst)
    dm = instantiate(cfg.data, download=False)
    dm.setup("test")
    position = {int(i): k for k, i in enumerate(dm.sample_index["test"])}
    s_net, _ = load_run_network(student)
    t_net, _ = load_run_network(runs["teacher"])
    with FeatureHooks(s_net, ["layer4"]) as s_hooks, FeatureHooks(t_net, ["layer4"]) as t_hooks:
        for row, value in zip(rows, mmd, strict=True):
            image = dm.datasets["test"][position[int(row["index"])]][0][None]
            with torch.no_grad():
                s_net(image), t_net(image)
                loss = nst(s_hooks.features["layer4"], t_hooks.features["layer4"])
            assert value == pytest.approx(float(loss), rel=1e-4, abs=1e-7)


def test_base_run_gets_student_grad_cam_only(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "base.png"
    code, stdout, err = _explain(capsys, runs["teacher"], "--images", "3", "--out", out)
    assert code == 0, err
    assert matplotlib.image.imread(out).shape[:2] == (3 * CELL, 2 * CELL)
    notes = [line for line in stdout.splitlines() if "is not a distilled student" in line]
    assert len(notes) == 1 and "no teacher or NST columns" in notes[0]
    rows = _csv(tmp_path / "base.csv")
    assert len(rows) == 3 and not any(k.startswith("mmd2") for k in rows[0])
    assert all(math.isnan(float(r["teacher_p"])) for r in rows)


def test_teacher_without_feature_pairs_gets_two_grad_cams(
    runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "kd.png"
    args = [runs["teacher"], "--teacher", runs["teacher"], "--images", "2", "--out", out]
    code, stdout, err = _explain(capsys, *args)
    assert code == 0, err
    assert matplotlib.image.imread(out).shape[:2] == (2 * CELL, 3 * CELL)
    assert sum("has no NST feature pairs" in line for line in stdout.splitlines()) == 1
    rows = _csv(tmp_path / "kd.csv")
    # The teacher explained by itself: both probabilities agree.
    assert all(
        float(r["teacher_p"]) == pytest.approx(float(r["student_p"]), abs=1e-5) for r in rows
    )


def test_too_few_wrong_cases_are_filled_with_correct_ones() -> None:
    label = np.array([1, 1, 0, 0, 1])
    p_pos = np.array([0.9, 0.6, 0.2, 0.7, 0.99])  # row 3 is the only wrong one
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    predictions = Predictions(np.arange(5) + 10, label, np.log(probs), probs)
    rows, correct, note = choose(predictions, 4)
    assert rows.tolist() == [4, 0, 2, 3]  # most confident correct first, then the wrong one
    assert correct.tolist() == [True, True, True, False]
    assert "only 1 wrong" in note


def _copy_run(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """A run directory sharing the source's model.pt (a link) and copying its small files."""
    target.mkdir(parents=True)
    for name in ("summary.json", "run_config.yaml", "predictions"):
        if name in skip:
            continue
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        else:
            shutil.copy(source / name, target / name)
    if "model.pt" not in skip:
        (target / "model.pt").symlink_to(source / "model.pt")
    return target


def _edit_summary(run: Path, **model: int) -> Path:
    summary = json.loads((run / "summary.json").read_text())
    summary["model"].update(model)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _flip_first_label(run: Path) -> Path:
    path = run / "predictions" / "test.csv"
    lines = path.read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = "0" if cells[1] == "1" else "1"
    path.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    return run


def _files(folder: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_mtime_ns for p in folder.rglob("*")} if folder.is_dir() else {}


BAD = {
    "missing run dir": (lambda r, t: (t / "nope", []), "does not exist"),
    "no summary.json": (lambda r, t: (_copy_run(r["student"], t / "s", ("summary.json",)), []),
                        "has no summary.json"),
    "no model.pt": (lambda r, t: (_copy_run(r["student"], t / "s", ("model.pt",)), []),
                    "has no model.pt"),
    "no predictions": (lambda r, t: (_copy_run(r["student"], t / "s", ("predictions",)), []),
                       "rerun the run's command"),
    "zero images": (lambda r, t: (r["student"], ["--images", "0"]), "--images 0: expected at"),
    "too many images": (lambda r, t: (r["student"], ["--images", str(EVAL + 1)]),
                        f"image index out of range, the test split of {{student}} holds {EVAL}"),
    "teacher missing": (lambda r, t: (r["student"], ["--teacher", t / "none"]),
                        "teacher {tmp}/none does not exist"),
    "teacher unfinished": (lambda r, t: (r["student"], ["--teacher", _copy_run(
        r["teacher"], t / "tt", ("summary.json",))]), "has no summary.json"),
    "teacher classes": (lambda r, t: (r["student"], ["--teacher", _edit_summary(_copy_run(
        r["teacher"], t / "tt"), num_classes=3)]), "has 3 classes; the student has 2"),
    "teacher channels": (lambda r, t: (r["student"], ["--teacher", _edit_summary(_copy_run(
        r["teacher"], t / "tt"), in_channels=3)]), "has 3 channels; the student has 1"),
    "labels differ": (lambda r, t: (_flip_first_label(_copy_run(r["student"], t / "s")), []),
                      "{tmp}/s/run_config.yaml"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(
    runs: dict[str, Path], tmp_path: Path, capsys, case: str
) -> None:
    make, expected = BAD[case]
    run_dir, extra = make(runs, tmp_path)
    out = tmp_path / "out" / "grid.png"
    before = _files(Path(run_dir))
    code, stdout, err = _explain(capsys, run_dir, *extra, "--out", out)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert expected.format(tmp=tmp_path, student=runs["student"]) in lines[0], lines[0]
    if case == "labels differ":
        assert "predictions/test.csv" in lines[0]
    assert not (tmp_path / "out").exists()
    assert _files(Path(run_dir)) == before


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_cli([str(tmp_path / "nope")], cwd=tmp_path, module="kd_lightning.explain",
                   check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{PREFIX} run directory {tmp_path / 'nope'} does not exist; expected a finished "
        "kd_lightning run directory (summary.json and model.pt)"
    ]
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
