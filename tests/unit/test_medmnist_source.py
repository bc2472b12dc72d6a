"""MedMNIST by flag: names, URLs, MD5s, labels and tasks from medmnist.INFO, small generated npz
files in the MedMNIST layout for other flags (no network), and the offline download error path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd_lightning.data import npz
from kd_lightning.data.npz import (
    ensure_npz,
    load_npz,
    medmnist_set,
    npz_class_names,
    npz_medmnist_set,
)
from kd_lightning.data.sources import SPLITS

medmnist = pytest.importorskip("medmnist")


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def write_medmnist(path: Path, n_classes: int, channels: int = 1, size: int = 28, n: int = 8):
    """A small npz in MedMNIST's layout: (N, S, S[, 3]) uint8 images, (N, 1) uint8 labels."""
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).reshape(n, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_set_metadata_comes_from_medmnist_info() -> None:
    info = medmnist.INFO["bloodmnist"]
    blood = medmnist_set("bloodmnist", 64)
    assert blood.file == "bloodmnist_64.npz"
    assert (blood.url, blood.md5) == (info["url_64"], info["MD5_64"])
    assert blood.num_classes == 8 and blood.n_channels == 3 and blood.task == "multi-class"
    assert blood.label_names[0] == "basophil"
    pneu = medmnist_set("pneumoniamnist")
    assert pneu.file == "pneumoniamnist.npz" and pneu.label_names == ("normal", "pneumonia")
    # The official-file table the download uses is the same data.
    assert npz.MEDMNIST_FILES["pneumoniamnist.npz"] == (info_url := pneu.url, pneu.md5)
    assert npz.MEDMNIST_FILES["pneumoniamnist_28.npz"] == (info_url, pneu.md5)
    assert npz.MEDMNIST_FILES["octmnist_224.npz"][1] == medmnist.INFO["octmnist"]["MD5_224"]


@pytest.mark.parametrize(
    ("flag", "size", "message"),
    [
        (
            "bloodmnistt",
            28,
            "unknown data.flag='bloodmnistt'; expected one of pathmnist, chestmnist",
        ),
        ("organmnist3d", 28, "a 3D volume set; only 2D sets are supported"),
        ("bloodmnist", 32, "data.size=32: MedMNIST publishes bloodmnist at [28, 64, 128, 224]"),
        ("chestmnist", 28, "chestmnist is multi-label (14 findings"),
    ],
)
def test_bad_flags_and_sizes_are_one_line_errors(flag: str, size: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        medmnist_set(flag, size)
    assert message in str(err.value) and "\n" not in str(err.value)
    if flag == "chestmnist":
        assert "multi-label is not supported yet" in str(err.value)


def test_multiclass_rgb_set_keeps_three_channels_and_its_labels(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npz, "_download", _no_download)
    path = write_medmnist(tmp_path / "bloodmnist.npz", n_classes=8, channels=3)
    # Not the official md5: accepted after the structure checks, as the shared PneumoniaMNIST copy.
    assert npz.file_md5(path) != medmnist_set("bloodmnist").md5
    splits = load_npz(ensure_npz(path), num_classes=8, in_channels=3)
    assert splits["train"].images.shape == (8, 28, 28, 3)
    assert sorted(set(splits["test"].labels.tolist())) == list(range(8))
    assert npz_class_names(path, 8)[7] == "platelet"


def test_multiclass_gray_set_at_64_px(tmp_path) -> None:
    path = write_medmnist(tmp_path / "octmnist_64.npz", n_classes=4, size=64)
    assert npz_medmnist_set(path).flag == "octmnist"
    splits = load_npz(path, num_classes=4, in_channels=1)
    assert splits["val"].images.shape == (8, 64, 64)


def test_rgb_images_into_a_one_channel_model_are_refused(tmp_path) -> None:
    path = write_medmnist(tmp_path / "bloodmnist.npz", n_classes=8, channels=3)
    with pytest.raises(ValueError, match=r"3-channel \(RGB\) images but model.in_channels=1; set"):
        load_npz(path, num_classes=8, in_channels=1)


def test_wrong_class_count_names_the_right_one(tmp_path) -> None:
    path = write_medmnist(tmp_path / "bloodmnist.npz", n_classes=8, channels=3)
    with pytest.raises(ValueError, match=r"bloodmnist has 8 classes \(basophil, .*num_classes=8"):
        load_npz(path, num_classes=2)


def test_multilabel_files_are_refused_before_any_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npz, "_download", _no_download)
    with pytest.raises(ValueError, match="multi-label is not supported yet"):
        ensure_npz(tmp_path / "chestmnist_64.npz")
    # A multi-label file under another name: refused by its labels.
    rng = np.random.default_rng(0)
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (4, 14), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", **arrays)
    with pytest.raises(ValueError, match=r"\(4, 14\): 14 labels per image.*multi-label"):
        load_npz(tmp_path / "mine.npz")


def test_size_28_name_uses_medmnists_own_file_beside_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npz, "_download", _no_download)
    own = write_medmnist(tmp_path / "pneumoniamnist.npz", n_classes=2)
    assert ensure_npz(tmp_path / "pneumoniamnist_28.npz") == own


def test_offline_download_of_another_flag_names_file_and_url(
    tmp_path, monkeypatch, connection_timeouts
) -> None:
    monkeypatch.setattr(npz, "DOWNLOAD_TIMEOUT_S", 3.0)
    target = tmp_path / "dermamnist_128.npz"
    url = medmnist.INFO["dermamnist"]["url_128"]
    try:
        ensure_npz(target)
    except FileNotFoundError as exc:
        assert str(target) in str(exc) and url in str(exc) and "\n" not in str(exc)
        assert not target.exists() and list(tmp_path.iterdir()) == []
    else:  # a machine with network access: the official file must then be complete
        assert npz.file_md5(target) == medmnist.INFO["dermamnist"]["MD5_128"]
    assert set(connection_timeouts) <= {3.0}  # every connection attempt bounded


def test_unknown_file_name_lists_the_flags(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no official download") as err:
        ensure_npz(tmp_path / "mine.npz")
    assert "bloodmnist.npz" in str(err.value) and "\n" not in str(err.value)


def test_sources_stay_torch_free() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kd_lightning.data.npz as s, kd_lightning.data.kermany; "
        "assert s.MEDMNIST_INFO; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_medmnist_config_composes(tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    from kd_lightning.conf_path import config_dir

    overrides = ["data=medmnist", "data.flag=bloodmnist", "data.size=64"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides)
    assert cfg.data.path.endswith("/bloodmnist_64.npz")
    assert medmnist_set(cfg.data.flag, cfg.data.size).file == "bloodmnist_64.npz"
