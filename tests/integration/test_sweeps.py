"""Real multiruns on the shared X-rays: the committed sweep configs through the joblib launcher,
submitit's local executor and the Optuna sweeper, and the sweep table written at the end."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from kd_lightning.conf_path import config_dir
from tests.cli import TINY, run_cli

# One thread per process: jobs run side by side on 2 shared cores, where more threads only
# oversubscribe them (the joblib launcher sets this in its workers anyway).
ENV = {"OMP_NUM_THREADS": "1"}
# 2 x 2 grid from +sweep=nst_kernel_weight: command-line values replace the config's params.
GRID = ["module.nst.kernel=linear,poly", "module.feature_pairs.0.weight=10,50"]
CELLS = {(kernel, weight) for kernel in ("linear", "poly") for weight in ("10", "50")}


def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ResNet-18 teacher run (TINY budget), trained once per test session."""
    out = tmp_path_factory.getbasetemp() / "tiny_teacher"
    if not (out / "summary.json").is_file():
        args = ["+experiment=teacher", "model=resnet18", *TINY, f"hydra.run.dir={out}"]
        run_cli(args, cwd=out.parent, **ENV)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, shared_npz: Path) -> Path:
    return tiny_teacher(tmp_path_factory)


def _jobs(sweep_dir: Path) -> dict[tuple[str, str], Path]:
    """{(kernel, weight): job dir} from each job's own .hydra/overrides.yaml."""
    jobs = {}
    for overrides in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        values = dict(item.split("=", 1) for item in yaml.safe_load(overrides.read_text()))
        job = overrides.parent.parent
        jobs[(values["module.nst.kernel"], values["module.feature_pairs.0.weight"])] = job
    return jobs


def logged_hparam(run: Path, key: str) -> object:
    """A setting as the run's logger recorded it (logs/hparams.yaml, flat or nested keys)."""
    hparams = yaml.safe_load((run / "logs" / "hparams.yaml").read_text())
    if key in hparams:
        return hparams[key]
    for part in key.split("."):
        hparams = hparams[part]
    return hparams


def _summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> tuple[Path, str]:
    """2 x 2 NST grid, 2 jobs at a time in joblib processes, with the GPU trainer config: on this
    GPU-less machine every job must fall back to CPU."""
    cwd = tmp_path_factory.mktemp("joblib")
    proc = run_cli(
        ["-m", "hydra/launcher=parallel", "trainer=gpu", "trainer.precision=32-true"]
        + ["+sweep=nst_kernel_weight", f"module.teacher={teacher}", *GRID, *TINY]
        + ["hydra.sweep.dir=sweep"],
        cwd=cwd,
        **ENV,
    )
    return cwd / "sweep", proc.stdout + proc.stderr


def test_joblib_2x2_runs_every_cell_in_parallel_on_cpu(
    joblib_sweep: tuple[Path, str], teacher: Path
) -> None:
    sweep_dir, output = joblib_sweep
    assert "Joblib.Parallel(n_jobs=2" in output
    jobs = _jobs(sweep_dir)
    assert set(jobs) == CELLS
    for (kernel, _), job in jobs.items():
        summary = _summary(job)
        assert summary["method"] == f"nst_{kernel}" and summary["role"] == "student"
        assert summary["teacher"] == str(teacher)
        # trainer=gpu without a GPU: launch.py moved the job to CPU, and the logged hparams say so.
        assert "no GPU visible, training on CPU" in (job / "__main__.log").read_text()
        assert logged_hparam(job, "trainer.accelerator") == "cpu"
        # Job dirs are numbered (conf/sweep/table.yaml); the table maps them to their values.
        assert re.fullmatch(r"[0-3]", job.name), job.name


@pytest.mark.slow  # CI runs it (make test-slow); make test stays under 10 min
def test_submitit_local_2x2_matches_joblib(
    tmp_path: Path, teacher: Path, joblib_sweep: tuple[Path, str]
) -> None:
    run_cli(
        ["-m", "hydra/launcher=submitit_local", "+sweep=nst_kernel_weight"]
        + [f"module.teacher={teacher}", *GRID, *TINY]
        + ["hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        **ENV,
    )
    sweep_dir = tmp_path / "sweep"
    jobs = _jobs(sweep_dir)
    assert set(jobs) == CELLS
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    # submitit kept each job's pickled call and its stdout/stderr.
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 4
    # Where a job runs does not change what it computes: same metrics as the joblib jobs.
    joblib_jobs = _jobs(joblib_sweep[0])
    for cell, job in jobs.items():
        ours, theirs = _summary(job)["test"], _summary(joblib_jobs[cell])["test"]
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-4), (cell, key)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_table_lists_every_job_sorted(joblib_sweep: tuple[Path, str], tmp_path: Path) -> None:
    sweep_dir, _ = joblib_sweep
    # Written by the SweepTable callback (conf/sweep/table.yaml) when the multirun ended, sorted
    # by the objective, val/auroc, descending.
    rows = _csv_rows(sweep_dir / "sweep.csv")
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    values = [float(r["best_val/auroc"]) for r in rows]
    assert values == sorted(values, reverse=True)
    for row in rows:
        summary = _summary(sweep_dir / row["job"])
        assert row["method"] == summary["method"]
        assert row["module.nst.kernel"] == summary["method"].removeprefix("nst_")
        assert float(row["test/auroc"]) == pytest.approx(summary["test"]["test/auroc"], abs=1e-6)
        assert float(row["best_val/auroc"]) == pytest.approx(
            summary["best_val"]["val/auroc"], abs=1e-6
        )
    markdown = (sweep_dir / "sweep.md").read_text()
    assert "4 finished of 4 jobs" in markdown and markdown.count("| done |") == 4
    # Re-sorted by another metric with the documented report command; losses sort ascending.
    run_cli(
        [str(sweep_dir), "--sweep", "--metric", "test/loss", "--out", str(tmp_path)],
        cwd=tmp_path,
        module="kd_lightning.report",
    )
    losses = [float(r["test/loss"]) for r in _csv_rows(tmp_path / "sweep.csv")]
    assert len(losses) == 4 and losses == sorted(losses)


@pytest.mark.slow  # CI runs it (make test-slow); make test stays under 10 min
def test_optuna_three_trials_write_best_value_and_params(tmp_path: Path, teacher: Path) -> None:
    run_cli(
        ["-m", "+sweep=optuna_kd_nst", f"module.teacher={teacher}", "hydra.sweeper.n_trials=3"]
        + [*TINY, "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        **ENV,
    )
    sweep_dir = tmp_path / "sweep"
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    params = result["best_params"]
    assert set(params) == {
        "module.kd_weight",
        "module.kd.temperature",
        "module.feature_pairs.0.weight",
    }
    assert 0.5 <= params["module.kd_weight"] <= 16.0
    assert params["module.kd.temperature"] in (1, 2, 4, 8)
    assert 1.0 <= params["module.feature_pairs.0.weight"] <= 100.0
    # The objective is each trial's best validation AUROC (what __main__ returns), maximized.
    trials = [_summary(job) for job in sorted(sweep_dir.glob("[0-9]*"))]
    assert len(trials) == 3
    objective = [t["best_val"]["val/auroc"] for t in trials]
    assert all(math.isfinite(v) for v in objective)
    assert result["best_value"] == pytest.approx(max(objective), abs=1e-6)
    rows = _csv_rows(sweep_dir / "sweep.csv")
    assert len(rows) == 3
    assert [float(r["best_val/auroc"]) for r in rows][0] == pytest.approx(result["best_value"])


def _compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_configs_compose_with_cluster_settings() -> None:
    # No SLURM here: check what submitit would be given (unknown keys fail in the plugin's schema).
    cfg = _compose_hydra(["hydra/launcher=slurm", "+sweep=nst_kernel_weight"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.timeout_min == 240 and launcher.array_parallelism == 16
    ddp = _compose_hydra(["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.num_nodes=2"])
    assert ddp.hydra.launcher.nodes == 2 == ddp.trainer.num_nodes
    assert ddp.hydra.launcher.tasks_per_node == ddp.hydra.launcher.gpus_per_node == 4
    assert (ddp.trainer.strategy, ddp.trainer.devices, ddp.trainer.accelerator) == (
        "ddp",
        -1,
        "gpu",
    )


@pytest.mark.parametrize("sweep", ["nst_kernel_weight", "kd_temperature_weight", "ta_arch"])
def test_grid_sweep_configs_carry_their_params(sweep: str) -> None:
    cfg = _compose_hydra([f"+sweep={sweep}"])
    params = dict(cfg.hydra.sweeper.params)
    expected = {
        "nst_kernel_weight": {"module.nst.kernel", "module.feature_pairs.0.weight"},
        "kd_temperature_weight": {"module.kd.temperature", "module.kd_weight"},
        "ta_arch": {"chain.archs"},
    }[sweep]
    assert set(params) == expected
    assert cfg.hydra.callbacks.sweep_table._target_ == "kd_lightning.launch.SweepTable"
