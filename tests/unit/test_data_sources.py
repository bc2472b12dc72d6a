"""Sources: the MedMNIST npz (real shared file, download failure paths, bad files) and Kermany
file-name parsing, patient-grouped validation carving and stratified subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd_lightning.data import npz
from kd_lightning.data.kermany import ImageRecord, carve_val, patient_id
from kd_lightning.data.npz import ensure_npz, load_npz
from kd_lightning.data.sources import SPLITS, stratified_subset

SHARED_NPZ = Path(__file__).resolve().parents[3] / "shared" / "data" / "pneumoniamnist.npz"
needs_shared = pytest.mark.skipif(not SHARED_NPZ.is_file(), reason=f"{SHARED_NPZ} not present")


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def _write_npz(path: Path, n: int = 6, size: int = 28, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@needs_shared
def test_shared_npz_loads_with_official_splits_and_balance(monkeypatch):
    monkeypatch.setattr(npz, "_download", _no_download)
    # md5 differs from the official file: it must be used as it is, never re-downloaded.
    assert ensure_npz(SHARED_NPZ) == SHARED_NPZ
    splits = load_npz(SHARED_NPZ)
    assert {s: d.images.shape for s, d in splits.items()} == {
        "train": (3882, 28, 28),
        "val": (524, 28, 28),
        "test": (624, 28, 28),
    }
    for data in splits.values():
        assert data.images.dtype == np.uint8
        assert data.labels.dtype == np.int64 and data.labels.ndim == 1
    assert np.bincount(splits["train"].labels).tolist() == [388, 3494]
    assert np.bincount(splits["test"].labels).tolist() == [234, 390]
    assert np.bincount(splits["val"].labels).sum() == 524


def test_local_file_with_other_md5_is_accepted_after_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(npz, "_download", _no_download)
    path = _write_npz(tmp_path / "pneumoniamnist.npz")
    assert npz.file_md5(path) != npz.MEDMNIST_FILES["pneumoniamnist.npz"][1]
    splits = load_npz(ensure_npz(path))
    assert splits["train"].images.shape == (6, 28, 28)
    assert splits["test"].labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_labels_of_shape_n_are_accepted(tmp_path):
    path = _write_npz(tmp_path / "flat.npz", val_labels=np.array([1, 0, 1, 0, 1, 0]))
    assert load_npz(path)["val"].labels.tolist() == [1, 0, 1, 0, 1, 0]


def test_missing_file_download_failure_is_one_line_with_path_and_url(
    tmp_path, monkeypatch, connection_timeouts
):
    # Port 9 (discard) on localhost refuses at once: a failing download without the network.
    bad_url = "http://127.0.0.1:9/pneumoniamnist.npz"
    monkeypatch.setitem(npz.MEDMNIST_FILES, "pneumoniamnist.npz", (bad_url, "0" * 32))
    target = tmp_path / "data" / "pneumoniamnist.npz"
    with pytest.raises(FileNotFoundError) as info:
        ensure_npz(target)
    assert connection_timeouts and set(connection_timeouts) == {npz.DOWNLOAD_TIMEOUT_S}
    message = str(info.value)
    assert "\n" not in message
    assert f"put the file at {target}" in message and bad_url in message
    assert "downloading it failed" in message
    # A failed download leaves nothing behind: no partial file, no temporary folder.
    assert list((tmp_path / "data").iterdir()) == []


def test_official_url_attempt_offline_fails_cleanly_within_timeout(
    tmp_path, monkeypatch, connection_timeouts
):
    monkeypatch.setattr(npz, "DOWNLOAD_TIMEOUT_S", 3.0)
    target = tmp_path / "pneumoniamnist.npz"
    url, md5 = npz.MEDMNIST_FILES["pneumoniamnist.npz"]
    try:
        ensure_npz(target)
    except FileNotFoundError as exc:
        assert str(target) in str(exc) and url in str(exc) and "\n" not in str(exc)
        assert not target.exists()
    else:  # a machine with network access: the official file must then be complete
        assert npz.file_md5(target) == md5
    # The HEAD redirect probe and the https->http retry each connect with the download timeout
    # (a DNS failure may stop before any connection, leaving nothing to check).
    assert set(connection_timeouts) <= {3.0}


def test_missing_file_without_download_names_path_and_url(tmp_path):
    target = tmp_path / "pneumoniamnist_64.npz"
    with pytest.raises(FileNotFoundError, match="download=False") as info:
        ensure_npz(target, download=False)
    assert str(target) in str(info.value)
    assert npz.MEDMNIST_FILES["pneumoniamnist_64.npz"][0] in str(info.value)


def test_missing_unknown_name_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no official download") as info:
        ensure_npz(tmp_path / "mine.npz")
    assert str(tmp_path / "mine.npz") in str(info.value)


def test_missing_keys_are_listed(tmp_path):
    path = _write_npz(tmp_path / "bad.npz", test_images=None, test_labels=None)
    with pytest.raises(ValueError) as info:
        load_npz(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "missing keys ['test_images', 'test_labels']" in message
    assert "train_images" in message  # the expected list is shown


def test_labels_outside_classes_show_bad_values(tmp_path):
    path = _write_npz(tmp_path / "bad.npz", val_labels=np.array([[0], [2], [1], [5], [2], [0]]))
    with pytest.raises(ValueError, match=r"val_labels holds values \[2, 5\] outside") as info:
        load_npz(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"train_images": np.zeros((6, 28, 28), np.float32)}, r"train_images .* float32"),
        ({"train_images": np.zeros((6, 28, 28, 3), np.uint8)}, r"expected \(N, H, W\) uint8"),
        ({"train_labels": np.zeros((5, 1), np.uint8)}, "one label per image"),
        ({"test_labels": np.zeros((6, 2), np.uint8)}, r"expected \(N, 1\) or \(N,\)"),
    ],
)
def test_bad_shapes_and_dtypes_are_rejected(tmp_path, override, pattern):
    path = _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(ValueError, match=pattern):
        load_npz(path)


def test_object_array_member_names_file_and_key(tmp_path):
    labels = np.empty(6, dtype=object)
    labels[:] = [0, 1, 0, 1, 0, 1]
    path = _write_npz(tmp_path / "bad.npz", val_labels=labels)
    with pytest.raises(ValueError, match="cannot read val_labels") as info:
        load_npz(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_npz_names_the_file(tmp_path):
    path = tmp_path / "pneumoniamnist.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable npz") as info:
        load_npz(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("scan.jpeg", "scan"),
    ],
)
def test_patient_id_from_file_names(name, patient):
    assert patient_id(name) == patient


def _records() -> list[ImageRecord]:
    records = []
    for p in range(40):  # 40 normal patients with 1-3 images each
        for k in range(1 + p % 3):
            rel = f"train/NORMAL/IM-{p:04d}-{k}.jpeg"
            records.append(ImageRecord(rel, 0, f"IM-{p:04d}", "train"))
    for p in range(60):  # 60 pneumonia patients with 1-4 images each
        for k in range(1 + p % 4):
            name = f"person{p}_bacteria_{k}.jpeg"
            records.append(ImageRecord(f"train/PNEUMONIA/{name}", 1, f"person{p}", "train"))
    # Official val: a patient also in train, whose train images must follow into val.
    records.append(ImageRecord("val/PNEUMONIA/person5_bacteria_9.jpeg", 1, "person5", "val"))
    records.append(ImageRecord("test/NORMAL/IM-9000-0.jpeg", 0, "IM-9000", "test"))
    return records


def test_carve_val_groups_patients_stratifies_and_is_seeded():
    records = _records()
    parts = carve_val(records, val_fraction=0.2, seed=0, num_classes=2)
    train_patients = {r.patient for r in parts["train"]}
    val_patients = {r.patient for r in parts["val"]}
    assert not train_patients & val_patients
    assert "person5" in val_patients
    assert len(parts["train"]) + len(parts["val"]) == len(records) - 1
    assert [r.relpath for r in parts["test"]] == ["test/NORMAL/IM-9000-0.jpeg"]
    pool = np.bincount([r.label for r in records if r.split != "test"])
    in_val = np.bincount([r.label for r in parts["val"]], minlength=2)
    # Whole patients are added until each class reaches its share, so it overshoots by < 1
    # patient (at most 4 images here).
    assert np.all(in_val >= np.round(0.2 * pool)) and np.all(in_val <= 0.2 * pool + 4)
    again = carve_val(records, val_fraction=0.2, seed=0, num_classes=2)
    assert [r.relpath for r in again["val"]] == [r.relpath for r in parts["val"]]
    other = carve_val(records, val_fraction=0.2, seed=1, num_classes=2)
    assert {r.patient for r in other["val"]} != val_patients


def test_carve_val_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"val_fraction=1.0: expected a value in \[0, 1\)"):
        carve_val(_records(), val_fraction=1.0, seed=0, num_classes=2)


def test_stratified_subset_keeps_class_balance_and_is_seeded():
    labels = np.array([1] * 3494 + [0] * 388)  # the shared train split's order: sorted by label
    idx = stratified_subset(labels, 200, seed=0)
    assert len(idx) == 200 and len(np.unique(idx)) == 200 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [20, 180]  # 388/3882 * 200 = 20.0
    assert np.array_equal(idx, stratified_subset(labels, 200, seed=0))
    assert not np.array_equal(idx, stratified_subset(labels, 200, seed=1))
    tiny = stratified_subset(labels, 3, seed=0)
    assert sorted(np.bincount(labels[tiny]).tolist()) == [1, 2]  # the rare class is kept
    assert len(stratified_subset(labels, 10_000, seed=0)) == len(labels)
    with pytest.raises(ValueError, match="expected a positive integer"):
        stratified_subset(labels, 0, seed=0)
