"""`python -m kd_lightning.report.ensemble`: averaged logits of finished runs, with the statistics a
trained run gets, listed by the report as a teacher, compared by DeLong; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kd_lightning import report
from kd_lightning.artifacts import read_predictions, write_predictions
from kd_lightning.report.ensemble import main
from kd_lightning.report.statistics.discrimination import auroc

N_VAL, N_TEST = 160, 240
FAST = ["--bootstrap-resamples", "300"]


def _labels(n: int) -> np.ndarray:
    return np.r_[np.zeros(n * 3 // 8, int), np.ones(n - n * 3 // 8, int)]


def _member(run_dir: Path, seed: int, signal: float = 1.0, n_test: int = N_TEST) -> Path:
    """A finished run whose logits are the label's signal plus independent noise: the mean of
    several such members has less noise, so the ensemble must rank better than each member."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    for split, n in (("val", N_VAL), ("test", n_test)):
        labels = _labels(n)
        margin = signal * (2 * labels - 1) + rng.normal(0, 1.5, n)
        write_predictions(run_dir, split, np.arange(n), labels, np.stack([-margin, margin], 1) / 2)
    summary = {
        "name": "teacher",
        "method": "supervised",
        "role": "teacher",
        "seed": seed,
        "model": {"arch": "resnet34"},
        "parameters": 1000,
        "data": {"path": "x.npz", "image_size": 32, "num_classes": 2},
        "test": {"test/acc": 0.5, "test/auroc": 0.5},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_ensemble_averages_logits_and_beats_its_members(tmp_path: Path, capsys) -> None:
    members = [_member(tmp_path / f"t{s}", s) for s in range(3)]
    base = _member(tmp_path / "base", 9, signal=0.5)
    out = tmp_path / "ensemble"
    assert main([*map(str, members), "--out", str(out), "--compare", str(base), *FAST]) == 0
    test = read_predictions(out, "test")
    expected = np.mean([read_predictions(m, "test").logits for m in members], axis=0)
    np.testing.assert_allclose(test.logits, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(test.probs.sum(axis=1), 1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["role"] == "teacher" and summary["method"] == "ensemble"
    assert summary["name"] == "ensemble_3xresnet34" and summary["parameters"] == 3000
    value = summary["statistics"]["test"]["auroc"]
    assert value["value"] == pytest.approx(auroc(test.label != 0, test.positive_score))
    assert value["low"] < value["value"] < value["high"]
    member_aurocs = [
        auroc(p.label != 0, p.positive_score)
        for p in (read_predictions(m, "test") for m in members)
    ]
    assert value["value"] > max(member_aurocs)
    md = (out / "ensemble.md").read_text()
    assert md.count("| member ") == 3 and md.count("| compare ") == 1
    # Base (half the signal) is far weaker: the only row of its family, so Holm leaves its p
    compare_row = next(line for line in md.splitlines() if line.startswith("| compare "))
    cells = [c.strip() for c in compare_row.strip("|").split("|")]
    assert cells[3] == cells[4] and cells[5] == "better"
    assert md in capsys.readouterr().out + "\n"
    # the report lists the ensemble in its teacher table, with its interval
    runs = report.collect_runs([out])
    report.write_report(runs, tmp_path / "rep", evaluation={"bootstrap_resamples": 300})
    teachers = (tmp_path / "rep" / "teachers.csv").read_text()
    assert "ensemble_3xresnet34" in teachers


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one", "expected at least 2 ensemble members"),
        ("twice", "a run is given twice"),
        ("missing", "is not a directory; expected a finished run directory"),
        ("unfinished", "has no summary.json; expected a finished run"),
        ("other_images", "not of the same images, labels and classes"),
        ("other_data", "data.image_size=64, but"),
        ("out_not_empty", "exists and is not an empty directory"),
        ("bad_compare", "is not a directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys, case: str, message: str
) -> None:
    a, b = _member(tmp_path / "a", 0), _member(tmp_path / "b", 1)
    out = tmp_path / "out"
    runs, extra = [a, b], []
    if case == "one":
        runs = [a]
    elif case == "twice":
        runs = [a, a]
    elif case == "missing":
        runs = [a, tmp_path / "nope"]
    elif case == "unfinished":
        (b / "summary.json").unlink()
    elif case == "other_images":
        runs = [a, _member(tmp_path / "c", 2, n_test=N_TEST - 8)]
    elif case == "other_data":
        summary = json.loads((b / "summary.json").read_text())
        summary["data"]["image_size"] = 64
        (b / "summary.json").write_text(json.dumps(summary))
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("earlier work")
    elif case == "bad_compare":
        extra = ["--compare", str(tmp_path / "nope")]
    assert main([*map(str, runs), "--out", str(out), *extra, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
