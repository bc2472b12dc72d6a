"""Faults and bad input on the real CLI and the real shared X-rays: every mistake is one
`kd_lightning: error:` line (exit 2), nothing written earlier is lost, and the rerun resumes.

Faults are injected in a subprocess by `faulty_kd` (written into the test's working directory):
`KD_FAULT_ENOSPC=<file name>:<n>` makes the n-th atomic write of that file fail with ENOSPC at its
fsync (where a real full disk surfaces), `KD_FAULT_NAN=<module>:<Class.method>:<n>` makes that
method return NaN from its n-th call on. Then it runs `python -m kd_lightning` unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_lightning.locks import LOCK_FILE, directory_lock
from tests.cli import ROOT, TINY, cli_env, run_cli

FAULTY = """
import errno, importlib, os, runpy

import kd_lightning.artifacts as artifacts

spec = os.environ.get("KD_FAULT_ENOSPC")
if spec:
    name, nth = spec.rsplit(":", 1)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if target.startswith(f".{name}.") and target.endswith(".tmp"):
            calls["n"] += 1
            if calls["n"] == int(nth):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    os.fsync = fsync

spec = os.environ.get("KD_FAULT_NAN")
if spec:
    module, attr, nth = spec.split(":")
    owner_name, method = attr.split(".")
    owner = getattr(importlib.import_module(module), owner_name)
    real = getattr(owner, method)
    count = {"n": 0}

    def poisoned(self, *args, **kwargs):
        count["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if count["n"] >= int(nth) else out

    setattr(owner, method, poisoned)

runpy.run_module("kd_lightning", run_name="__main__", alter_sys=True)
"""

BUDGET = [*TINY, "evaluation.bootstrap_resamples=200"]
TWO_EPOCHS = [o for o in BUDGET if not o.startswith("trainer.max_epochs")] + [
    "trainer.max_epochs=2"
]


def _faulty(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    (cwd / "faulty_kd.py").write_text(FAULTY)
    return run_cli(args, cwd=cwd, module="faulty_kd", check=False, **env)


def _one_error(proc: subprocess.CompletedProcess[str], expected: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kd_lightning: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _hydra_stamps(run: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (run / ".hydra").glob("*")}


def _stamps(run: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run.rglob("*")
        if p.is_file() and p.name != LOCK_FILE and p.suffix != ".log" and ".hydra" not in p.parts
    }


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shared_npz: Path) -> Path:
    """A finished ResNet-18 run (32 px, 1 channel, 2 classes) to use as a teacher."""
    cwd = tmp_path_factory.mktemp("faults")
    run = cwd / "teacher"
    run_cli(["+experiment=base", *BUDGET, f"hydra.run.dir={run}"], cwd=cwd)
    return run


# ----------------------------------------------------------------------------------------------
# Numbers out of range anywhere in the loss config, and label fractions


DISTILL = ["+experiment=nst_poly", "module.teacher=/not/looked/up"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [*DISTILL, "module.feature_pairs=[{student: layer4, teacher: layer4, weight: -5.0}]"],
            "module.feature_pairs.0.weight=-5.0: expected a finite number >= 0",
        ),
        ([*DISTILL, "module.kd_weight=nan"], "module.kd_weight=nan: expected a finite number"),
        ([*DISTILL, "module.ce_weight=-1"], "module.ce_weight=-1: expected a finite number >= 0"),
        ([*DISTILL, "module.kd.temperature=0"], "module.kd.temperature=0: expected a finite"),
        ([*DISTILL, "module.kd.temperature=inf"], "module.kd.temperature=inf: expected a finite"),
        ([*DISTILL, "module.nst.degree=0"], "module.nst.degree=0: expected an integer >= 1"),
        ([*DISTILL, "module.nst.c=-1.0"], "module.nst.c=-1.0: expected a finite number >= 0"),
        (
            [*DISTILL, "module.nst.kernel=gaussian", "module.nst.sigma2=-2.0"],
            "module.nst.sigma2=-2.0: expected a finite number > 0",
        ),
        (
            ["+experiment=fitnets", "module.teacher=/x", "module.methods.fitnets.weight=-100"],
            "module.methods.fitnets.weight=-100: expected a finite number >= 0",
        ),
        (
            ["+experiment=rkd", "module.teacher=/x", "module.methods.rkd.angle_weight=inf"],
            "module.methods.rkd.angle_weight=inf: expected a finite number >= 0",
        ),
        (["+experiment=base", "optimizer.lr=-0.001"], "optimizer.lr=-0.001: expected a finite"),
        (["+experiment=base", "optimizer.lr=0"], "optimizer.lr=0: expected a finite number > 0"),
        (["+experiment=base", "optimizer=sgd", "optimizer.momentum=-0.9"], "optimizer.momentum"),
        (["+experiment=base", "data.labeled_fraction=0"], "data.labeled_fraction=0: expected"),
        (["+experiment=base", "data.labeled_fraction=1.5"], "data.labeled_fraction=1.5: expected"),
    ],
)
def test_out_of_range_number_is_one_line(
    tmp_path: Path, shared_npz: Path, overrides: list[str], expected: str
) -> None:
    run = tmp_path / "run"
    proc = run_cli([*overrides, *BUDGET, f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
    _one_error(proc, expected)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("summary.json"))


# ----------------------------------------------------------------------------------------------
# Unreadable or missing checkpoints


def _interrupted_copy(finished: Path, dest: Path) -> Path:
    """A run directory as an interrupted run leaves it: checkpoints, no summary.json."""
    shutil.copytree(finished, dest, ignore=shutil.ignore_patterns(LOCK_FILE))
    for name in ("summary.json", "model.pt"):
        (dest / name).unlink()
    shutil.rmtree(dest / "predictions")
    return dest


def test_truncated_last_checkpoint_is_one_line_and_resume_false_retrains(
    tmp_path: Path, teacher_run: Path
) -> None:
    run = _interrupted_copy(teacher_run, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a truncated copy
    before = _stamps(run)
    assert "checkpoints/last.ckpt" in before
    proc = run_cli(["+experiment=base", *BUDGET, f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
    line = _one_error(proc, f"checkpoint {last} is unreadable")
    assert "move it away" in line and "resume=false" in line
    assert _stamps(run) == before  # nothing rewritten, the broken file kept for inspection
    # The way on works: resume=false trains afresh and finishes.
    run_cli(["+experiment=base", *BUDGET, "resume=false", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("damage", ["truncated", "vanished"])
def test_broken_teacher_best_checkpoint_is_one_line(
    tmp_path: Path, teacher_run: Path, damage: str
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher, ignore=shutil.ignore_patterns(LOCK_FILE))
    summary = json.loads((teacher / "summary.json").read_text())
    best = teacher / "checkpoints" / Path(summary["best_checkpoint"]).name
    summary["best_checkpoint"] = str(best)
    (teacher / "summary.json").write_text(json.dumps(summary))
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[:1000])
        expected = f"teacher checkpoint {best} is unreadable"
    else:
        best.unlink()
        expected = f"teacher checkpoint {best} named in {teacher / 'summary.json'} is missing"
    student = tmp_path / "student"
    proc = run_cli(
        ["+experiment=nst_poly", f"module.teacher={teacher}", *BUDGET, f"hydra.run.dir={student}"],
        cwd=tmp_path,
        check=False,
    )
    line = _one_error(proc, expected)
    assert "retrain the teacher" in line
    assert not list(student.rglob("*.ckpt"))


def test_teacher_run_moved_elsewhere_still_teaches(tmp_path: Path, teacher_run: Path) -> None:
    """summary.json names its checkpoint by absolute path; a study copied to another place (the
    old one deleted) must still teach from the copy's own checkpoints/ folder."""
    teacher = tmp_path / "moved" / "teacher"
    shutil.copytree(teacher_run, teacher, ignore=shutil.ignore_patterns(LOCK_FILE))
    summary = json.loads((teacher / "summary.json").read_text())
    name = Path(summary["best_checkpoint"]).name
    summary["best_checkpoint"] = str(tmp_path / "deleted" / "teacher" / "checkpoints" / name)
    (teacher / "summary.json").write_text(json.dumps(summary))
    student = tmp_path / "student"
    run_cli(
        ["+experiment=nst_poly", f"module.teacher={teacher}", *BUDGET, f"hydra.run.dir={student}"],
        cwd=tmp_path,
    )
    assert json.loads((student / "summary.json").read_text())["method"] == "nst_poly"


# ----------------------------------------------------------------------------------------------
# A teacher trained on other data; a chain step naming a teacher step that does not exist


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.image_size=64"], "was trained with data.image_size=32; this run has data.image_"),
        (["model.in_channels=3"], "was trained with data.in_channels=1; this run has data.in_ch"),
        (["data.num_classes=3"], "was trained with data.num_classes=2; this run has data.num_c"),
    ],
)
@pytest.mark.parametrize("source", ["run_dir", "ckpt"])
def test_teacher_trained_on_other_data_is_refused(
    tmp_path: Path, teacher_run: Path, overrides: list[str], expected: str, source: str
) -> None:
    teacher = str(teacher_run)
    if source == "ckpt":
        teacher = json.loads((teacher_run / "summary.json").read_text())["best_checkpoint"]
    proc = run_cli(
        ["+experiment=nst_poly", f"module.teacher='{teacher}'", *overrides, *BUDGET],
        cwd=tmp_path,
        check=False,
    )
    _one_error(proc, expected)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_chain_step_naming_a_missing_teacher_step_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        [
            "+experiment=paper_cpu",
            "chain.archs=[]",
            "~chain.steps",
            "+chain.steps={s: {teacher: nope, choices: {model: resnet18}}}",
            *BUDGET,
            f"hydra.run.dir={tmp_path / 'study'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    _one_error(proc, "chain step 's': teacher 'nope' is neither a step (['s']) nor an existing")


# ----------------------------------------------------------------------------------------------
# Two processes on one run or study directory

HOLD = (
    "import sys, time; from kd_lightning.locks import directory_lock\n"
    "with directory_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
)


def _holder(directory: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_on_a_run_dir_is_refused_naming_the_holder(
    tmp_path: Path, shared_npz: Path
) -> None:
    run = tmp_path / "run"
    # Long enough (150 batches an epoch) that the second process starts while the first trains.
    longer = [o for o in TWO_EPOCHS if not o.startswith("trainer.limit_train_batches")]
    args = ["+experiment=base", *longer, "trainer.limit_train_batches=150", f"hydra.run.dir={run}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "kd_lightning", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lock, log = run / LOCK_FILE, run / "__main__.log"
        deadline = time.monotonic() + 120
        # Locked (before Hydra saves .hydra/) and in the task (its first log line: after it).
        while not (
            lock.is_file()
            and lock.read_text().strip() == str(first.pid)
            and log.is_file()
            and "Seed set to" in log.read_text()
        ):
            assert first.poll() is None and time.monotonic() < deadline, "first run never locked"
            time.sleep(0.05)
        hydra_files = _hydra_stamps(run)
        assert set(hydra_files) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        # Another seed: had Hydra saved the second process's config, config.yaml would differ.
        second = run_cli([*args, "seed=7"], cwd=tmp_path, check=False)
        _one_error(second, f"run directory {run.resolve()} is in use by another kd_lightning")
        assert f"(pid {first.pid}," in second.stderr
        assert _hydra_stamps(run) == hydra_files  # the lock comes before Hydra writes anything
        # 300 batches: about a minute alone, but over 300 s on a 2-core machine running a study
        # beside the tests (seen once); the bound only stops a hung holder.
        out, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_second_process_on_a_study_dir_is_refused_and_a_killed_holder_frees_it(
    tmp_path: Path,
) -> None:
    study = tmp_path / "study"
    holder = _holder(study)
    args = ["+experiment=nst_poly_ta", "chain.archs=[resnet34,resnet18]", f"hydra.run.dir={study}"]
    try:
        proc = run_cli(args, cwd=tmp_path, check=False)
        _one_error(proc, f"study directory {study.resolve()} is in use by another kd_lightning")
        assert f"(pid {holder.pid}," in proc.stderr
        assert not (study / "chain.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder leaves its lock file (and pid) behind, but not the lock.
    assert (study / LOCK_FILE).read_text().strip() == str(holder.pid)
    with directory_lock(study, "study directory"):
        assert (study / LOCK_FILE).read_text().strip() == str(os.getpid())


@pytest.mark.parametrize(
    ("mode", "what", "args"),
    [
        ("run", "run directory", ["+experiment=base"]),
        ("run", "study directory", ["+experiment=nst_poly_ta", "chain.archs=[resnet34,resnet18]"]),
        ("sweep", "sweep directory", ["-m", "+experiment=base", "seed=0,1"]),
    ],
)
def test_refused_process_writes_nothing_into_the_busy_directory(
    tmp_path: Path, mode: str, what: str, args: list[str]
) -> None:
    """The lock is taken in a Hydra callback (locks.HydraDirectoryLock) before Hydra saves
    .hydra/*.yaml or multirun.yaml and before it opens the job's log file: a refused second
    process leaves the holder's files byte for byte (and mtime) as they were."""
    busy = tmp_path / "busy"
    earlier = {
        ".hydra/config.yaml": b"seed: 0\n",
        ".hydra/hydra.yaml": b"hydra: {}\n",
        ".hydra/overrides.yaml": b"[]\n",
        "__main__.log": b"[holder] a line of the first process\n",
        "multirun.yaml": b"hydra: {}\n",
    }
    for name, data in earlier.items():
        (busy / name).parent.mkdir(parents=True, exist_ok=True)
        (busy / name).write_bytes(data)
    before = {
        str(p.relative_to(busy)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in busy.rglob("*")
        if p.is_file()
    }
    holder = _holder(busy)
    try:
        proc = run_cli([*args, f"hydra.{mode}.dir={busy}"], cwd=tmp_path, check=False)
        line = _one_error(proc, f"{what} {busy.resolve()} is in use by another kd_lightning")
        assert f"(pid {holder.pid}," in line and f"choose another hydra.{mode}.dir" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = {
        str(p.relative_to(busy)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in busy.rglob("*")
        if p.is_file() and p.name != LOCK_FILE
    }
    assert after == before
    assert [p.name for p in busy.iterdir() if p.is_dir()] == [".hydra"]  # no job dir either


# ----------------------------------------------------------------------------------------------
# A full disk: one line, earlier files intact, the rerun after freeing space resumes


@pytest.mark.parametrize(
    ("fault", "earlier"),
    [
        ("last.ckpt:2", True),  # epoch 1's last.ckpt: epoch 0's stays
        ("summary.json:1", False),
        ("test.csv:1", False),  # a first write: no earlier version
        ("model.pt:1", False),
    ],
)
def test_full_disk_is_one_line_and_the_rerun_resumes(
    tmp_path: Path, shared_npz: Path, fault: str, earlier: bool
) -> None:
    run = tmp_path / "run"
    args = ["+experiment=base", *TWO_EPOCHS, f"hydra.run.dir={run}"]
    proc = _faulty(tmp_path, args, KD_FAULT_ENOSPC=fault)
    name = fault.split(":")[0]
    kept = "its earlier version is intact" if earlier else "nothing was half-written"
    line = _one_error(proc, f"No space left on device ({kept})")
    assert f"/{name}: No space" in line and "free some space and rerun" in line
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == (0 if name == "last.ckpt" else 1)
    assert not (run / "summary.json").exists()
    rerun = run_cli(args, cwd=tmp_path)
    assert f"resuming {run} from" in rerun.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and (run / "predictions" / "test.csv").is_file()


def test_full_disk_writing_chain_json_keeps_finished_steps(
    tmp_path: Path, shared_npz: Path
) -> None:
    study = tmp_path / "study"
    args = [
        "+experiment=nst_poly_ta",
        "chain.archs=[resnet34,resnet18]",
        "data.path=${data_dir}/pneumoniamnist.npz",
        "data.image_size=32",
        *BUDGET,
        f"hydra.run.dir={study}",
    ]
    # chain.json writes: step 1 running (1), step 1 done (2), step 2 running (3): the 3rd fails.
    proc = _faulty(tmp_path, args, KD_FAULT_ENOSPC="chain.json:3")
    _one_error(proc, f"cannot write {study}/chain.json: No space left on device")
    chain = json.loads((study / "chain.json").read_text())
    assert [s["status"] for s in chain["steps"]] == ["done", "pending"]
    teacher_summary = (study / "resnet34" / "summary.json").read_bytes()
    rerun = run_cli(args, cwd=tmp_path)
    assert " resnet34 (" not in rerun.stdout  # the finished step is not retrained
    assert (study / "resnet34" / "summary.json").read_bytes() == teacher_summary
    chain = json.loads((study / "chain.json").read_text())
    assert [s["status"] for s in chain["steps"]] == ["done", "done"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("log_file", ["logs/hparams.yaml", "__main__.log"])
def test_full_disk_under_a_logger_is_one_line(
    tmp_path: Path, shared_npz: Path, log_file: str
) -> None:
    """Lightning's CSV logger and Hydra's log file write with a plain `open`, not the atomic
    writer. A real ENOSPC from the kernel: the file is a symlink to /dev/full (every write to
    it fails with ENOSPC; both writers open it for writing and follow the link)."""
    run = tmp_path / "run"
    (run / log_file).parent.mkdir(parents=True, exist_ok=True)
    (run / log_file).symlink_to("/dev/full")
    proc = run_cli(["+experiment=base", *BUDGET, f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
    line = _one_error(proc, f"No space left on device writing {run / log_file}; free some space")
    assert line.endswith("rerun the same command")
    assert "Logging error" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# A loss that becomes NaN


def test_nan_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(
    tmp_path: Path, teacher_run: Path
) -> None:
    run = tmp_path / "student"
    args = ["+experiment=nst_poly", f"module.teacher={teacher_run}", *TWO_EPOCHS]
    # NST's 3rd call is epoch 1's first batch (2 batches an epoch).
    proc = _faulty(
        tmp_path,
        [*args, f"hydra.run.dir={run}"],
        KD_FAULT_NAN="kd_lightning.distill.nst:NSTLoss.forward:3",
    )
    line = _one_error(proc, "training loss became nan at global step 2 (epoch 1, batch 0)")
    assert "non-finite term(s): train/nst_layer4;" in line and "train/ce" not in line
    assert f"last good checkpoint {run / 'checkpoints' / 'last.ckpt'} is kept" in line
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and not (run / "summary.json").exists()
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


# ----------------------------------------------------------------------------------------------
# SIGKILL at many points of a whole study

STUDY = [
    "+experiment=paper_cpu",
    "chain.seeds=[0]",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.deterministic=true",
    "evaluation.bootstrap_resamples=200",
]
STEPS = ("teacher", "base", "nst_linear", "nst_poly", "ta_resnet34", "nst_poly_ta")


def _checkpoint_stamps(study: Path) -> dict[Path, int]:
    """Each step's last.ckpt and its modification time (a new epoch rewrites it)."""
    stamps = {}
    for path in study.glob("*/checkpoints/last.ckpt"):
        with contextlib.suppress(FileNotFoundError):  # being replaced right now
            stamps[path] = path.stat().st_mtime_ns
    return stamps


def _study_results(study: Path) -> tuple[list[tuple], str, dict[str, bytes]]:
    chain = json.loads((study / "chain.json").read_text())
    steps = [(s["name"], s["status"], s["test"]) for s in chain["steps"]]
    weights = {name: (study / name / "model.pt").read_bytes() for name in STEPS}
    return steps, (study / "results.csv").read_text(), weights


@pytest.mark.slow  # ~5 min: a reference study, then the same study killed 12 times
def test_study_killed_many_times_equals_an_uninterrupted_one(
    tmp_path: Path, shared_npz: Path
) -> None:
    reference = tmp_path / "reference"
    run_cli([*STUDY, f"hydra.run.dir={reference}"], cwd=tmp_path)
    expected = _study_results(reference)

    study = tmp_path / "killed"
    args = [sys.executable, "-m", "kd_lightning", *STUDY, f"hydra.run.dir={study}"]
    rng = random.Random(0)
    kills: list[str] = []
    logs: list[str] = []
    while len(kills) < 12:
        log = tmp_path / f"attempt{len(logs)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                args,
                cwd=tmp_path,
                env=cli_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            summaries = set(study.glob("*/summary.json"))
            checkpoints = _checkpoint_stamps(study)
            # In turn: at a random time 1-7 s after the process started work on a step; the
            # moment a step writes a new last.ckpt (so the next attempt must resume, however slow
            # the machine is: on a loaded one every timed kill can land before the first
            # checkpoint); at a step boundary (the moment a step's summary.json appears).
            kind = ("timed", "checkpoint", "boundary")[len(kills) % 3]
            delay = rng.uniform(1.0, 7.0)
            started = None
            while proc.poll() is None:
                text = log.read_text()
                if started is None and "[kd_lightning] study " in text:
                    started = time.monotonic()
                if kind == "boundary" and set(study.glob("*/summary.json")) - summaries:
                    break
                if kind == "checkpoint" and _checkpoint_stamps(study).items() - checkpoints.items():
                    break
                if kind == "timed" and started is not None and time.monotonic() - started > delay:
                    break
                time.sleep(0.02)
            finished = proc.poll() is not None
            if not finished:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logs.append(log.read_text())
        if finished:  # the study ended before this kill: it is complete
            break
        step = (
            logs[-1].rsplit("[kd_lightning] study ", 1)[-1].split(" ")[3]
            if "[kd_lightning] study " in logs[-1]
            else "-"
        )
        kills.append(f"{f'{delay:.1f}s' if kind == 'timed' else kind}@{step}")
    final = run_cli(args[3:], cwd=tmp_path)
    logs.append(final.stdout)
    print(f"kills: {len(kills)}: {kills}")
    assert len(kills) >= 10, kills
    assert len({k.split("@")[1] for k in kills}) >= 3, kills  # spread over several steps

    # No step trained twice from scratch: once a step had a last.ckpt, every later attempt on
    # it resumed; each step's metrics history (kept across resumes) starts at epoch 0 once.
    resumes = sum(text.count("resuming ") for text in logs)
    assert 0 < resumes <= len(kills)
    for name in STEPS:
        logs_dir = study / name / "logs"
        kept = sorted(
            logs_dir.glob("metrics.before-resume-*.csv"),
            key=lambda p: int(p.stem.rsplit("-", 1)[1]),
        )
        files = [*kept, logs_dir / "metrics.csv"]
        epochs = []
        for path in files:
            rows = [line.split(",") for line in path.read_text().splitlines()]
            col = rows[0].index("epoch")
            epochs += [int(float(r[col])) for r in rows[1:] if r[col]]
        assert epochs and epochs[0] == 0, (name, epochs)
        restarts = [i for i in range(1, len(epochs)) if epochs[i] == 0 and epochs[i - 1] > 0]
        assert not restarts, (name, epochs)
    assert _study_results(study) == expected  # bit-identical: test metrics, results.csv, weights
