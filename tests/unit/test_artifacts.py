"""Run files: atomic writes under a full disk, one-line read errors, directory locks, checkpoint
and config checks, and the CLI's one error line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kd_lightning import artifacts
from kd_lightning.__main__ import error_line
from kd_lightning.artifacts import (
    ArtifactError,
    DiskFullError,
    best_checkpoint,
    read_json,
    read_predictions,
    read_summary,
    write_bytes_atomic,
    write_json_atomic,
)
from kd_lightning.checks import check_checkpoint_file, check_numbers
from kd_lightning.locks import LOCK_FILE, DirectoryInUseError, directory_lock, held_directories

ROOT = Path(__file__).resolve().parents[2]


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, "fsync", fsync)


def test_full_disk_keeps_the_earlier_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    _no_space(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        write_json_atomic(path, {"a": 2})
    assert info.value.errno == errno.ENOSPC
    assert f"cannot write {path}: No space left on device (its earlier version is intact)" in (
        info.value.strerror
    )
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    line = error_line(info.value)
    assert line.startswith("kd_lightning: error: cannot write") and "\n" not in line
    assert "rerun the same command" in line


def test_full_disk_on_a_first_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_space(monkeypatch)
    with pytest.raises(DiskFullError, match="nothing was half-written"):
        write_bytes_atomic(tmp_path / "new.csv", b"x")
    assert not list(tmp_path.iterdir())


def test_other_write_errors_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(artifacts.os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        write_bytes_atomic(tmp_path / "x", b"x")
    assert not isinstance(info.value, DiskFullError)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist; expected"), ("{nope", "is not valid JSON"), ("[1]", "holds a list")],
)
def test_unreadable_summary_is_one_artifact_error(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    if content is None:
        with pytest.raises(ArtifactError, match=expected):
            read_json(tmp_path / "summary.json", "a summary")
        assert read_summary(tmp_path) is None  # an unfinished run
        return
    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(ArtifactError, match=expected):
        read_summary(tmp_path)


def test_malformed_predictions_are_one_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        read_predictions(tmp_path, "test")
    path = tmp_path / "predictions" / "test.csv"
    path.parent.mkdir()
    path.write_text("index,label,logit_0,logit_1,prob_0,prob_1\n0,1,nan,0,0.5,0.5\n")
    with pytest.raises(ArtifactError, match="non-finite logits"):
        read_predictions(tmp_path, "test")
    path.write_text("index,label\n0,1\n")
    with pytest.raises(ArtifactError, match="is malformed"):
        read_predictions(tmp_path, "test")


# ----------------------------------------------------------------------------------------------
# Directory locks


def test_lock_is_reentrant_and_per_directory(tmp_path: Path) -> None:
    study, step = tmp_path / "study", tmp_path / "study" / "step"
    with directory_lock(study, "study directory"):
        with directory_lock(step):  # a chain step inside the chain's process
            with directory_lock(study):  # nested request for a held directory: counts up
                assert held_directories() == [study.resolve(), step.resolve()]
        assert held_directories() == [study.resolve()]
        assert (study / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert held_directories() == []


HOLD = (
    "import sys, time; from kd_lightning.locks import directory_lock\n"
    "with directory_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
)


def test_lock_held_by_another_process_is_refused_and_freed_by_its_death(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryInUseError) as info:
            with directory_lock(tmp_path):
                pass
        message = str(info.value)
        assert f"in use by another kd_lightning process (pid {holder.pid}," in message
        assert str(tmp_path / LOCK_FILE) in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with directory_lock(tmp_path):  # SIGKILL released the flock; the stale pid is replaced
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_secondary_ddp_ranks_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    with directory_lock(tmp_path):
        assert held_directories() == [] and not (tmp_path / LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------
# Checkpoints and numbers


def test_unreadable_checkpoint_names_the_file_and_the_way_on(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 0}, good)
    check_checkpoint_file(good, "checkpoint", "way on")
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ArtifactError) as info:
        check_checkpoint_file(bad, "checkpoint", "move it away, or rerun with resume=false")
    message = str(info.value)
    assert message.startswith(f"checkpoint {bad} is unreadable (")
    assert message.endswith("move it away, or rerun with resume=false") and "\n" not in message
    with pytest.raises(ArtifactError, match="does not exist; way on"):
        check_checkpoint_file(tmp_path / "gone.ckpt", "best checkpoint", "way on")
    plain = tmp_path / "plain.ckpt"
    torch.save([1, 2], plain)
    with pytest.raises(ArtifactError, match="no state_dict in it"):
        check_checkpoint_file(plain, "checkpoint", "way on")


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"module": {"feature_pairs": [{"weight": -5.0}]}}, "module.feature_pairs.0.weight=-5.0"),
        ({"module": {"kd": {"temperature": float("inf")}}}, "module.kd.temperature=inf"),
        ({"module": {"kd": {"temperature": 0.0}}}, "module.kd.temperature=0.0"),
        ({"module": {"nst": {"degree": 0}}}, "module.nst.degree=0: expected an integer >= 1"),
        ({"module": {"nst": {"degree": 2.5}}}, "module.nst.degree=2.5"),
        ({"module": {"nst": {"c": float("nan")}}}, "module.nst.c=nan"),
        ({"module": {"nst": {"sigma2": 0.0}}}, "module.nst.sigma2=0.0"),
        ({"module": {"methods": {"dkd": {"beta": -8.0}}}}, "module.methods.dkd.beta=-8.0"),
        ({"module": {"kd_weight": True}}, "module.kd_weight=True"),
        ({"optimizer": {"lr": float("-inf")}}, "optimizer.lr=-inf"),
        ({"optimizer": {"weight_decay": -1e-4}}, "optimizer.weight_decay=-0.0001"),
    ],
)
def test_out_of_range_numbers_are_refused(tree: dict, expected: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        check_numbers(OmegaConf.create(tree))
    assert str(info.value).startswith(expected)


def test_numbers_in_range_and_nulls_pass() -> None:
    check_numbers(
        OmegaConf.create(
            {
                "module": {
                    "feature_pairs": [{"weight": 0.0}],
                    "nst": {"degree": 2, "c": 0.0, "sigma2": None},
                    "kd": {"temperature": 4.0},
                    "kd_weight": 16,
                    "model": {"weight": -1},  # not a loss setting
                },
                "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
            }
        )
    )


def test_error_line_is_one_line() -> None:
    assert error_line(KeyError("no such key")) == "kd_lightning: error: no such key"
    assert error_line(ValueError("a\nb")) == "kd_lightning: error: a b"


def test_best_checkpoint_follows_a_moved_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "now" / "teacher"
    (run / "checkpoints").mkdir(parents=True)
    gone = str(tmp_path / "before" / "teacher" / "checkpoints" / "best-epoch=003.ckpt")
    summary_file = run / "summary.json"
    assert best_checkpoint({}, summary_file) is None
    # Neither the recorded file nor a moved copy: the recorded path, for the caller's error.
    assert best_checkpoint({"best_checkpoint": gone}, summary_file) == Path(gone)
    (run / "checkpoints" / "best-epoch=003.ckpt").write_bytes(b"x")
    assert best_checkpoint({"best_checkpoint": gone}, summary_file) == (
        run / "checkpoints" / "best-epoch=003.ckpt"
    )
    # The recorded file wins while it exists.
    Path(gone).parent.mkdir(parents=True)
    Path(gone).write_bytes(b"y")
    assert best_checkpoint({"best_checkpoint": gone}, summary_file) == Path(gone)
