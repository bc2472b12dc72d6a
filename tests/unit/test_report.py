"""kd_lightning.report on fake run directories shaped like real ones (no training)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

from kd_lightning import report

ARCH_PARAMS = {
    "resnet18": (11_177_538, 42.7),
    "resnet34": (21_285_698, 81.3),
    "resnet101": (42_504_258, 162.5),
    "resnet152": (58_147_906, 222.6),
}
# Test ACC / AUROC per seed 0, 1, 2: the numbers the hand-computed expectations below come from.
STUDENT_ACC = {
    "nst_poly_ta": [0.90, 0.91, 0.95],
    "nst_linear": [0.83, 0.84, 0.88],
    "base": [0.80, 0.82, 0.84],
    "nst_poly": [0.86, 0.88, 0.90],
}
STUDENT_AUROC = {
    "nst_poly_ta": [0.96, 0.97, 0.95],
    "nst_linear": [0.95, 0.93, 0.94],
    "base": [0.94, 0.95, 0.93],
    "nst_poly": [0.93, 0.94, 0.98],
}
EPOCHS = 5


def _val_curve(method: str, seed: int, epoch: int) -> tuple[float, float]:
    """(val/loss, val/acc) of a fake run: distinct per method, seed and epoch."""
    offset = (sorted(STUDENT_ACC).index(method) if method in STUDENT_ACC else 5) * 0.01
    offset += seed * 0.002
    return 0.7 / (epoch + 1) + offset, 0.6 + 0.05 * epoch + offset


def _write_metrics_csv(run_dir: Path, method: str, seed: int, resumed: bool = False) -> None:
    # Lightning's CSVLogger: one header for all keys, sparse rows, several rows per epoch.
    header = ["epoch", "step", "train/loss_epoch", "train/loss_step", "val/acc", "val/auroc"]
    header.append("val/loss")
    rows, step = [], 0
    for epoch in range(EPOCHS):
        for _ in range(2):
            step += 10
            rows.append([epoch, step - 1, "", 0.5, "", "", ""])
        loss, acc = _val_curve(method, seed, epoch)
        rows.append([epoch, step - 1, "", "", acc, 0.9, loss])
        rows.append([epoch, step - 1, 0.45, "", "", "", ""])
    if resumed:
        # A resume re-validates epoch 2 later in the file; the later value is the one kept.
        rows.append([2, step + 5, "", "", 0.123, 0.9, 9.0])
    (run_dir / "logs").mkdir(parents=True)
    with (run_dir / "logs" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _stage(
    run_dir: Path,
    name: str,
    method: str,
    role: str,
    seed: int,
    arch: str,
    acc: float,
    auroc: float,
    overrides: list[str] | None = None,
    curves: bool = True,
    best_val: float = 0.99,
) -> Path:
    run_dir.mkdir(parents=True)
    params, mb = ARCH_PARAMS[arch]
    summary = {
        "name": name,
        "method": method,
        "role": role,
        "seed": seed,
        "model": {"arch": arch, "stem": "imagenet", "num_classes": 2, "pretrained": False},
        "teacher": None if role == "teacher" else "/cluster/runs/teacher",
        "test": {
            "test/acc": acc,
            "test/auroc": auroc,
            "test/f1": acc + 0.02,
            "test/loss": 1.0 - acc,
            "test/sensitivity": acc + 0.05,
            "test/specificity": acc - 0.1,
        },
        "test_confusion_matrix": [[200, 34], [40, 350]],
        "best_checkpoint": str(run_dir / "checkpoints" / "best-epoch=004.ckpt"),
        "model_file_mb": mb,
        "parameters": params,
        "epochs": EPOCHS,
        "fit_seconds": 80.1,
        "seconds_per_epoch": 16.0,
        "best_val": {"val/auroc": best_val},
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if curves:
        _write_metrics_csv(run_dir, method, seed, resumed=(method == "base" and seed == 1))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        lines = "".join(f"- {o}\n" for o in overrides)
        (run_dir / ".hydra" / "overrides.yaml").write_text(lines)
    return run_dir


def _build_study(root: Path) -> Path:
    """A chain (teacher R152 -> TAs R101, R34 -> NST-poly-TA students) next to a multirun of
    base / nst_linear / nst_poly students, 3 seeds each, as copied off a cluster."""
    chain = root / "chain_paper"
    steps = []
    _stage(chain / "teacher", "teacher", "supervised", "teacher", 0, "resnet152", 0.9867, 0.995)
    steps.append({"name": "teacher", "seed": 0, "dir": "teacher", "status": "done"})
    for seed, acc in zip((0, 1), (0.97, 0.98), strict=True):
        _stage(chain / f"seed{seed}/ta101", "ta101", "nst_poly", "ta", seed, "resnet101", acc, 0.98)
        steps.append({"name": "ta101", "seed": seed, "dir": f"seed{seed}/ta101", "status": "done"})
    for seed, acc in enumerate((0.92, 0.93, 0.94)):
        _stage(chain / f"seed{seed}/ta34", "ta34", "nst_poly", "ta", seed, "resnet34", acc, 0.97)
        steps.append({"name": "ta34", "seed": seed, "dir": f"seed{seed}/ta34", "status": "done"})
    for seed in range(3):
        acc, auroc = STUDENT_ACC["nst_poly_ta"][seed], STUDENT_AUROC["nst_poly_ta"][seed]
        _stage(
            chain / f"seed{seed}/student", "student", "nst_poly_ta", "student", seed, "resnet18",
            acc, auroc,
        )  # fmt: skip
        steps.append({"name": "student", "seed": seed, "dir": f"seed{seed}/student"})
        steps[-1]["status"] = "done"
    steps.append({"name": "ta101", "seed": 2, "dir": "seed2/ta101", "status": "failed"})
    steps[-1].update(arch="resnet101", method="nst_poly")
    (chain / "chain.json").write_text(json.dumps({"name": "paper", "steps": steps}))

    sweep = root / "multirun" / "2026-01-01_00-00-00"
    job = 0
    for method in ("base", "nst_linear", "nst_poly"):
        for seed in range(3):
            overrides = [f"+experiment={method}", f"seed={seed}", "trainer.max_epochs=5"]
            _stage(
                sweep / f"{job}_+experiment={method}", method, method, "student", seed, "resnet18",
                STUDENT_ACC[method][seed], STUDENT_AUROC[method][seed], overrides=overrides,
            )  # fmt: skip
            job += 1
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = _build_study(tmp_path_factory.mktemp("study"))
    before = _digests(root)
    assert report.main([str(root / "chain_paper"), str(root / "multirun"), "--out", str(root)]) == 0
    outputs = {name: root / name for name in ("results.csv", "teachers.csv", "results.md")}
    outputs["curves.png"] = root / "curves.png"
    # Never overwrite inputs: every input file is byte-identical afterwards.
    after = _digests(root)
    assert {p: d for p, d in after.items() if p in before} == before
    return root, outputs


def _digests(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_collect_runs_finds_every_summary_once(tmp_path: Path) -> None:
    root = _build_study(tmp_path)
    # Overlapping DIRs (a parent and its child) must not count runs twice.
    runs = report.collect_runs([root, root / "chain_paper"])
    assert len(runs) == 1 + 2 + 3 + 3 + 9
    roles = sorted(r["role"] for r in runs)
    assert roles.count("student") == 12 and roles.count("ta") == 5 and roles.count("teacher") == 1
    base1 = next(r for r in runs if r["method"] == "base" and r["seed"] == 1)
    assert base1["overrides"] == ["+experiment=base", "seed=1", "trainer.max_epochs=5"]
    assert base1["arch"] == "resnet18" and base1["test"]["test/acc"] == pytest.approx(0.82)
    # Sparse CSVLogger rows: one value per epoch, and the later (resumed) epoch-2 row wins.
    assert sorted(base1["curves"]["val/acc"]) == list(range(EPOCHS))
    assert base1["curves"]["val/acc"][2] == pytest.approx(0.123)
    assert base1["curves"]["val/loss"][3] == pytest.approx(_val_curve("base", 1, 3)[0])
    student = next(r for r in runs if r["method"] == "nst_poly_ta" and r["seed"] == 0)
    assert student["chain"] == "paper" and student["overrides"] == []


def test_results_csv_means_stds_and_order(study: tuple[Path, dict[str, Path]]) -> None:
    _, outputs = study
    rows = _csv_rows(outputs["results.csv"])
    assert [r["method"] for r in rows] == ["base", "nst_linear", "nst_poly", "nst_poly_ta"]
    by_method = {r["method"]: r for r in rows}
    # Hand-computed: mean and sample std (ddof=1) over seeds 0, 1, 2.
    expected = {
        "base": (0.82, 0.02, 0.94, 0.01),
        "nst_linear": (0.85, math.sqrt(0.0007), 0.94, 0.01),
        "nst_poly": (0.88, 0.02, 0.95, math.sqrt(0.0007)),
        "nst_poly_ta": (0.92, math.sqrt(0.0007), 0.96, 0.01),
    }
    for method, (acc, acc_sd, auroc, auroc_sd) in expected.items():
        row = by_method[method]
        assert float(row["acc_mean"]) == pytest.approx(acc, abs=1e-6)
        assert float(row["acc_std"]) == pytest.approx(acc_sd, abs=1e-6)
        assert float(row["auroc_mean"]) == pytest.approx(auroc, abs=1e-6)
        assert float(row["auroc_std"]) == pytest.approx(auroc_sd, abs=1e-6)
        # sensitivity / specificity / f1 are acc shifted by a constant: same std, shifted mean.
        assert float(row["sensitivity_mean"]) == pytest.approx(acc + 0.05, abs=1e-6)
        assert float(row["specificity_mean"]) == pytest.approx(acc - 0.1, abs=1e-6)
        assert float(row["f1_std"]) == pytest.approx(acc_sd, abs=1e-6)
        assert row["n"] == "3" and row["seeds"] == "0 1 2" and row["arch"] == "resnet18"
        assert int(row["parameters"]) == 11_177_538 and float(row["model_mb"]) == 42.7
        # The shared trainer.max_epochs=5 override is not a separate configuration.
        assert row["config"] == ""


def test_teacher_and_ta_table(study: tuple[Path, dict[str, Path]]) -> None:
    _, outputs = study
    rows = _csv_rows(outputs["teachers.csv"])
    # Teacher first, then TAs from the biggest down, as the paper lists them.
    assert [(r["name"], r["role"], r["arch"]) for r in rows] == [
        ("teacher", "teacher", "resnet152"),
        ("ta101", "ta", "resnet101"),
        ("ta34", "ta", "resnet34"),
    ]
    assert [r["n"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["acc_mean"]) == pytest.approx(0.9867) and float(rows[0]["acc_std"]) == 0
    assert float(rows[1]["acc_mean"]) == pytest.approx(0.975, abs=1e-6)
    assert float(rows[1]["acc_std"]) == pytest.approx(math.sqrt(0.00005), abs=1e-6)
    assert float(rows[2]["acc_mean"]) == pytest.approx(0.93, abs=1e-6)
    assert float(rows[2]["auroc_mean"]) == pytest.approx(0.97, abs=1e-6)


def test_paired_differences_against_base(tmp_path: Path) -> None:
    runs = report.collect_runs([_build_study(tmp_path)])
    paired = {p["method"]: p for p in report.paired_differences(report.student_rows(runs))}
    assert sorted(paired) == ["nst_linear", "nst_poly", "nst_poly_ta"]
    poly = paired["nst_poly"]
    # AUROC diffs per seed: -0.01, -0.01, +0.05; ACC diffs: +0.06 on every seed.
    assert poly["pairs"] == 3
    assert poly["test/auroc"]["mean"] == pytest.approx(0.01, abs=1e-9)
    assert poly["test/auroc"]["std"] == pytest.approx(math.sqrt(0.0012), abs=1e-9)
    assert poly["test/auroc"]["better"] == 1 and not poly["test/auroc"]["significant"]
    assert poly["test/acc"]["mean"] == pytest.approx(0.06, abs=1e-9)
    ta = paired["nst_poly_ta"]["test/auroc"]
    assert ta["mean"] == pytest.approx(0.02, abs=1e-9) and ta["better"] == 3
    # Two seeds only: base seed 2 is left out, so one pair fewer.
    two_seed = [r for r in runs if not (r["method"] == "base" and r["seed"] == 2)]
    rows = report.student_rows(two_seed)
    assert report.paired_differences(rows)[0]["pairs"] == 2


def test_results_markdown(study: tuple[Path, dict[str, Path]]) -> None:
    _, outputs = study
    md = outputs["results.md"].read_text()
    assert md.startswith("# Study results")
    assert "ACC = (TP+TN)/(TP+TN+FP+FN)" in md
    # mean ± std [Student-t 95% interval over the 3 seeds: mean ± 4.303 std / sqrt(3)]
    assert (
        "| nst_poly_ta | resnet18 | 3 | 0 1 2 | 92.00 ± 2.65 [85.43, 98.57] | "
        "96.00 ± 1.00 [93.52, 98.48] | 97.00 ± 2.65 [90.43, 100.00] |" in md
    )
    assert "| teacher | teacher | supervised | resnet152 | 1 | 98.67 ± — | 99.50 ± — |" in md
    # Paired table: nst_poly gains +6 pp ACC on every seed, +1 pp AUROC on average.
    assert "| nst_poly | resnet18 | 3 | +6.00 ± 0.00 | +1.00 ± 3.46 | +0.50 | 1/3 |" in md
    # Identical +2 pp AUROC gains on all seeds: zero spread, so t is infinite (not float noise).
    assert "| nst_poly_ta | resnet18 | 3 | +10.00 ± 1.00 | +2.00 ± 0.00 | +inf* | 3/3 |" in md
    # The failed chain step is reported, not silently dropped.
    assert "step seed2/ta101 (resnet101, nst_poly, seed 2) is failed" in md
    assert md.index("| base |") < md.index("| nst_linear |") < md.index("| nst_poly_ta |")


def test_curves_png_is_a_real_plot(study: tuple[Path, dict[str, Path]]) -> None:
    import matplotlib.image

    _, outputs = study
    data = outputs["curves.png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    image = matplotlib.image.imread(outputs["curves.png"])
    assert image.ndim == 3 and image.shape[2] == 4 and image.shape[1] > image.shape[0] > 300


def test_curves_figure_has_one_line_per_method(tmp_path: Path) -> None:
    runs = report.collect_runs([_build_study(tmp_path)])
    figure = report.curves_figure(runs)
    loss_ax, acc_ax = figure.axes
    for ax in (loss_ax, acc_ax):
        assert len(ax.lines) == 4
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert [label.split()[0] for label in labels] == [
            "base", "nst_linear", "nst_poly", "nst_poly_ta"
        ]  # fmt: skip
    # The plotted line is the mean over seeds, epoch by epoch.
    poly = acc_ax.lines[2]
    assert list(poly.get_xdata()) == list(range(EPOCHS))
    expected = [sum(_val_curve("nst_poly", s, e)[1] for s in range(3)) / 3 for e in range(EPOCHS)]
    assert list(poly.get_ydata()) == pytest.approx(expected)
    assert "loss" in loss_ax.get_title().lower() and "accuracy" in acc_ax.get_title().lower()


def test_swept_configuration_gets_its_own_rows(tmp_path: Path) -> None:
    for job, (weight, seed, acc) in enumerate([(10, 0, 0.8), (10, 1, 0.9), (50, 0, 0.7)]):
        overrides = ["+experiment=nst_poly", f"module.nst.weight={weight}", f"seed={seed}"]
        _stage(
            tmp_path / f"{job}", "nst_poly", "nst_poly", "student", seed, "resnet18", acc, 0.9,
            overrides=overrides, curves=False,
        )  # fmt: skip
    rows = report.student_rows(report.collect_runs([tmp_path]))
    assert [(r["config"], r["n"]) for r in rows] == [
        ("module.nst.weight=10", 2),
        ("module.nst.weight=50", 1),
    ]
    assert rows[0]["acc_mean"] == pytest.approx(0.85) and rows[1]["acc_std"] == 0.0


def test_paper_order_then_alphabetical(tmp_path: Path) -> None:
    methods = ["supervised", "nst_poly_ta", "kd", "attention", "base", "nst_gaussian"]
    for method in methods:
        _stage(tmp_path / method, method, method, "student", 0, "resnet18", 0.8, 0.9, curves=False)
    rows = report.student_rows(report.collect_runs([tmp_path]))
    assert [r["method"] for r in rows] == [
        "base", "nst_gaussian", "kd", "nst_poly_ta", "attention", "supervised"
    ]  # fmt: skip


def test_overrides_without_pyyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _stage(
        tmp_path / "job", "base", "base", "student", 0, "resnet18", 0.8, 0.9,
        overrides=["module.lr=0.01", "'chain.seeds=[0,1]'"], curves=False,
    )  # fmt: skip
    expected = ["module.lr=0.01", "chain.seeds=[0,1]"]
    assert report.read_overrides(run) == expected
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    assert report.read_overrides(run) == expected


def _build_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "2026-01-02_10-00-00"
    jobs = [("0_module.lr=0.1", "0.1", 0.90, 0.97), ("1_module.lr=0.01", "0.01", 0.95, 0.96)]
    jobs += [("2_module.lr=0.001", "0.001", 0.93, 0.99)]
    for job, lr, auroc, best in jobs:
        overrides = [f"module.lr={lr}", "+module.nst.kernel=poly", "seed=0"]
        _stage(
            sweep / job, "nst_poly", "nst_poly", "student", 0, "resnet18", 0.8, auroc,
            overrides=overrides, curves=False, best_val=best,
        )  # fmt: skip
    failed = sweep / "3_module.lr=1.0" / ".hydra"
    failed.mkdir(parents=True)
    (failed / "overrides.yaml").write_text("- module.lr=1.0\n- +module.nst.kernel=poly\n- seed=0\n")
    return sweep


def test_sweep_table_sorted_with_override_columns(tmp_path: Path) -> None:
    sweep = _build_sweep(tmp_path)
    assert report.main([str(sweep), "--sweep", "--metric", "test/auroc"]) == 0
    rows = _csv_rows(sweep / "sweep.csv")
    assert [r["job"] for r in rows] == [
        "1_module.lr=0.01",
        "2_module.lr=0.001",
        "0_module.lr=0.1",
        "3_module.lr=1.0",
    ]
    assert [r["module.lr"] for r in rows] == ["0.01", "0.001", "0.1", "1.0"]
    assert {r["module.nst.kernel"] for r in rows} == {"poly"}
    assert [r["status"] for r in rows] == ["done", "done", "done", "no summary"]
    assert list(rows[0])[:8] == [
        "rank", "job", "status", "method", "seed", "module.lr", "module.nst.kernel", "test/auroc"
    ]  # fmt: skip
    assert float(rows[0]["test/auroc"]) == pytest.approx(0.95)
    assert float(rows[0]["best_val/auroc"]) == pytest.approx(0.96)
    assert rows[3]["test/auroc"] == ""
    md = (sweep / "sweep.md").read_text()
    assert "sorted by test/auroc descending" in md
    assert md.index("1_module.lr=0.01") < md.index("2_module.lr=0.001") < md.index("3_module")


def test_sweep_sorts_by_best_val_and_losses_ascending(tmp_path: Path) -> None:
    sweep = _build_sweep(tmp_path)
    paths = report.write_sweep_table([sweep], tmp_path / "out", "val/auroc")
    assert [r["job"][0] for r in _csv_rows(paths["sweep.csv"])] == ["2", "0", "1", "3"]
    # test/loss = 1 - acc is equal for all three; ties fall back to the job name.
    paths = report.write_sweep_table([sweep], tmp_path / "out", "test/loss")
    assert [r["job"][0] for r in _csv_rows(paths["sweep.csv"])] == ["0", "1", "2", "3"]
    with pytest.raises(report.ReportError, match="no job has metric 'test/nope'"):
        report.write_sweep_table([sweep], tmp_path / "out", "test/nope")


def test_cli_missing_dir_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_run"
    assert report.main([str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(missing) in err and "does not exist" in err


def test_cli_dir_without_summaries_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "logs").mkdir()
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(tmp_path) in err and "no summary.json found" in err
    assert not (tmp_path / "results.md").exists()


def test_cli_corrupt_summary_names_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _stage(tmp_path / "ok", "base", "base", "student", 0, "resnet18", 0.8, 0.9, curves=False)
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text('{"name": "base", "test": {')
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err
    bad.write_text('{"name": "base"}')
    assert report.main([str(tmp_path)]) == 2
    assert "expected a kd_lightning stage summary" in capsys.readouterr().err


def test_outputs_replaced_atomically(tmp_path: Path) -> None:
    _stage(tmp_path / "a", "base", "base", "student", 0, "resnet18", 0.8, 0.9)
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.csv").write_text("stale\n")
    first = report.write_report(report.collect_runs([tmp_path / "a"]), out)
    assert set(first) == {"results.csv", "teachers.csv", "results.md", "curves.png"}
    assert _csv_rows(out / "results.csv")[0]["acc_mean"] == "0.8"
    assert _csv_rows(out / "results.csv")[0]["acc_std"] == "0.0"
    # No temp files left behind next to the outputs.
    assert sorted(p.name for p in out.iterdir()) == sorted(first)
