"""Guard: every number results.md prints with an interval is printed with ITS OWN interval.

A real 8-class run once showed its top-1 ACC (88.63) beside the interval of the class 0 vs rest
binary accuracy ([97.62, 99.25]). Here a binary and an 8-class synthetic study (predictions
files written through kd_lightning.artifacts, summaries as a run writes them) are reported, and
every `v ± s [lo, hi]` cell of every table must hold lo <= v <= hi; for K > 2 the ACC and AUROC
cells must be the top-1 accuracy and the macro one-vs-rest AUROC of the predictions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from kd_lightning import report
from kd_lightning.artifacts import write_predictions
from kd_lightning.report import statistics as st

N_VAL, N_TEST = 240, 320
CELL = re.compile(r"(-?\d+\.\d+) ± (?:—|\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")
SIGNED = re.compile(r"([+-]\d+\.\d+) \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]")


def _labels(n: int, k: int) -> np.ndarray:
    return np.arange(n) % k  # every class present, balanced


def _logits(labels: np.ndarray, k: int, signal: float, rng: np.random.Generator) -> np.ndarray:
    return signal * np.eye(k)[labels] + rng.normal(0, 1, (labels.size, k))


def _summary_test(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """summary.json's test metrics as StageMetrics computes them (sklearn stands in)."""
    k = logits.shape[1]
    probs = st.softmax(logits)
    positive, score = (labels != 0).astype(int), 1 - probs[:, 0]
    pred = (score > 0.5).astype(int)
    out = {
        "test/auroc": roc_auc_score(positive, score),
        "test/sensitivity": float(pred[positive == 1].mean()),
        "test/specificity": float(1 - pred[positive == 0].mean()),
    }
    if k == 2:
        out["test/acc"] = float((pred == labels).mean())
        out["test/f1"] = f1_score(labels, pred)
    else:
        out["test/acc"] = float((probs.argmax(1) == labels).mean())
        out["test/auroc_macro"] = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
        out["test/f1"] = f1_score(labels, probs.argmax(1), average="macro")
    return {key: float(v) for key, v in out.items()}


def _write_run(
    run_dir: Path, name: str, role: str, seed: int, k: int, signal: float, rng
) -> np.ndarray:
    run_dir.mkdir(parents=True)
    val_y, test_y = _labels(N_VAL, k), _labels(N_TEST, k)
    val, test = _logits(val_y, k, signal, rng), _logits(test_y, k, signal, rng)
    write_predictions(run_dir, "val", np.arange(N_VAL), val_y, val)
    write_predictions(run_dir, "test", np.arange(N_TEST), test_y, test)
    summary = {
        "name": name,
        "method": "supervised" if role == "teacher" else name,
        "role": role,
        "seed": seed,
        "model": {"arch": "resnet34" if role == "teacher" else "resnet18", "num_classes": k},
        "data": {"path": f"/nowhere/synthetic{k}.npz", "num_classes": k},
        "test": _summary_test(test_y, test),
    }
    if k > 2:
        summary["class_names"] = [f"type{c}" for c in range(k)]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return test


def _study(root: Path, k: int) -> dict[str, list[np.ndarray]]:
    """base and kd over seeds 0-1 (t intervals), dkd seed 0 and a teacher (bootstrap)."""
    tests: dict[str, list[np.ndarray]] = {}
    plan = [("base", 0, 1.0), ("base", 1, 1.0), ("kd", 0, 1.3), ("kd", 1, 1.2), ("dkd", 0, 1.6)]
    for name, seed, signal in plan:
        rng = np.random.default_rng(100 * seed + len(tests) + k)
        test = _write_run(root / f"{name}_s{seed}", name, "student", seed, k, signal, rng)
        tests.setdefault(name, []).append(test)
    rng = np.random.default_rng(7)
    tests["teacher"] = [_write_run(root / "teacher", "teacher", "teacher", 0, k, 2.0, rng)]
    report.write_report(report.collect_runs([root]), root, evaluation={"bootstrap_resamples": 300})
    return tests


@pytest.fixture(scope="module", params=[2, 8], ids=["binary", "8-class"])
def study(request, tmp_path_factory: pytest.TempPathFactory):
    k = request.param
    root = tmp_path_factory.mktemp(f"intervals{k}")
    return k, root, _study(root, k)


def _tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of results.md as (header, rows of cells)."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|") and current is None:
            current = ([c.strip() for c in line.strip("|").split("|")], [])
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            current[1].append([c.strip() for c in line.strip("|").split("|")])
        elif current is not None:
            tables.append(current)
            current = None
    if current is not None:
        tables.append(current)
    return tables


def test_every_cell_holds_its_own_point_estimate(study) -> None:
    k, root, _ = study
    md = (root / "results.md").read_text()
    checked = 0
    for header, rows in _tables(md):
        for row in rows:
            for title, cell in zip(header, row, strict=True):
                for pattern in (CELL, SIGNED):
                    for match in pattern.finditer(cell):
                        value, low, high = (float(g) for g in match.groups())
                        assert low <= value <= high, f"{title}: {cell} ({row[0]})"
                        checked += 1
            if "95% interval" in header and "seed" in header:  # per-run AUROC: two cells
                value = float(row[2])
                low, high = (float(x) for x in row[3].strip("[]").split(","))
                assert low <= value <= high, row
                checked += 1
    assert checked > 60


def test_students_table_is_labelled_for_what_it_shows(study) -> None:
    k, root, _ = study
    md = (root / "results.md").read_text()
    students = next(t for t in _tables(md) if t[0][0] == "method" and "arch" in t[0])
    header = students[0]
    if k == 2:
        assert header[4:9] == [
            "ACC (%)",
            "AUROC (%)",
            "sensitivity (%)",
            "specificity (%)",
            "F1 (%)",
        ]
        assert "pneumonia score" in md and "class 0" not in md
    else:
        assert header[4:6] == ["ACC top-1 (%)", "AUROC macro OvR (%)"]
        assert header[6] == "sensitivity, class 0 (type0) vs rest (%)"
        assert "## Operating points chosen on validation, applied to test (class 0 (type0)" in md
        assert "### Δ macro AUROC (one-vs-rest)" in md and "### Δ top-1 ACC" in md
        assert "DeLong" not in md  # a binary test of a binary AUROC: not the headline's test


def test_multiclass_acc_and_auroc_cells_are_top1_and_macro_ovr(study) -> None:
    k, root, tests = study
    if k == 2:
        pytest.skip("binary: ACC and AUROC are the positive score's (test_report_trust)")
    md = (root / "results.md").read_text()
    labels = _labels(N_TEST, k)
    tables = _tables(md)
    students = next(t for t in tables if t[0][0] == "method" and "arch" in t[0])
    teachers = next(t for t in tables if t[0][0] == "name")
    cells = {r[0]: (r[4], r[5]) for r in students[1]}
    cells["teacher"] = (teachers[1][0][5], teachers[1][0][6])
    for name, logits_list in tests.items():
        probs = [st.softmax(z) for z in logits_list]
        acc = np.mean([(p.argmax(1) == labels).mean() for p in probs])
        auc = np.mean([roc_auc_score(labels, p, multi_class="ovr", average="macro") for p in probs])
        acc_cell, auc_cell = (CELL.match(c) for c in cells[name])
        assert float(acc_cell.group(1)) == pytest.approx(100 * acc, abs=0.006), name
        assert float(auc_cell.group(1)) == pytest.approx(100 * auc, abs=0.006), name
    # results.csv's acc/auroc columns are the same statistics.
    results = (root / "results.csv").read_text().splitlines()
    header = results[0].split(",")
    dkd = next(line.split(",") for line in results if line.startswith("dkd,"))
    auc = roc_auc_score(labels, st.softmax(tests["dkd"][0]), multi_class="ovr", average="macro")
    assert float(dkd[header.index("auroc_mean")]) == pytest.approx(auc, abs=1e-6)


def test_paired_macro_auroc_bootstrap_matches_the_generic_loop() -> None:
    rng = np.random.default_rng(3)
    labels = _labels(90, 4)
    a = st.softmax(_logits(labels, 4, 1.5, rng))
    b = st.softmax(_logits(labels, 4, 1.0, rng))
    fast = st.paired_bootstrap_macro_auroc(labels, a, b, n_resamples=200, seed=5)
    slow = st.paired_bootstrap(labels, a, b, st.medmnist_auc, n_resamples=200, seed=5)
    for key in ("diff", "low", "high", "p"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12), key
    assert fast["diff"] == pytest.approx(
        roc_auc_score(labels, a, multi_class="ovr") - roc_auc_score(labels, b, multi_class="ovr")
    )
    with pytest.raises(ValueError, match="probs_a"):
        st.paired_bootstrap_macro_auroc(labels, a[:, :2], b[:, :2])
