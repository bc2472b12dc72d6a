"""The label-scarce study end to end from the real CLI at a tiny budget: one teacher, every method
at two label fractions over two seeds, the per-fraction verdict table and scarce.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from tests.cli import TINY, run_cli


@pytest.mark.slow  # 17 real stages, ~2 min here
def test_scarce_cpu_runs_every_method_at_every_fraction(tmp_path: Path, shared_npz: Path) -> None:
    run = tmp_path / "scarce"
    args = [
        "+experiment=scarce_cpu",
        "chain.seeds=[0,1]",
        "chain.axes.labeled_fraction.values=[0.1,1.0]",
        "data.train_subset=400",
        "evaluation.bootstrap_resamples=300",
        *TINY,
    ]
    run_cli([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    chain = json.loads((run / "chain.json").read_text())
    assert len(chain["steps"]) == 1 + 4 * 2 * 2
    assert all(step["status"] == "done" for step in chain["steps"])
    summary = json.loads(
        (run / "seed1" / "kd" / "labeled_fraction_0.1" / "summary.json").read_text()
    )
    assert summary["variant"] == {"labeled_fraction": 0.1}
    assert (
        summary["data"]["labeled_fraction"] == 0.1 and sum(summary["data"]["labeled_counts"]) == 40
    )
    teacher = json.loads((run / "teacher" / "summary.json").read_text())
    assert teacher["data"]["labeled_fraction"] == 1.0  # the teacher sees every label
    md = (run / "results.md").read_text()
    assert "## Against Base at each labeled_fraction" in md
    assert "| nst_poly_kd |" in md and "labeled_fraction 0.1" in md and "labeled_fraction 1.0" in md
    # Each method is paired with Base at its own fraction.
    assert "| kd [labeled_fraction=0.1] |" in md and "| kd [labeled_fraction=1.0] |" in md
    image = imread(run / "scarce.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side
