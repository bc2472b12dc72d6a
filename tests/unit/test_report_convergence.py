"""Convergence outputs of the report (convergence.png/.csv, results.md section) on fake runs with
planted per-epoch test curves (EpochTestEvaluation's epoch_test.json / summary["epoch_test"])."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from matplotlib.collections import PolyCollection

from kd_lightning import report
from kd_lightning.report.aggregate import student_rows
from kd_lightning.report.convergence import convergence_rows, epochs_to
from kd_lightning.report.figures import convergence_figure
from kd_lightning.report.statistics import t_interval
from tests.unit.test_report import _stage

SEEDS = (0, 1, 2)


def _auroc(method: str, seed: int) -> list[float]:
    """Test AUROC after epochs 1..5. kd first reaches 0.90 (and Base's final 0.93) after epoch 2
    in every seed, nst_poly after epoch 4; base reaches 0.90 after epoch 5, and its own final
    mean 0.93 in seeds 1 and 2 only (final 0.92, 0.93, 0.94)."""
    return {
        "base": [0.70 + 0.01 * seed, 0.80, 0.85, 0.88, 0.92 + 0.01 * seed],
        "kd": [0.85, 0.95 + 0.001 * seed, 0.96, 0.96, 0.97],
        "nst_poly": [0.80, 0.85, 0.88, 0.94, 0.95 + 0.002 * seed],
    }[method]


def _acc(method: str, seed: int, epoch: int) -> float:
    return 0.6 + 0.05 * epoch + 0.01 * seed + (0.02 if method == "kd" else 0.0)


def _rows(method: str, seed: int) -> list[dict[str, float]]:
    return [
        {"epoch": e, "auroc": a, "acc": _acc(method, seed, e)}
        for e, a in enumerate(_auroc(method, seed))
    ]


def _run(
    root: Path, method: str, seed: int, how: str = "summary", variant: dict | None = None
) -> None:
    tag = "".join(f"_{k}{v}" for k, v in (variant or {}).items())
    run_dir = _stage(
        root / f"{method}{tag}_s{seed}",
        method,
        method,
        "student",
        seed,
        "resnet18",
        acc=0.85,
        auroc=0.95,
        curves=False,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    if variant:
        summary["variant"] = variant
    if how == "summary":  # a finished run: run.py copied epoch_test.json into summary.json
        summary["epoch_test"] = _rows(method, seed)
    elif how == "file":  # only the run directory's epoch_test.json
        (run_dir / "epoch_test.json").write_text(json.dumps(_rows(method, seed)))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _study(root: Path) -> Path:
    for seed in SEEDS:
        _run(root, "base", seed, "summary")
        _run(root, "kd", seed, "file")
        _run(root, "nst_poly", seed, "summary")
        _run(root, "nst_linear", seed, "none")  # no per-epoch test pass: skipped
    return root


def test_epochs_to_target_and_intervals_are_exact(tmp_path: Path) -> None:
    runs = report.collect_runs([_study(tmp_path / "study")])
    entries = {e["method"]: e for e in convergence_rows(student_rows(runs))}
    assert set(entries) == {"base", "kd", "nst_poly"}  # nst_linear has no epoch_test
    kd, poly, base = entries["kd"], entries["nst_poly"], entries["base"]
    for entry, reached_at in ((kd, 2), (poly, 4)):
        for name in ("0.90", "base_final"):
            target = entry["targets"][name]
            assert target["reached"] == 3 and target["n"] == 3
            assert target["mean"] == target["low"] == target["high"] == reached_at
    assert kd["targets"]["base_final"]["target"] == pytest.approx(0.93)
    # Base reaches its own final mean (0.93) only in seeds 1 and 2, both after epoch 5.
    own = base["targets"]["base_final"]
    assert (own["reached"], own["n"], own["mean"]) == (2, 3, 5.0)
    assert base["targets"]["0.90"]["mean"] == 5.0 and base["targets"]["0.90"]["reached"] == 3
    # AUROC after epoch 1 and after the last epoch: the project's t interval over seeds.
    first = t_interval([0.70, 0.71, 0.72])
    assert base["first"]["mean"] == pytest.approx(0.71)
    assert (base["first"]["low"], base["first"]["high"]) == pytest.approx(
        (first["low"], first["high"])
    )
    assert base["last"]["mean"] == pytest.approx(0.93) and base["last_epoch"] == 5
    assert kd["epochs"] == [1, 2, 3, 4, 5] and kd["n"] == 3
    assert kd["acc"]["mean"][2] == pytest.approx(0.6 + 0.10 + 0.01 + 0.02)


def test_epochs_to_counts_epochs_trained_and_none_when_never() -> None:
    curve = {e: {"auroc": a} for e, a in enumerate([0.5, 0.7, 0.9])}
    assert epochs_to(curve, 0.7) == 2 and epochs_to(curve, 0.5) == 1
    assert epochs_to(curve, 0.95) is None


def test_report_writes_convergence_png_csv_and_table(tmp_path: Path) -> None:
    study = _study(tmp_path / "study")
    paths = report.write_report(report.collect_runs([study]), tmp_path / "out")
    assert paths["convergence.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with paths["convergence.csv"].open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"base", "kd", "nst_poly"}
    assert float(rows["kd"]["epochs_to_0.90_mean"]) == 2.0
    assert float(rows["nst_poly"]["epochs_to_base_final_mean"]) == 4.0
    assert rows["base"]["epochs_to_base_final_reached"] == "2"
    md = paths["results.md"].read_text()
    section = md[md.index("## Convergence") :]
    assert "never used to pick the model" in section and "(convergence.png)" in section
    kd_line = next(line for line in section.splitlines() if line.startswith("| kd |"))
    assert "2.00 [2.00, 2.00] (3/3 reached)" in kd_line
    base_line = next(line for line in section.splitlines() if line.startswith("| base |"))
    assert "≥ 93.00: 5.00 [5.00, 5.00] (2/3 reached)" in base_line


def test_figure_has_a_line_and_a_band_per_method(tmp_path: Path) -> None:
    runs = report.collect_runs([_study(tmp_path / "study")])
    entries = convergence_rows(student_rows(runs))
    figure = convergence_figure(entries)
    auroc_ax, acc_ax = figure.axes
    assert "never used to pick the model" in figure.get_suptitle()
    for ax in (auroc_ax, acc_ax):
        assert len(ax.lines) == 3
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 3
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        # The paper's order (aggregate.PAPER_ORDER): base, nst_poly, kd.
        assert [label.split()[0] for label in labels] == ["base", "nst_poly", "kd"]
    poly = auroc_ax.lines[1]
    assert list(poly.get_xdata()) == [1, 2, 3, 4, 5]
    expected = [sum(_auroc("nst_poly", s)[e] for s in SEEDS) / 3 for e in range(5)]
    assert list(poly.get_ydata()) == pytest.approx(expected)


def test_one_column_of_panels_per_axis_value(tmp_path: Path) -> None:
    root = tmp_path / "study"
    for fraction in (0.03, 1.0):
        for seed in SEEDS:
            for method in ("base", "kd"):
                _run(root, method, seed, "summary", {"labeled_fraction": fraction})
    entries = convergence_rows(student_rows(report.collect_runs([root])))
    assert {e["panel"] for e in entries} == {
        (("labeled_fraction", 0.03),),
        (("labeled_fraction", 1.0),),
    }
    assert {e["label"] for e in entries} == {"base", "kd"}  # the axis is the panel, not the label
    figure = convergence_figure(entries)
    assert len(figure.axes) == 4 and all(len(ax.lines) == 2 for ax in figure.axes)
    assert "labeled_fraction=0.03" in figure.axes[0].get_title()


def test_runs_without_epoch_test_give_no_convergence_outputs(tmp_path: Path) -> None:
    root = tmp_path / "study"
    for seed in SEEDS:
        _run(root, "base", seed, "none")
        _run(root, "kd", seed, "none")
    paths = report.write_report(report.collect_runs([root]), tmp_path / "out")
    assert "convergence.png" not in paths and "convergence.csv" not in paths
    assert not (tmp_path / "out" / "convergence.png").exists()
    assert "## Convergence" not in paths["results.md"].read_text()


def test_one_seed_has_no_band_and_no_interval(tmp_path: Path) -> None:
    root = tmp_path / "study"
    _run(root, "kd", 0, "summary")
    entries = convergence_rows(student_rows(report.collect_runs([root])))
    (kd,) = entries
    assert kd["first"]["low"] is None and kd["targets"]["0.90"]["mean"] == 2.0
    assert "base_final" not in kd["targets"]  # no Base to take a target from
    ax = convergence_figure(entries).axes[0]
    assert len(ax.lines) == 1 and not ax.collections
    assert not any(math.isnan(y) for y in ax.lines[0].get_ydata())


def test_a_malformed_epoch_test_file_is_one_line_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "study"
    _run(root, "kd", 0, "none")
    bad = next(root.glob("kd_s0")) / "epoch_test.json"
    bad.write_text(json.dumps({"epoch": 0}))
    with pytest.raises(report.ReportError, match="epoch_test.json") as err:
        report.collect_runs([root])
    assert "\n" not in str(err.value) and "expected a list" in str(err.value)


def test_intervals_are_clipped_to_the_range_of_their_quantity(tmp_path: Path) -> None:
    # Two seeds far apart: the raw t interval (t_0.975, df=1 = 12.7) leaves [0, 1] and [1, 5].
    root = tmp_path / "study"
    for seed, first in ((0, 0.55), (1, 0.95)):
        run_dir = _stage(
            root / f"at_s{seed}", "at", "at", "student", seed, "resnet18", 0.8, 0.9, curves=False
        )
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["epoch_test"] = [
            {"epoch": e, "auroc": a, "acc": a}
            for e, a in enumerate(
                [first, 0.9, 0.9, 0.9, 0.9] if seed else [first, 0.6, 0.7, 0.8, 0.95]
            )
        ]
        (run_dir / "summary.json").write_text(json.dumps(summary))
    (entry,) = convergence_rows(student_rows(report.collect_runs([root])))
    raw = t_interval([0.55, 0.95])
    assert raw["low"] < 0.0 and raw["high"] > 1.0
    assert (entry["first"]["low"], entry["first"]["high"]) == (0.0, 1.0)
    assert entry["first"]["mean"] == pytest.approx(0.75)
    to_90 = entry["targets"]["0.90"]  # epoch 5 and epoch 1: raw interval [-22.4, 28.4]
    assert (to_90["mean"], to_90["low"], to_90["high"]) == (3.0, 1.0, 5.0)
