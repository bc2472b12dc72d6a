"""A tiny real run with an optional callback from the `callbacks` group (conf/callbacks/)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.cli import TINY, run_cli


def test_tiny_run_with_early_stopping(tmp_path: Path, shared_npz: Path) -> None:
    run_dir = tmp_path / "run"
    # min_delta 1.0: AUROC can never improve by a whole point, so patience 1 stops after epoch 2.
    run_cli(
        [
            "+callbacks=early_stopping",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=1.0",
            f"hydra.run.dir={run_dir}",
            *TINY,
            "trainer.max_epochs=5",
        ],
        cwd=tmp_path,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["seconds_per_epoch"] > 0
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("EarlyStopping") for k in last["callbacks"])
    assert list((run_dir / "checkpoints").glob("best-epoch=*.ckpt"))
