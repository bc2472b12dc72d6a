"""A Kermany-layout chest_xray folder of generated X-ray-sized JPEGs through XRayDataModule:
labels (binary and 3-class), patient-grouped validation, the cache and every folder error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_lightning.data import cache as cache_mod
from kd_lightning.data.datamodule import XRayDataModule

# (split, class folder, file name): names as in the real release, several images per patient,
# one official-val patient (NORMAL2-IM-0200) with an image in train too.
FILES = [
    *[("train", "NORMAL", f"IM-{p:04d}-000{k}.jpeg") for p in (1, 2, 3, 4) for k in (1, 2)],
    *[("train", "NORMAL", f"NORMAL2-IM-{p:04d}-0001.jpeg") for p in (200, 201, 202, 203)],
    *[
        ("train", "PNEUMONIA", f"person{p}_bacteria_{10 * p + k}.jpeg")
        for p in range(1, 7)
        for k in (1, 2)
    ],
    *[("train", "PNEUMONIA", f"person{p}_virus_{10 * p}.jpeg") for p in range(7, 13)],
    ("val", "NORMAL", "NORMAL2-IM-0200-0002.jpeg"),
    ("val", "NORMAL", "NORMAL2-IM-0300-0001.jpeg"),
    ("val", "PNEUMONIA", "person50_bacteria_500.jpeg"),
    ("val", "PNEUMONIA", "person51_virus_510.jpeg"),
    *[("test", "NORMAL", f"IM-{p:04d}-0001.jpeg") for p in (100, 101, 102, 103)],
    *[("test", "PNEUMONIA", f"person{p}_bacteria_{p}.jpeg") for p in (90, 91, 92)],
    *[("test", "PNEUMONIA", f"person{p}_virus_{p}.jpeg") for p in (93, 94, 95)],
]


def _xray(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth, chest-film-like image (dark lungs, bright edges) that JPEG compresses sanely."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2, height / 2
    lungs = np.exp(-(((xx - cx * 0.6) / (width * 0.18)) ** 2 + ((yy - cy) / (height * 0.3)) ** 2))
    lungs += np.exp(-(((xx - cx * 1.4) / (width * 0.18)) ** 2 + ((yy - cy) / (height * 0.3)) ** 2))
    img = 200 - 120 * lungs + rng.normal(0, 4, (height, width)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_folder(base: Path, files=FILES, min_px: int = 800, max_px: int = 2000) -> Path:
    rng = np.random.default_rng(0)
    for i, (split, cls, name) in enumerate(files):
        width = int(rng.integers(min_px, max_px))
        height = int(width * rng.uniform(0.6, 0.95))
        img = Image.fromarray(_xray(rng, width, height), "L")
        if i % 3 == 0:  # the release mixes grayscale and RGB JPEGs
            img = img.convert("RGB")
        folder = base / "chest_xray" / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / name, quality=85)
    return base / "chest_xray"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("kermany"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _relpaths(dm: XRayDataModule, split: str) -> list[str]:
    return [dm.cache.relpaths[i] for i in dm.datasets[split].indices]


def _patient(relpath: str) -> str:
    from kd_lightning.data.kermany import patient_id

    return patient_id(Path(relpath).name)


def test_binary_labels_and_patient_grouped_validation(folder, cache_dir):
    dm = XRayDataModule(
        str(folder.parent), image_size=64, batch_size=8, cache_dir=str(cache_dir), val_fraction=0.2
    )
    dm.prepare_data()
    dm.setup()
    assert dm.cache.built and dm.cache.decoded == len(FILES)
    assert dm.split_counts["test"] == [4, 6]
    assert sum(map(sum, dm.split_counts.values())) == len(FILES)
    train, val = _relpaths(dm, "train"), _relpaths(dm, "val")
    assert not {_patient(r) for r in train} & {_patient(r) for r in val}
    assert sum(r.startswith("val/") for r in val) == 4  # every official val image is in val
    # The official-val patient's train image follows them into val.
    assert "train/NORMAL/NORMAL2-IM-0200-0001.jpeg" in val
    # Stratified: val holds both classes, train keeps both.
    assert min(dm.split_counts["val"]) >= 1 and min(dm.train_counts) >= 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_three_classes_from_file_names(folder, cache_dir):
    dm = XRayDataModule(
        str(folder), image_size=64, num_classes=3, in_channels=3, batch_size=4,
        cache_dir=str(cache_dir),
    )  # fmt: skip
    dm.setup()
    assert dm.class_names == ["normal", "bacteria", "virus"]
    assert dm.split_counts["test"] == [4, 3, 3]
    total = np.sum([dm.split_counts[s] for s in ("train", "val", "test")], axis=0)
    assert total.tolist() == [18, 16, 10]
    assert next(iter(dm.test_dataloader()))[0].shape == (4, 3, 64, 64)


def test_second_datamodule_reads_the_cache_without_decoding(folder, cache_dir, monkeypatch):
    first = XRayDataModule(str(folder), image_size=64, cache_dir=str(cache_dir))
    first.setup()
    npy = first.cache.directory / "images.npy"
    mtime = npy.stat().st_mtime_ns

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a JPEG again")

    monkeypatch.setattr(cache_mod, "decode_image", no_decode)
    second = XRayDataModule(str(folder), image_size=64, cache_dir=str(cache_dir), split_seed=1)
    second.prepare_data()
    second.setup()
    assert not second.cache.built and second.cache.directory == first.cache.directory
    assert npy.stat().st_mtime_ns == mtime
    assert np.array_equal(second.cache.images, first.cache.images)
    assert len(list(cache_dir.iterdir())) == 1  # one cache for this folder at 64 px


def _small_copy(tmp_path: Path, folder: Path) -> Path:
    dst = tmp_path / "chest_xray"
    shutil.copytree(folder, dst)
    return dst


def test_corrupt_image_is_named_or_skipped(folder, tmp_path):
    root = _small_copy(tmp_path, folder)
    bad = root / "train" / "PNEUMONIA" / "person60_bacteria_600.jpeg"
    whole = (root / "test" / "NORMAL" / "IM-0100-0001.jpeg").read_bytes()
    bad.write_bytes(whole[: len(whole) // 4])  # truncated mid-scan, like an interrupted copy
    cdir = tmp_path / "cache"
    with pytest.raises(ValueError, match="cannot decode image") as info:
        XRayDataModule(str(root), cache_dir=str(cdir)).setup()
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    dm = XRayDataModule(str(root), cache_dir=str(cdir), skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\)"):
        dm.setup()
    assert dm.skipped == ["train/PNEUMONIA/person60_bacteria_600.jpeg"]
    assert sum(map(sum, dm.split_counts.values())) == len(FILES)


def test_missing_class_folder_and_empty_split_are_named(folder, tmp_path):
    root = _small_copy(tmp_path, folder)
    shutil.rmtree(root / "test" / "NORMAL")
    with pytest.raises(FileNotFoundError, match="class folder missing") as info:
        XRayDataModule(str(root), cache_dir=str(tmp_path / "c")).setup()
    assert str(root / "test" / "NORMAL") in str(info.value)
    (root / "test" / "NORMAL").mkdir()
    with pytest.raises(ValueError, match="holds no images") as info:
        XRayDataModule(str(root), cache_dir=str(tmp_path / "c")).setup()
    assert str(root / "test" / "NORMAL") in str(info.value)


def test_three_classes_need_bacteria_or_virus_in_pneumonia_names(folder, tmp_path):
    root = _small_copy(tmp_path, folder)
    odd = root / "test" / "PNEUMONIA" / "person99_unknown_1.jpeg"
    shutil.copy(root / "test" / "PNEUMONIA" / "person90_bacteria_90.jpeg", odd)
    with pytest.raises(ValueError, match="exactly one of 'bacteria' or 'virus'") as info:
        XRayDataModule(str(root), num_classes=3, cache_dir=str(tmp_path / "c")).setup()
    assert str(odd) in str(info.value)


def test_missing_folder_points_to_the_release(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*mendeley") as info:
        XRayDataModule(str(tmp_path / "nowhere")).setup()
    assert str(tmp_path / "nowhere") in str(info.value)


def test_predictions_name_each_file_and_three_class_statistics(folder, cache_dir, tmp_path):
    from kd_lightning.artifacts import read_predictions
    from kd_lightning.models.backbones import build_resnet
    from kd_lightning.predict import write_run_predictions
    from kd_lightning.report.statistics import run_statistics

    dm = XRayDataModule(
        str(folder), image_size=64, num_classes=3, batch_size=4, cache_dir=str(cache_dir),
        val_fraction=0.2,
    )  # fmt: skip
    dm.setup()
    torch.manual_seed(0)
    written = write_run_predictions(build_resnet("resnet18", num_classes=3), dm, tmp_path)
    test = read_predictions(tmp_path, "test")
    assert list(test.files) == _relpaths(dm, "test")  # each row names its image file
    assert test.label.tolist() == dm.datasets["test"].labels.tolist()
    assert test.logits.shape == (10, 3) and np.allclose(test.logits, written["test"][1])
    val = read_predictions(tmp_path, "val")
    stats = run_statistics(val.label, val.logits, test.label, test.logits, n_resamples=200)
    assert set(stats["multiclass"]) >= {"acc", "auroc_macro"}
    assert 0.0 <= stats["multiclass"]["acc"]["value"] <= 1.0
