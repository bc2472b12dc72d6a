"""The report's trust layer on synthetic predictions files written through kd_lightning.artifacts:
intervals, operating points, paired verdicts against Base, pictures, and bad input (no training)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from kd_lightning import report
from kd_lightning.artifacts import read_predictions, write_predictions
from kd_lightning.report import figures, trust

N_VAL, N_TEST = 300, 400
SEEDS = (0, 1, 2)


def _logits(labels: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    """Two-class logits whose pneumonia margin is signal * label + noise."""
    margin = signal * (2 * labels - 1) + rng.normal(0, 1, len(labels))
    return np.stack([-margin / 2, margin / 2], axis=1)


def _labels(n: int) -> np.ndarray:
    return np.r_[np.zeros(n * 3 // 8, int), np.ones(n - n * 3 // 8, int)]


def _write_run(run_dir: Path, method: str, seed: int, val: np.ndarray, test: np.ndarray) -> None:
    run_dir.mkdir(parents=True)
    val_labels, test_labels = _labels(N_VAL), _labels(N_TEST)
    write_predictions(run_dir, "val", np.arange(N_VAL), val_labels, val)
    write_predictions(run_dir, "test", np.arange(N_TEST), test_labels, test)
    p = np.exp(test[:, 1]) / np.exp(test).sum(axis=1)
    acc = float(((p > 0.5) == test_labels).mean())
    summary = {
        "name": method,
        "method": method,
        "role": "student",
        "seed": seed,
        "model": {"arch": "resnet18"},
        "test": {"test/acc": acc, "test/auroc": 0.9},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base (weak), 'strong' (much more informative), 'twin' (Base's own predictions) x 3 seeds."""
    root = tmp_path_factory.mktemp("trust_study")
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        base_val, base_test = _logits(_labels(N_VAL), 0.8, rng), _logits(_labels(N_TEST), 0.8, rng)
        strong_val = _logits(_labels(N_VAL), 1.6, rng)
        strong_test = _logits(_labels(N_TEST), 1.6, rng)
        _write_run(root / f"seed{seed}" / "base", "base", seed, base_val, base_test)
        _write_run(root / f"seed{seed}" / "strong", "strong", seed, strong_val, strong_test)
        _write_run(root / f"seed{seed}" / "twin", "twin", seed, base_val, base_test)
    report.write_report(report.collect_runs([root]), root, evaluation={"bootstrap_resamples": 500})
    return root


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_paired_verdicts_flag_a_planted_difference_and_not_identical_predictions(
    study: Path,
) -> None:
    rows = {(r["method"], r["metric"], r["seed"]): r for r in _csv(study / "paired.csv")}
    strong, twin = rows[("strong", "auroc", "all")], rows[("twin", "auroc", "all")]
    assert strong["verdict"] == "better" and float(strong["diff"]) > 0.1
    assert strong["wins"] == "3" and float(strong["p_holm"]) < 0.05
    assert twin["verdict"] == "not distinguishable"
    assert float(twin["diff"]) == 0.0 and float(twin["p"]) == 1.0 and twin["wins"] == "0"
    for seed in SEEDS:  # per seed: DeLong on the AUROC, McNemar on the accuracy
        assert float(rows[("twin", "auroc", str(seed))]["p"]) == 1.0
        assert float(rows[("strong", "auroc", str(seed))]["p"]) < 1e-6
        assert rows[("strong", "acc", str(seed))]["test"].startswith("McNemar")
        low = float(rows[("strong", "auroc", str(seed))]["low"])
        assert 0 < low < float(rows[("strong", "auroc", str(seed))]["diff"])
    # Holm over the two methods compared: the smaller p is doubled.
    ps = sorted(float(rows[(m, "auroc", "all")]["p"]) for m in ("strong", "twin"))
    assert float(strong["p_holm"]) == pytest.approx(min(1.0, 2 * ps[0]))


def test_results_md_holds_intervals_operating_points_calibration_and_verdicts(study: Path) -> None:
    md = (study / "results.md").read_text()
    for section in (
        "## Operating points chosen on validation, applied to test",
        "### Threshold: Youden (val)",
        "### Threshold: sensitivity 95% (val)",
        "## Calibration on test",
        "## Paired against Base on the same test images",
        "## Per-run test AUROC",
    ):
        assert section in md, section
    assert "| strong |" in md and "**better**" in md and "**not distinguishable**" in md
    assert "![ROC per method](roc.png)" in md
    # Each method's AUROC mean equals the mean of the per-run AUROCs recomputed from the files.
    results = {r["method"]: r for r in _csv(study / "results.csv")}
    for method in ("base", "strong"):
        values = [
            report.statistics.auroc(p.label, p.positive_score)
            for p in (read_predictions(study / f"seed{s}" / method, "test") for s in SEEDS)
        ]
        assert float(results[method]["auroc_mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        low, high = float(results[method]["auroc_low"]), float(results[method]["auroc_high"])
        assert low < np.mean(values) < high
    assert float(results["strong"]["youden_acc_mean"]) > float(results["base"]["youden_acc_mean"])


def test_pictures_are_pngs_with_a_curve_or_panel_per_method(study: Path) -> None:
    for name in ("roc.png", "calibration.png", "confusion.png", "curves.png"):
        image = imread(study / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, name
    runs = report.collect_runs([study])
    trust.attach_predictions(runs, {"bootstrap_resamples": 200})
    rows = report.student_rows(runs)
    roc = figures.roc_figure(rows)
    labels = [line.get_label() for line in roc.axes[0].get_lines()]
    assert sum(label.startswith(("base", "strong", "twin")) for label in labels) == 3
    # Two operating-point markers per method, plus the chance diagonal.
    assert len(roc.axes[0].get_lines()) == 3 + 2 * 3 + 1
    assert len(figures.calibration_figure(rows).axes) == 3
    confusion = figures.confusion_figure(rows)
    assert len(confusion.axes) == 3
    # Each matrix shows the mean test counts over seeds: they sum to the test set size.
    cells = [float(t.get_text()) for t in confusion.axes[0].texts]
    assert sum(cells) == pytest.approx(N_TEST)


def test_thresholds_never_read_test_labels(study: Path, tmp_path: Path) -> None:
    shuffled = tmp_path / "shuffled"
    shutil.copytree(study / "seed0" / "strong", shuffled)
    test = read_predictions(shuffled, "test")
    rng = np.random.default_rng(7)
    write_predictions(shuffled, "test", test.index, rng.permutation(test.label), test.logits)
    original, changed = (
        report.collect_runs([study / "seed0" / "strong"]),
        report.collect_runs([shuffled]),
    )
    trust.attach_predictions(original, {"bootstrap_resamples": 200})
    trust.attach_predictions(changed, {"bootstrap_resamples": 200})
    assert original[0]["stats"]["thresholds"] == changed[0]["stats"]["thresholds"]
    assert original[0]["stats"]["test"]["auroc"] != changed[0]["stats"]["test"]["auroc"]


def test_runs_without_predictions_get_a_note_and_the_old_tables(tmp_path: Path) -> None:
    for method in ("base", "nst_poly"):
        for seed in (0, 1):
            run = tmp_path / f"seed{seed}" / method
            run.mkdir(parents=True)
            summary = {"name": method, "method": method, "role": "student", "seed": seed}
            summary["test"] = {"test/acc": 0.8 + 0.01 * seed, "test/auroc": 0.9}
            (run / "summary.json").write_text(json.dumps(summary))
    paths = report.write_report(report.collect_runs([tmp_path]), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "4 run(s) have no predictions/ files" in md
    assert "## Paired differences against base (same seed)" in md
    assert "paired.csv" not in paths and not (tmp_path / "roc.png").exists()


def test_mismatched_test_images_are_not_paired(study: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(study / "seed0", root / "seed0")
    other = root / "seed0" / "strong"
    test = read_predictions(other, "test")
    write_predictions(other, "test", test.index + 1000, test.label, test.logits)
    report.write_report(report.collect_runs([root]), root, evaluation={"bootstrap_resamples": 200})
    md = (root / "results.md").read_text()
    assert "strong seed 0 and base were tested on different images" in md


def test_malformed_predictions_file_is_one_line(study: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(study / "seed0" / "base", broken)
    (broken / "predictions" / "test.csv").write_text("index,label\n1,0\n")
    assert report.main([str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predictions/test.csv is malformed" in err[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--target-sensitivity", "1.5"], "--target-sensitivity: '1.5': expected a number in"),
        (["--bootstrap-resamples", "5"], "--bootstrap-resamples: '5': expected an integer >= 200"),
    ],
)
def test_report_cli_bad_options_are_one_line(
    study: Path, capsys, args: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(study), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_holm_counts_the_methods_compared_per_axis_value_not_every_row() -> None:
    """Two label fractions, two methods each: Holm multiplies by 2 (methods per fraction), not 4."""

    def result(method: str, fraction: float, p: float) -> dict:
        combined = {"mean": 0.05, "p": p}
        return {
            "method": method,
            "variant": {"labeled_fraction": fraction},
            "auroc": dict(combined),
            "acc": dict(combined),
        }

    results = [
        result("kd", 0.01, 0.01),
        result("nst", 0.01, 0.30),
        result("kd", 1.0, 0.02),
        result("nst", 1.0, 0.04),
    ]
    trust.apply_holm(results)
    assert [r["auroc"]["p_holm"] for r in results] == pytest.approx([0.02, 0.30, 0.04, 0.04])
    assert [r["auroc"]["verdict"] for r in results] == [
        "better",
        "not distinguishable",
        "better",
        "better",
    ]


def test_stored_statistics_are_reused_only_when_computed_with_the_same_settings(
    study: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(study / "seed0" / "strong", run_dir)
    fresh = report.collect_runs([run_dir])
    trust.attach_predictions(fresh, {"bootstrap_resamples": 300})
    stored = json.loads(json.dumps(fresh[0]["stats"]))
    assert stored["n_resamples"] == 300
    stored["thresholds"]["youden"] = 0.123  # a marker: reused statistics keep it
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "statistics": stored}))
    same, other = report.collect_runs([run_dir]), report.collect_runs([run_dir])
    trust.attach_predictions(same, {"bootstrap_resamples": 300})
    trust.attach_predictions(other, {"bootstrap_resamples": 400})
    assert same[0]["stats"]["thresholds"]["youden"] == 0.123
    assert other[0]["stats"]["thresholds"]["youden"] == fresh[0]["stats"]["thresholds"]["youden"]
    assert other[0]["stats"]["n_resamples"] == 400


def test_equal_per_seed_differences_take_the_largest_per_seed_p() -> None:
    from kd_lightning.report import trust

    # ACC moved by the same 2 of 624 images in both seeds: no variance for the t-test, and
    # neither seed's own McNemar test is significant, so neither is the combination.
    seeds = [
        {"diff": 2 / 624, "low": -0.02, "high": 0.03, "p": 0.904, "test": "McNemar"},
        {"diff": 2 / 624, "low": -0.02, "high": 0.03, "p": 0.875, "test": "McNemar"},
    ]
    combined = trust._combined(seeds)
    assert combined["p"] == 0.904 and combined["test"].startswith("largest per-seed p")
    strong = [dict(s, p=0.001) for s in seeds]
    assert trust._combined(strong)["p"] == 0.001
    varied = [seeds[0], dict(seeds[1], diff=4 / 624)]
    assert trust._combined(varied)["test"] == "t-test over seeds"


def test_paired_rows_name_the_network_when_a_study_pairs_several() -> None:
    from kd_lightning.report.tables import _md_table as md_table
    from kd_lightning.report.trust_tables import _paired_markdown

    def result(arch: str, diff: float) -> dict:
        item = {"diff": diff, "low": diff - 0.01, "high": diff + 0.01, "p": 0.2, "test": "DeLong"}
        combined = {**item, "mean": diff, "n": 1, "wins": 1, "p_holm": 0.4}
        combined["verdict"] = "not distinguishable"
        seeds = [{"seed": 0, "auroc": item, "acc": item}]
        return {"method": "kd", "config": "", "arch": arch, "seeds": seeds, "auroc": combined,
                "acc": combined}  # fmt: skip

    two = "\n".join(
        _paired_markdown([result("resnet18", 0.01), result("mobilenet", -0.02)], md_table)
    )
    assert "| method | arch | per seed" in two
    assert "| kd | resnet18 | s0: +1.00" in two and "| kd | mobilenet | s0: -2.00" in two
    one = "\n".join(_paired_markdown([result("resnet18", 0.01)], md_table))
    assert "| method | per seed" in one and "| arch |" not in one
