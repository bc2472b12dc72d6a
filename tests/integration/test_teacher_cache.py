"""The content-keyed teacher-output cache: bit-identical to the live teacher, keyed by what
decides the outputs, and every fault (corrupt shard, disk full, racing writers) handled."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from kd_lightning.data.datamodule import XRayDataModule  # noqa: E402
from kd_lightning.distill import KDLoss, NSTLoss  # noqa: E402
from kd_lightning.distill.teacher_cache import TeacherCache  # noqa: E402
from kd_lightning.modules.classifier import ClassifierModule  # noqa: E402
from kd_lightning.modules.distill import DistillModule  # noqa: E402

SMALL = {"arch": "resnet18", "stem": "small", "in_channels": 1}
PAIRS = [
    {"student": "layer3", "teacher": "layer3", "weight": 10.0},
    {"student": "layer4", "teacher": "layer4", "weight": 50.0},
]
LOGGER = "kd_lightning.distill.teacher_cache"


def _transform(rotate: float = 10) -> A.Compose:
    return A.Compose([A.Affine(rotate=(-rotate, rotate), p=0.8), A.RandomBrightnessContrast(p=0.5)])


def _datamodule(npz: Path, rotate: float = 10) -> XRayDataModule:
    # 33 images, batch 8: the last batch of one is dropped, as in real runs.
    dm = XRayDataModule(
        str(npz),
        image_size=16,
        batch_size=8,
        train_subset=33,
        eval_subset=8,
        train_transform=_transform(rotate),
        stream_seed=0,
    )
    dm.setup("fit")
    return dm


def _teacher(tmp_path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    teacher = ClassifierModule({"arch": "resnet34", "stem": "small", "in_channels": 1})
    path = tmp_path / f"teacher{seed}.ckpt"
    torch.save(
        {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path
    )
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("teachers")
    return _teacher(out, 0), _teacher(out, 1)


def _student(teacher: Path, cache_dir: Path | None, pairs=PAIRS, **cache) -> DistillModule:
    config = {"enabled": cache_dir is not None, "dir": str(cache_dir) if cache_dir else None}
    L.seed_everything(0)
    module = DistillModule(
        SMALL,
        str(teacher),
        nst=NSTLoss("poly"),
        feature_pairs=pairs,
        kd=KDLoss(4.0),
        kd_weight=16.0,
        teacher_cache={**config, **cache},
    )
    module.teacher_calls = 0

    def count(*_):
        module.teacher_calls += 1

    module.teacher.register_forward_hook(count)
    return module


def _fit(module: DistillModule, dm: XRayDataModule, tmp_path: Path) -> dict[str, torch.Tensor]:
    L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path,
    ).fit(module, datamodule=dm)
    return {k: v.clone() for k, v in module.model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def live(shared_npz, teachers, tmp_path_factory) -> dict[str, torch.Tensor]:
    return _fit(_student(teachers[0], None), _datamodule(shared_npz), tmp_path_factory.mktemp("r"))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_student_from_the_cache_is_bit_identical_to_the_live_one(
    shared_npz, teachers, live, tmp_path, caplog
):
    cache = tmp_path / "cache"
    writer = _student(teachers[0], cache)
    assert _equal(_fit(writer, _datamodule(shared_npz), tmp_path), live)
    assert writer.teacher_calls == 8 and writer.teacher_cache.stats["live_batches"] == 8
    reader = _student(teachers[0], cache)
    assert _equal(_fit(reader, _datamodule(shared_npz), tmp_path), live)
    assert reader.teacher_calls == 0 and reader.teacher_cache.stats["hit_batches"] == 8
    assert reader.teacher_cache.dir == writer.teacher_cache.dir
    # A KD-only student of the same seed shares the logits: no teacher forward either.
    kd_only = _student(teachers[0], cache, pairs=[])
    _fit(kd_only, _datamodule(shared_npz), tmp_path)
    assert kd_only.teacher_calls == 0
    names = sorted(p.name for p in (writer.teacher_cache.dir / "e0001").glob("*.json"))
    assert names == ["feat.layer3.json", "feat.layer4.json", "logits.json"]
    assert _warnings(caplog) == []


def test_another_teacher_or_transform_never_uses_the_cache(shared_npz, teachers, tmp_path):
    cache = tmp_path / "cache"
    first = _student(teachers[0], cache)
    _fit(first, _datamodule(shared_npz), tmp_path)
    other_teacher = _student(teachers[1], cache)
    _fit(other_teacher, _datamodule(shared_npz), tmp_path)
    other_transform = _student(teachers[0], cache)
    _fit(other_transform, _datamodule(shared_npz, rotate=20), tmp_path)
    dirs = {m.teacher_cache.dir for m in (first, other_teacher, other_transform)}
    assert len(dirs) == 3
    assert (
        other_teacher.teacher_calls == 8 and other_teacher.teacher_cache.stats["hit_batches"] == 0
    )
    assert other_transform.teacher_calls == 8


def test_a_directory_whose_meta_differs_is_not_used(tmp_path, caplog):
    cache = TeacherCache(tmp_path, {"teacher": "a"}, n_items=4)
    (cache.dir / "meta.json").write_text('{"teacher": "b"}')  # copied by hand from elsewhere
    again = TeacherCache(tmp_path, {"teacher": "a"}, n_items=4)
    assert not again.usable and again.epoch(0, ["logits"]).lookup(torch.arange(2)) is None
    assert len(_warnings(caplog)) == 1 and "another teacher" in _warnings(caplog)[0]


def _fill(cache: TeacherCache, epoch: int, values: torch.Tensor) -> None:
    view = cache.epoch(epoch, ["logits"])
    view.store(torch.arange(len(values)), {"logits": values})
    view.commit()


def test_dtype_and_layout_come_back_as_the_live_teacher_gave_them(tmp_path):
    cache = TeacherCache(tmp_path, {"teacher": "a"}, n_items=6)
    logits = torch.randn(6, 3).to(torch.bfloat16)
    maps = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    view = cache.epoch(0, ["logits", "feat.layer4"])
    view.store(
        torch.tensor([5, 0, 2]), {"logits": logits[[5, 0, 2]], "feat.layer4": maps[[5, 0, 2]]}
    )
    assert view.lookup(torch.tensor([0])) is None  # not committed yet
    view.commit()
    view = cache.epoch(0, ["logits", "feat.layer4"])
    assert view.lookup(torch.tensor([0, 1])) is None  # item 1 was never stored
    got = view.lookup(torch.tensor([2, 5]))
    assert got["logits"].dtype == torch.bfloat16 and torch.equal(got["logits"], logits[[2, 5]])
    assert got["feat.layer4"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got["feat.layer4"], maps[[2, 5]])


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_shard_is_recomputed_with_one_warning(
    shared_npz, teachers, live, tmp_path, caplog, damage
):
    cache = tmp_path / "cache"
    _fit(_student(teachers[0], cache), _datamodule(shared_npz), tmp_path)
    manifest = next(cache.glob("*/e0001/feat.layer4.json"))
    data = manifest.parent / json.loads(manifest.read_text())["file"]
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        data.unlink()
    caplog.clear()
    reader = _student(teachers[0], cache)
    assert _equal(_fit(reader, _datamodule(shared_npz), tmp_path), live)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "feat.layer4 is truncated or corrupt" in warned[0], warned
    assert reader.teacher_calls == 4  # epoch 1 only, whose shard was rewritten
    caplog.clear()
    healed = _student(teachers[0], cache)
    _fit(healed, _datamodule(shared_npz), tmp_path)
    assert healed.teacher_calls == 0 and _warnings(caplog) == []


def test_a_failed_write_falls_back_to_the_live_teacher_with_one_line(
    shared_npz, teachers, live, tmp_path, caplog, monkeypatch
):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", disk_full)
    module = _student(teachers[0], tmp_path / "cache")
    assert _equal(_fit(module, _datamodule(shared_npz), tmp_path), live)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "No space left on device" in warned[0], warned
    assert not list((tmp_path / "cache").glob("*/e*/*.npy"))


def test_two_writers_of_one_unit_leave_a_consistent_cache(tmp_path, caplog):
    values = torch.randn(8, 2)
    a = TeacherCache(tmp_path, {"teacher": "a"}, n_items=8).epoch(0, ["logits"])
    b = TeacherCache(tmp_path, {"teacher": "a"}, n_items=8).epoch(0, ["logits"])
    a.store(torch.arange(8), {"logits": values})
    b.store(torch.arange(4), {"logits": values[:4]})  # b saw half the epoch
    b.commit()
    a.commit()
    got = TeacherCache(tmp_path, {"teacher": "a"}, n_items=8).epoch(0, ["logits"])
    assert torch.equal(got.lookup(torch.arange(8))["logits"], values)
    b.commit()  # nothing left to commit: a no-op
    assert _warnings(caplog) == []


def test_features_over_budget_are_computed_live_logits_always_stored(
    shared_npz, teachers, tmp_path
):
    cache = tmp_path / "cache"
    first = _student(teachers[0], cache, max_gb=0.0)
    _fit(first, _datamodule(shared_npz), tmp_path)
    stored = sorted(p.name for p in (first.teacher_cache.dir / "e0000").glob("*.json"))
    assert stored == ["logits.json"]
    nst = _student(teachers[0], cache, max_gb=0.0)
    _fit(nst, _datamodule(shared_npz), tmp_path)
    assert nst.teacher_calls == 8  # its maps are not cached
    kd_only = _student(teachers[0], cache, pairs=[], max_gb=0.0)
    _fit(kd_only, _datamodule(shared_npz), tmp_path)
    assert kd_only.teacher_calls == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"enabled": "yes"}, "teacher_cache.enabled='yes'"),
        ({"max_gb": -1}, "teacher_cache.max_gb=-1"),
        ({"size": 3}, "expected a mapping with keys enabled, dir, max_gb"),
    ],
)
def test_bad_cache_config_is_one_line(teachers, config, message):
    with pytest.raises(ValueError, match=message):
        DistillModule(SMALL, str(teachers[0]), nst=NSTLoss("poly"), teacher_cache=config)


def test_cache_without_a_deterministic_stream_is_one_line_and_live(
    shared_npz, teachers, tmp_path, caplog
):
    dm = XRayDataModule(
        str(shared_npz),
        image_size=16,
        batch_size=8,
        train_subset=33,
        eval_subset=8,
        deterministic_stream=False,
    )
    dm.setup("fit")
    module = _student(teachers[0], tmp_path / "cache")
    _fit(module, dm, tmp_path)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "deterministic_stream=true" in warned[0]
    assert module.teacher_calls == 8


class _PlainShuffle(XRayDataModule):
    """Indices but a global-RNG shuffle: (epoch, index) would not name the image."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        return torch.utils.data.DataLoader(loader.dataset, batch_size=8, shuffle=True)


def test_a_loader_without_the_epoch_sampler_is_one_line_and_live(
    shared_npz, teachers, tmp_path, caplog
):
    dm = _PlainShuffle(str(shared_npz), image_size=16, batch_size=8, train_subset=32, eval_subset=8)
    dm.setup("fit")
    module = _student(teachers[0], tmp_path / "cache")
    _fit(module, dm, tmp_path)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "RandomSampler at epoch None" in warned[0], warned
    assert module.teacher_calls == 8 and not list((tmp_path / "cache").glob("*/e*"))
