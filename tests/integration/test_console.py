"""What a user sees from the real CLI (kd_lightning/console.py): each log line once, our
`[kd_lightning]` lines, and none of Lightning's per-run notices that say nothing to this user."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tests.cli import run_cli

SILENCED = ("GPU available", "TPU available", "HPU available", "litlogger", "in eval mode")


def test_one_stage_prints_each_line_once_without_lightning_notices(
    tmp_path: Path, shared_npz: Path
) -> None:
    run = tmp_path / "run"
    proc = run_cli(
        [
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    for notice in SILENCED:
        assert notice not in output, notice
    # The result line and Lightning's progress bar are kept.
    assert re.search(r"^\[kd_lightning\] resnet18 \(resnet18, .*test/auroc=", output, re.M)
    assert "Epoch 0/0" in output
    # Every log line once: through Hydra's handler (timestamped, also in the run's log file),
    # not again through Lightning's own "INFO: ..." console handler.
    messages = re.findall(r"^\[[^\]]+\]\[[^\]]+\]\[INFO\] - (.*)$", output, re.M)
    assert "Seed set to 0" in messages
    assert not re.search(r"^INFO: ", output, re.M), output[-3000:]
    repeated = {m: n for m, n in Counter(messages).items() if n > 1}
    assert not repeated, repeated
    assert "Seed set to 0" in (run / "__main__.log").read_text()
