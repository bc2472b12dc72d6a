"""Resize-once cache: decode each large X-ray JPEG once into a uint8 (N, S, S) array on disk.

Later epochs and later runs read rows of a memory-mapped .npy (~3 us a row) instead of decoding
(~1.5 ms with draft mode, ~7.5 ms without). Only numpy and PIL are imported here, because the
decode pool's spawned workers import this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Bump when decoding changes (crop, filter, draft), so old caches are not reused.
CACHE_VERSION = 1
# Below this many images a spawned pool costs more to start than it saves.
MIN_PARALLEL = 64


def default_cache_dir() -> Path:
    """`$KD_CACHE_DIR`, else `~/.cache/kd_lightning`."""
    env = os.environ.get("KD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kd_lightning"


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image file to a (size, size) uint8 grayscale array.

    Center-crops to a square on the short side before resizing, as MedMNIST made PneumoniaMNIST,
    so a Kermany cache at 28 px matches the npz preprocessing. `draft` lets libjpeg downscale in
    the DCT domain while decoding (about 5x faster on 1-3 Mpx X-rays); it keeps at least 2x the
    target size so the final antialiased resize still does the filtering.
    """
    with Image.open(path) as img:
        img.draft("L", (2 * size, 2 * size))
        gray = img.convert("L")
    width, height = gray.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # crop() first: resize(box=...) would let the filter read pixels just outside the square.
    square = gray.crop((left, top, left + side, top + side))
    small = square.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def _decode_task(task: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str | None]:
    index, path, size = task
    try:
        return index, decode_image(path, size), None
    except Exception as exc:  # noqa: BLE001 - every unreadable file is reported the same way
        return index, None, " ".join(f"{type(exc).__name__}: {exc}".split())


def _decode_all(
    paths: Sequence[str], size: int, workers: int
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    tasks = [(i, p, size) for i, p in enumerate(paths)]
    if workers > 1 and len(tasks) >= MIN_PARALLEL:
        # spawn, not fork: the parent may hold CUDA state or torch threads that fork would copy.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap_unordered(_decode_task, tasks, chunksize=16)
    else:
        yield from map(_decode_task, tasks)


@dataclass
class ImageCache:
    """A built cache: `images[i]` is the decoded `relpaths[i]` (zeros where decoding failed)."""

    directory: Path
    images: np.ndarray
    relpaths: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    built: bool = False  # True when this call decoded the images
    decoded: int = 0
    seconds: float = 0.0

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.relpaths)}


def cache_key(root: Path, relpaths: Sequence[str], size: int) -> str:
    """Hash of the source: folder, file list, each file's size and mtime, target size."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, str(root.resolve()), size]).encode())
    for rel in relpaths:
        st = (root / rel).stat()
        digest.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_image_cache(
    root: str | os.PathLike,
    relpaths: Sequence[str],
    size: int,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
    workers: int | None = None,
) -> ImageCache:
    """Load the cache for these files at this size, decoding them first if it does not exist.

    The cache is written into a temporary folder and renamed into place when complete, so a
    crash leaves no half-written cache and a concurrent builder's result is never overwritten.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"image_size={size!r}: expected a positive integer")
    root = Path(root)
    relpaths = list(relpaths)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = base / f"{root.name}-{cache_key(root, relpaths, size)}-{size}px"
    if not (final / "meta.json").is_file():
        _build(root, relpaths, size, final, skip_corrupt, workers)
        cache = _load(final, relpaths, size)
        cache.built = True
        meta = json.loads((final / "meta.json").read_text())
        cache.decoded, cache.seconds = meta["decoded"], meta["seconds"]
    else:
        cache = _load(final, relpaths, size)
    if cache.failed:
        first_rel, first_reason = next(iter(cache.failed.items()))
        if not skip_corrupt:
            raise ValueError(
                f"{root / first_rel}: cannot decode image ({first_reason}); "
                f"{len(cache.failed)} unreadable file(s) recorded in {final}; "
                "fix or remove them, or set skip_corrupt=true"
            )
        message = (
            f"skipped {len(cache.failed)} unreadable image(s) under {root} "
            f"(first: {first_rel}: {first_reason})"
        )
        log.warning(message)
        warnings.warn(message, stacklevel=2)
    return cache


def _build(
    root: Path,
    relpaths: list[str],
    size: int,
    final: Path,
    skip_corrupt: bool,
    workers: int | None,
) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    start = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(relpaths), size, size)
        )
        failed: dict[str, str] = {}
        paths = [str(root / rel) for rel in relpaths]
        for index, image, error in _decode_all(paths, size, workers):
            if image is not None:
                out[index] = image
                continue
            if not skip_corrupt:
                raise ValueError(
                    f"{paths[index]}: cannot decode image ({error}); fix or remove it, "
                    "or set skip_corrupt=true"
                )
            failed[relpaths[index]] = error or "unknown error"
        out.flush()
        del out
        seconds = time.perf_counter() - start
        meta = {
            "version": CACHE_VERSION,
            "root": str(root.resolve()),
            "size": size,
            "relpaths": relpaths,
            "failed": dict(sorted(failed.items())),
            "decoded": len(relpaths) - len(failed),
            "seconds": round(seconds, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            log.info("%s was built concurrently by another process; using that one", final)
        else:
            rate = len(relpaths) / max(seconds, 1e-9)
            log.info(
                "cached %d images at %d px in %.1f s (%.0f images/s, %d workers) -> %s",
                len(relpaths),
                size,
                seconds,
                rate,
                workers,
                final,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(final: Path, relpaths: list[str], size: int) -> ImageCache:
    try:
        meta = json.loads((final / "meta.json").read_text())
        images = np.load(final / "images.npy", mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - a damaged cache is reported, never silently reused
        raise RuntimeError(
            f"{final}: cache is unreadable ({type(exc).__name__}: {exc}); delete this folder "
            "to rebuild it"
        ) from exc
    expected = (len(relpaths), size, size)
    if images.shape != expected or images.dtype != np.uint8 or meta.get("relpaths") != relpaths:
        raise RuntimeError(
            f"{final}: cache holds {images.shape} {images.dtype} for a different file list, "
            f"expected {expected} uint8; delete this folder to rebuild it"
        )
    return ImageCache(directory=final, images=images, relpaths=relpaths, failed=meta["failed"])
