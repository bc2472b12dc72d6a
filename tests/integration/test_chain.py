"""Real teacher -> TA -> student chains on the shared X-rays: chain.json, kill, resume, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from tests.cli import TINY, cli_env, run_cli

CHAIN = [
    "+experiment=nst_poly_ta",
    "chain.archs=[resnet50,resnet34,resnet18]",
    "data.path=${data_dir}/pneumoniamnist.npz",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
]


def _chain_json(run: Path) -> dict:
    return json.loads((run / "chain.json").read_text())


@pytest.mark.slow  # CI runs it (make test-slow); make test stays under 10 min
def test_chain_killed_mid_step_resumes_without_repeating(tmp_path: Path, shared_npz: Path) -> None:
    run = tmp_path / "outputs" / "chain"
    args = [*CHAIN, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd_lightning", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill the whole process group once the TA step has finished an epoch but not the step.
    ta_last = run / "resnet34" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 480
    try:
        while not ta_last.exists():
            assert proc.poll() is None, "chain exited before it could be killed"
            assert time.monotonic() < deadline, "TA step never wrote last.ckpt"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "resnet34" / "summary.json").exists(), "TA step finished before the kill"
    state = {s["name"]: s for s in _chain_json(run)["steps"]}
    assert state["resnet50"]["status"] == "done"
    assert state["resnet34"]["status"] == "running"
    teacher_summary = run / "resnet50" / "summary.json"
    teacher_stamp = teacher_summary.stat().st_mtime_ns

    rerun = run_cli(args, cwd=tmp_path)
    assert f"resuming {run / 'resnet34'} from" in rerun.stdout
    assert "step 2/3 resnet34 (resnet34, nst_poly_ta) — elapsed" in rerun.stdout
    assert " resnet50 (" not in rerun.stdout  # the finished teacher is not retrained
    assert teacher_summary.stat().st_mtime_ns == teacher_stamp

    chain = _chain_json(run)
    assert [s["name"] for s in chain["steps"]] == ["resnet50", "resnet34", "resnet18"]
    assert [s["arch"] for s in chain["steps"]] == ["resnet50", "resnet34", "resnet18"]
    assert [s["status"] for s in chain["steps"]] == ["done"] * 3
    assert chain["steps"][0]["teacher"] is None
    assert chain["steps"][1]["teacher"] == str(run / "resnet50")
    assert chain["steps"][2]["teacher"] == str(run / "resnet34")
    for step in chain["steps"]:
        assert Path(step["best_checkpoint"]).is_file()
        assert 0.0 <= step["test"]["test/auroc"] <= 1.0
    # The resumed TA trained 3 epochs in all, not 3 more.
    ta = json.loads((run / "resnet34" / "summary.json").read_text())
    assert ta["epochs"] == 3 and ta["role"] == "ta" and ta["method"] == "nst_poly_ta"

    # A finished chain run again only reports.
    again = run_cli(args, cwd=tmp_path)
    assert "[kd_lightning] study" not in again.stdout and "resnet18" in again.stdout
    # The report: the paper's curves as a real image.
    image = matplotlib.image.imread(run / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert "nst_poly_ta" in (run / "results.md").read_text()


@pytest.mark.parametrize(
    ("teacher", "archs", "expected"),
    [
        ("{bad_ckpt}", "[resnet50,resnet18]", "cannot read teacher checkpoint"),
        ("/no/such/teacher", "[resnet50,resnet18]", "neither a step"),
    ],
)
def test_bad_chain_teacher_stops_before_training(
    tmp_path: Path, shared_npz: Path, teacher: str, archs: str, expected: str
) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    teacher = teacher.replace("{bad_ckpt}", str(bad))
    run = tmp_path / "outputs" / "bad"
    proc = run_cli(
        [*CHAIN, f"chain.archs={archs}", f"chain.teacher={teacher}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kd_lightning: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert not list(run.rglob("last.ckpt"))  # nothing trained


def test_wrong_architecture_teacher_is_refused(tmp_path: Path, shared_npz: Path) -> None:
    teacher_run = tmp_path / "outputs" / "r34"
    run_cli(
        ["+experiment=base", "model=resnet34", *CHAIN[3:], f"hydra.run.dir={teacher_run}"],
        cwd=tmp_path,
    )
    proc = run_cli(
        [
            *CHAIN,
            "chain.archs=[resnet50,resnet18]",
            f"chain.teacher={teacher_run}",
            f"hydra.run.dir={tmp_path / 'outputs' / 'wrong'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "has arch='resnet34'; expected 'resnet50'" in proc.stderr


def test_wandb_offline_run_carries_group_job_type_and_tags(tmp_path: Path, shared_npz) -> None:
    run = tmp_path / "outputs" / "wb"
    run_cli(["+experiment=base", "logger=wandb", *CHAIN[3:], f"hydra.run.dir={run}"], cwd=tmp_path)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline[0])],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        check=True,
    ).stdout
    run_record = next(
        json.loads(line)["run"] for line in records.splitlines() if '"type":"run"' in line
    )
    assert run_record["run_group"] == "base" and run_record["job_type"] == "student"
    assert {"method=base", "arch=resnet18", "seed=0"} <= set(run_record["tags"])
    assert '"data.image_size"' in records  # the flattened config
    assert '"test/auroc"' in records
    # The trust layer's numbers are summary metrics, its pictures images of the run.
    summary = json.loads((run / "summary.json").read_text())
    assert '"stats/test.auroc.low"' in records and '"stats/calibration.temperature"' in records
    assert f"{summary['statistics']['test']['auroc']['low']}" in records
    media = {p.parent.name for p in (offline[0] / "files" / "media" / "images").rglob("*.png")}
    assert media == {"stats"} and len(list(offline[0].glob("files/media/images/stats/*.png"))) == 3


@pytest.mark.slow  # twelve real stages (a ResNet-34 teacher and eleven students), ~3 min
def test_methods_cpu_runs_every_method_from_the_cli(tmp_path: Path, shared_npz: Path) -> None:
    run = tmp_path / "methods"
    fraction = ["chain.axes.labeled_fraction.values=[0.03]"]  # one of the study's two values
    args = ["+experiment=methods_cpu", "chain.seeds=[0]", *fraction, *TINY]
    run_cli([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    # Each method's own loss terms, logged separately (besides train/ce).
    terms = {
        "base": set(),
        "nst_linear": {"nst_layer4"},
        "nst_poly": {"nst_layer4"},
        "nst_gaussian": {"nst_layer4"},
        "kd": {"kd"},
        "nst_poly_kd": {"nst_layer4", "kd"},
        "fitnets": {"fitnets"},
        "at": {"at_layer1", "at_layer2", "at_layer3", "at_layer4"},
        "dkd": {"dkd_tckd", "dkd_nckd"},
        "rkd": {"rkd_distance", "rkd_angle"},
        "crd": {"crd_s", "crd_t"},
    }
    steps = {s["name"]: s for s in _chain_json(run)["steps"]}
    assert set(steps) == {"teacher", *(f"{m}[labeled_fraction=0.03]" for m in terms)}
    assert all(s["status"] == "done" for s in steps.values())
    results = (run / "results.md").read_text()
    for method, own in terms.items():
        assert f"| {method} | resnet18 | 1 | 0 |" in results
        step_dir = run / method / "labeled_fraction_0.03"
        summary = json.loads((step_dir / "summary.json").read_text())
        assert 0.0 <= summary["test"]["test/auroc"] <= 1.0
        assert summary["method"] == method and summary["variant"] == {"labeled_fraction": 0.03}
        header = (step_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
        logged = {c.removeprefix("train/") for c in header if c.startswith("train/")}
        assert logged - {"ce", "loss_epoch", "loss_step"} == own, method
        assert (step_dir / "epoch_test.json").is_file()  # the study's per-epoch test pass
