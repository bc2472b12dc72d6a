"""Resize-once cache: decoding (crop, size, grayscale), reuse without decoding, keying on file
changes, corrupt files, atomic writes and the parallel decode path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_lightning.data import cache as cache_mod
from kd_lightning.data.cache import build_image_cache, decode_image, default_cache_dir


def _jpeg(path: Path, width: int, height: int, seed: int, mode: str = "L") -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 120 + 80 * np.sin(xx / (7 + seed)) * np.cos(yy / 11) + rng.normal(0, 5, (height, width))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "L")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path, quality=90)
    return path


def _folder(root: Path, n: int = 5) -> list[str]:
    rels = []
    for i in range(n):
        rel = f"train/PNEUMONIA/person{i}_bacteria_{i}.jpeg"
        _jpeg(root / rel, 300 + 40 * i, 200 + 30 * i, seed=i, mode="RGB" if i % 2 else "L")
        rels.append(rel)
    return rels


def test_decode_center_crops_to_a_square_grayscale_array(tmp_path):
    # A wide image whose central square is white and whose sides are black.
    img = np.zeros((200, 600), np.uint8)
    img[:, 200:400] = 255
    Image.fromarray(img).convert("RGB").save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out.min() >= 250  # only the white center survives the crop


def test_decode_of_large_jpeg_matches_full_decode(tmp_path):
    path = _jpeg(tmp_path / "big.jpeg", 1600, 1200, seed=3, mode="RGB")
    fast = decode_image(path, 64).astype(np.float32)
    with Image.open(path) as img:  # reference: full-resolution decode, then the same crop/resize
        gray = img.convert("L")
    ref = np.asarray(gray.crop((200, 0, 1400, 1200)).resize((64, 64), Image.Resampling.BILINEAR))
    # draft mode decodes at reduced DCT scale: close to the full decode, not bit-identical.
    assert np.abs(fast - ref).mean() < 3.0


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KD_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "kd_lightning"


def test_second_build_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    root, cdir = tmp_path / "chest_xray", tmp_path / "cache"
    rels = _folder(root)
    first = build_image_cache(root, rels, 32, cache_dir=cdir)
    assert first.built and first.decoded == 5 and first.images.shape == (5, 32, 32)
    expected = np.stack([decode_image(root / r, 32) for r in rels])
    assert np.array_equal(first.images, expected)
    npy = first.directory / "images.npy"
    mtime = npy.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "decode_image", boom)
    second = build_image_cache(root, rels, 32, cache_dir=cdir)
    assert not second.built and second.directory == first.directory
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(second.images, expected)
    assert npy.stat().st_mtime_ns == mtime
    assert [p.name for p in cdir.iterdir()] == [first.directory.name]  # no temp folders left


def test_cache_key_changes_with_size_and_file_changes(tmp_path):
    root, cdir = tmp_path / "chest_xray", tmp_path / "cache"
    rels = _folder(root, n=3)
    a = build_image_cache(root, rels, 32, cache_dir=cdir)
    b = build_image_cache(root, rels, 48, cache_dir=cdir)
    assert b.built and b.images.shape == (3, 48, 48) and b.directory != a.directory
    stat = (root / rels[0]).stat()
    os.utime(root / rels[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    c = build_image_cache(root, rels, 32, cache_dir=cdir)
    assert c.built and c.directory != a.directory
    assert (a.directory / "images.npy").is_file()  # the older cache is left untouched


def test_corrupt_file_is_named_and_nothing_is_cached(tmp_path):
    root, cdir = tmp_path / "chest_xray", tmp_path / "cache"
    rels = _folder(root, n=3)
    bad = root / "train/PNEUMONIA/person9_virus_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rels.append("train/PNEUMONIA/person9_virus_1.jpeg")
    with pytest.raises(ValueError, match="cannot decode image") as info:
        build_image_cache(root, rels, 32, cache_dir=cdir)
    assert str(bad) in str(info.value) and "skip_corrupt" in str(info.value)
    assert "\n" not in str(info.value)
    assert list(cdir.iterdir()) == []


def test_truncated_jpeg_is_skipped_and_reported_on_every_load(tmp_path):
    root, cdir = tmp_path / "chest_xray", tmp_path / "cache"
    rels = _folder(root, n=3)
    whole = _jpeg(root / "train/NORMAL/IM-0001-0001.jpeg", 400, 300, seed=7).read_bytes()
    (root / "train/NORMAL/IM-0001-0001.jpeg").write_bytes(whole[: len(whole) // 3])
    rels.append("train/NORMAL/IM-0001-0001.jpeg")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\)"):
        built = build_image_cache(root, rels, 32, cache_dir=cdir, skip_corrupt=True)
    assert list(built.failed) == ["train/NORMAL/IM-0001-0001.jpeg"] and built.decoded == 3
    with pytest.warns(UserWarning, match="skipped 1"):
        again = build_image_cache(root, rels, 32, cache_dir=cdir, skip_corrupt=True)
    assert not again.built
    # The cache remembers the failure: without skip_corrupt the file is named, not ignored.
    with pytest.raises(ValueError, match="IM-0001-0001.jpeg: cannot decode image"):
        build_image_cache(root, rels, 32, cache_dir=cdir)


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "chest_xray"
    rels = _folder(root, n=6)
    serial = build_image_cache(root, rels, 24, cache_dir=tmp_path / "a", workers=1)
    monkeypatch.setattr(cache_mod, "MIN_PARALLEL", 1)
    parallel = build_image_cache(root, rels, 24, cache_dir=tmp_path / "b", workers=2)
    assert parallel.built and np.array_equal(serial.images, parallel.images)


def test_bad_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size=0: expected a positive integer"):
        build_image_cache(tmp_path, [], 0, cache_dir=tmp_path)
