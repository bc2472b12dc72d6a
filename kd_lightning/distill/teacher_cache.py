"""A content-keyed on-disk cache of a frozen teacher's outputs per (epoch, sample index) (plain
torch + numpy).

Under the deterministic data stream (data.deterministic_stream) the training image of sample i in
epoch e of seed s, and the batch it sits in, are pure functions of (s, e, i), so every student of
a seed sees the same teacher inputs: the teacher's logits and hooked feature maps can be computed
once per study and read back by every later student, bit for bit.

Layout: ``<root>/<key>/meta.json`` (the identity the key hashes) and per epoch
``<key>/e0003/<name>.json`` (a manifest: the data file, its sha256, shape, dtype, memory layout and
which items are filled) beside ``<name>.<token>.npy`` (float32, one row per training item, read
as a numpy memmap). `name` is ``logits`` or ``feat.<layer>``; each is its own unit, so a KD-only
student shares the logits with an NST student that adds ``feat.layer4``.

The key hashes everything that decides the outputs: the teacher's weights file, the training
images (data file, resized pixels, normalization), the augmentation config and library versions,
the stream seed, batching, precision, memory layout, device and torch version. The hooked layers
are not in the key: each layer is its own unit.

Faults: a manifest is the commit (written to a temp file, then ``os.replace``), and each writer
fills its own uniquely named data file, so concurrent writers never corrupt each other; a unit
whose file is missing, truncated or fails its sha256 is recomputed with one warning line; any
OSError while writing (disk full) drops writing for the rest of the run, with one warning line,
and training goes on with the live teacher. `max_gb` caps one key's directory: feature units that
would not fit are not stored (computed live); logits always are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CacheEpoch", "TeacherCache", "cache_key", "file_sha256"]

log = logging.getLogger(__name__)

FORMAT = 1
LOGITS = "logits"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(identity: Mapping[str, Any]) -> str:
    """The directory name of an identity: sha256 of its canonical JSON (24 hex digits)."""
    text = json.dumps({"format": FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


class _Unit:
    """One committed (epoch, name) unit opened for reading."""

    def __init__(self, array: np.ndarray, mask: np.ndarray, meta: dict[str, Any]) -> None:
        self.array, self.mask, self.meta = array, mask, meta
        self.dtype = _DTYPES[meta["dtype"]]
        self.channels_last = bool(meta["channels_last"])


class _Writer:
    """A unit being filled this epoch: its own memmap file, committed by its manifest."""

    def __init__(self, folder: Path, name: str, shape: tuple[int, ...], sample: torch.Tensor):
        self.folder, self.name = folder, name
        self.file = folder / f"{name}.{uuid.uuid4().hex[:12]}.npy"
        self.array = np.lib.format.open_memmap(self.file, mode="w+", dtype=np.float32, shape=shape)
        self.mask = np.zeros(shape[0], dtype=bool)
        self.dtype = str(sample.dtype)
        self.channels_last = bool(
            sample.ndim == 4
            and sample.is_contiguous(memory_format=torch.channels_last)
            and not sample.is_contiguous()
        )

    def seed_from(self, unit: _Unit) -> None:
        """Start from what an incomplete committed unit already holds."""
        if unit.array.shape == self.array.shape and unit.meta["dtype"] == self.dtype:
            filled = np.flatnonzero(unit.mask)
            self.array[filled] = unit.array[filled]
            self.mask |= unit.mask

    def store(self, rows: np.ndarray, value: torch.Tensor) -> None:
        self.array[rows] = value.detach().to("cpu", torch.float32).numpy()
        self.mask[rows] = True

    def commit(self) -> None:
        self.array.flush()
        del self.array
        with open(self.file, "rb+") as fh:
            os.fsync(fh.fileno())
        manifest = {
            "format": FORMAT,
            "file": self.file.name,
            "sha256": file_sha256(self.file),
            "bytes": self.file.stat().st_size,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
            "n": int(len(self.mask)),
            "mask": base64.b64encode(np.packbits(self.mask).tobytes()).decode(),
        }
        _atomic_write_text(self.folder / f"{self.name}.json", json.dumps(manifest))

    def abort(self) -> None:
        self.array = None
        try:
            self.file.unlink()
        except OSError:
            pass


class TeacherCache:
    """The cache directory of one identity (teacher, data stream, precision, ...).

    ``TeacherCache(root, identity, n_items, max_gb)``; per epoch ``view = cache.epoch(e, names)``,
    then per batch ``view.lookup(indices)`` (every name's rows, or None) and, after a live teacher
    forward, ``view.store(indices, outputs)``; ``view.commit()`` at the epoch's end.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        identity: Mapping[str, Any],
        n_items: int,
        max_gb: float = 4.0,
    ) -> None:
        if not (isinstance(max_gb, (int, float)) and not isinstance(max_gb, bool) and max_gb >= 0):
            raise ValueError(f"teacher_cache.max_gb={max_gb!r}: expected a number >= 0")
        self.identity = dict(identity)
        self.key = cache_key(self.identity)
        self.dir = Path(root).expanduser() / self.key
        self.n_items = int(n_items)
        self.max_bytes = int(float(max_gb) * 1e9)
        self.writable = True
        self.usable = True
        self.stats = {"hit_batches": 0, "live_batches": 0}
        meta_text = json.dumps({"format": FORMAT, **self.identity}, sort_keys=True, default=str)
        meta = self.dir / "meta.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if meta.is_file():
                if meta.read_text() != meta_text:  # a hash collision or a hand-copied directory
                    log.warning(
                        "teacher cache: %s was written for another teacher/data/transform; "
                        "not using it (live teacher)",
                        self.dir,
                    )
                    self.usable = self.writable = False
            else:
                _atomic_write_text(meta, meta_text)
        except OSError as err:
            self.write_failed(err, "open")

    def write_failed(self, err: OSError, what: str) -> None:
        if self.writable:
            log.warning(
                "teacher cache: cannot write %s in %s (%s: %s); using the live teacher for what "
                "is not cached",
                what,
                self.dir,
                type(err).__name__,
                err,
            )
        self.writable = False

    def epoch(self, epoch: int, names: Sequence[str]) -> CacheEpoch:
        return CacheEpoch(self, int(epoch), list(dict.fromkeys(names)))


class CacheEpoch:
    """One epoch's view: committed units to read, writers for the units that are missing."""

    def __init__(self, cache: TeacherCache, epoch: int, names: list[str]) -> None:
        self.cache, self.epoch, self.names = cache, epoch, names
        self.folder = cache.dir / f"e{epoch:04d}"
        self.units: dict[str, _Unit] = {}
        self.writers: dict[str, _Writer] = {}
        self.skipped: set[str] = set()  # over budget this epoch: live, not stored
        if not cache.usable:
            return
        for name in names:
            unit = self._open(name)
            if unit is not None:
                self.units[name] = unit
        self._used = _dir_bytes(cache.dir) if cache.writable else 0

    def _open(self, name: str) -> _Unit | None:
        manifest = self.folder / f"{name}.json"
        if not manifest.is_file():
            return None
        try:
            meta = json.loads(manifest.read_text())
            data = self.folder / meta["file"]
            n = int(meta["n"])
            if data.stat().st_size != int(meta["bytes"]):
                raise ValueError(f"{data.stat().st_size} bytes, expected {meta['bytes']}")
            if file_sha256(data) != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            array = np.load(data, mmap_mode="r")
            if array.dtype != np.float32 or array.shape[0] != n or n != self.cache.n_items:
                raise ValueError(f"shape {array.shape} dtype {array.dtype}, expected {n} rows")
            mask = np.unpackbits(np.frombuffer(base64.b64decode(meta["mask"]), np.uint8))[:n]
            if meta["dtype"] not in _DTYPES:
                raise ValueError(f"unknown dtype {meta['dtype']!r}")
            return _Unit(array, mask.astype(bool), meta)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            log.warning(
                "teacher cache: %s is truncated or corrupt (%s: %s); recomputing it",
                self.folder / name,
                type(err).__name__,
                err,
            )
            return None

    def lookup(
        self, indices: torch.Tensor, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor] | None:
        """Every name's rows for these dataset indices, as the live teacher gave them, or None
        when any of them is not cached."""
        if len(self.units) < len(self.names):
            return None
        rows = indices.detach().cpu().numpy().astype(np.int64)
        if not all(bool(unit.mask[rows].all()) for unit in self.units.values()):
            return None
        out = {}
        for name, unit in self.units.items():
            value = torch.from_numpy(np.ascontiguousarray(unit.array[rows])).to(device)
            value = value.to(unit.dtype)
            if unit.channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
            out[name] = value
        self.cache.stats["hit_batches"] += 1
        return out

    def store(self, indices: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> None:
        """Write a live batch's outputs into the units this epoch writes."""
        self.cache.stats["live_batches"] += 1
        if not self.cache.writable:
            return
        rows = indices.detach().cpu().numpy().astype(np.int64)
        for name, value in outputs.items():
            if name in self.skipped or not isinstance(value, torch.Tensor):
                continue
            unit = self.units.get(name)
            if unit is not None and bool(unit.mask[rows].all()):
                continue  # already cached (another name was missing for this batch)
            try:
                writer = self.writers.get(name) or self._writer(name, value)
                if writer is not None:
                    writer.store(rows, value)
            except OSError as err:
                self.cache.write_failed(err, f"{name} of epoch {self.epoch}")
                self.abort()
                return

    def _writer(self, name: str, sample: torch.Tensor) -> _Writer | None:
        shape = (self.cache.n_items, *sample.shape[1:])
        planned = 4 * int(np.prod(shape)) + 128
        if name != LOGITS and self._used + planned > self.cache.max_bytes:
            log.info(
                "teacher cache: %s of epoch %d (%.2f GB) would pass max_gb (%.2f GB in use); "
                "computed live",
                name,
                self.epoch,
                planned / 1e9,
                self._used / 1e9,
            )
            self.skipped.add(name)
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        writer = _Writer(self.folder, name, shape, sample)
        if name in self.units:
            writer.seed_from(self.units[name])
        self._used += planned
        self.writers[name] = writer
        return writer

    def commit(self) -> None:
        """Commit every unit written this epoch (manifest last, atomically)."""
        writers, self.writers = self.writers, {}
        for name, writer in writers.items():
            if not self.cache.writable:
                writer.abort()
                continue
            try:
                writer.commit()
            except OSError as err:
                self.cache.write_failed(err, f"{name} of epoch {self.epoch}")
                writer.abort()

    def abort(self) -> None:
        """Drop the uncommitted writers and their files."""
        writers, self.writers = self.writers, {}
        for writer in writers.values():
            writer.abort()
