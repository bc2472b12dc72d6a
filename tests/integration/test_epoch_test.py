"""EpochTestEvaluation (`+callbacks=epoch_test`) on tiny real runs: it records test AUROC / ACC
after every epoch and changes nothing about training (it forks the RNG around its pass)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kd_lightning.locks import LOCK_FILE
from tests.cli import TINY, run_cli

BUDGET = [*TINY, "trainer.max_epochs=2", "data.image_size=32", "seed=3"]


def _run(root: Path, name: str, *extra: str) -> Path:
    run_dir = root / name
    run_cli(["+experiment=base", *BUDGET, *extra, f"hydra.run.dir={run_dir}"], cwd=root)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_npz: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("epoch_test")
    return {
        "with": _run(root, "with", "+callbacks=epoch_test"),
        "without": _run(root, "without"),
    }


def test_the_callback_does_not_change_training(runs: dict[str, Path]) -> None:
    with_cb = torch.load(runs["with"] / "model.pt", map_location="cpu", weights_only=True)
    without = torch.load(runs["without"] / "model.pt", map_location="cpu", weights_only=True)
    assert with_cb.keys() == without.keys()
    for key in with_cb:
        assert torch.equal(with_cb[key], without[key]), key
    summaries = [json.loads((runs[k] / "summary.json").read_text()) for k in ("with", "without")]
    assert summaries[0]["test"] == summaries[1]["test"]
    assert "epoch_test" not in summaries[1] and not (runs["without"] / "epoch_test.json").exists()


def test_one_row_per_epoch_with_auroc_in_0_1(runs: dict[str, Path]) -> None:
    rows = json.loads((runs["with"] / "epoch_test.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert set(row) == {"epoch", "auroc", "acc"}
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["acc"] <= 1.0
    summary = json.loads((runs["with"] / "summary.json").read_text())
    assert summary["epoch_test"] == rows


def test_a_resumed_run_keeps_the_earlier_epochs_rows(runs: dict[str, Path], tmp_path: Path) -> None:
    finished = runs["with"]
    before = json.loads((finished / "epoch_test.json").read_text())
    # As an interrupted run leaves it: checkpoints and epoch_test.json, no summary.json.
    resumed = tmp_path / "resumed"
    shutil.copytree(finished, resumed, ignore=shutil.ignore_patterns(LOCK_FILE))
    for name in ("summary.json", "model.pt"):
        (resumed / name).unlink()
    proc = run_cli(
        [
            "+experiment=base",
            *BUDGET,
            "trainer.max_epochs=3",
            "+callbacks=epoch_test",
            f"hydra.run.dir={resumed}",
        ],
        cwd=tmp_path,
    )
    assert "resuming" in proc.stdout
    rows = json.loads((resumed / "epoch_test.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[:2] == before
    assert json.loads((resumed / "summary.json").read_text())["epoch_test"] == rows
