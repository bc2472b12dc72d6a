"""MedMNIST-format npz files: the official sets and files from medmnist.INFO, the md5-checked
download, and loading with structure checks.

Plain numpy file handling only: no torch, Lightning or Hydra here, so the decode pool's spawned
workers (which import the package) start fast.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.data.sources import SPLITS, class_names

log = logging.getLogger(__name__)

# MedMNIST's official files, URLs, MD5s, label names and tasks come from medmnist.INFO (the
# `medmnist` package's info.py, read without importing the package, which would import torch).
MEDMNIST_SIZES = (28, 64, 128, 224)
MEDMNIST_PACKAGE_HINT = "pip install medmnist"


def _read_medmnist_info() -> dict[str, dict]:
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        return {}
    info_py = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    try:
        tree = ast.parse(info_py.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "INFO" for t in node.targets
            ):
                return dict(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    from medmnist import INFO  # another layout: the package itself (imports torch)

    return dict(INFO)


MEDMNIST_INFO: dict[str, dict] = _read_medmnist_info()


@dataclass(frozen=True)
class MedMNISTSet:
    """One MedMNIST dataset at one published resolution, as medmnist.INFO describes it."""

    flag: str
    size: int
    file: str  # official file name: {flag}.npz (28 px) or {flag}_{size}.npz
    url: str
    md5: str
    task: str
    label_names: tuple[str, ...]
    n_channels: int

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def medmnist_flags() -> list[str]:
    """The 2D MedMNIST flags (the 3D volumes are not images this code reads)."""
    return [f for f in MEDMNIST_INFO if not f.endswith("3d")]


def medmnist_file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_set(flag: str, size: int = 28) -> MedMNISTSet:
    """`data.flag` / `data.size` checked against medmnist.INFO; one-line errors list the choices.

    Multi-label sets (ChestMNIST) are refused: the classifier and metrics are single-label.
    """
    if not MEDMNIST_INFO:
        raise ValueError(f"data.flag={flag!r} needs the medmnist package ({MEDMNIST_PACKAGE_HINT})")
    if flag not in MEDMNIST_INFO or flag.endswith("3d"):
        kind = " (a 3D volume set; only 2D sets are supported)" if flag in MEDMNIST_INFO else ""
        raise ValueError(
            f"unknown data.flag={flag!r}{kind}; expected one of {', '.join(medmnist_flags())}"
        )
    info = MEDMNIST_INFO[flag]
    if isinstance(size, bool) or size not in MEDMNIST_SIZES:
        raise ValueError(
            f"data.size={size!r}: MedMNIST publishes {flag} at {list(MEDMNIST_SIZES)} px only"
        )
    suffix = "" if size == 28 else f"_{size}"
    task = str(info["task"])
    labels = tuple(str(info["label"][k]) for k in sorted(info["label"], key=int))
    found = MedMNISTSet(
        flag=flag,
        size=size,
        file=medmnist_file_name(flag, size),
        url=str(info[f"url{suffix}"]),
        md5=str(info[f"MD5{suffix}"]),
        task=task,
        label_names=labels,
        n_channels=int(info["n_channels"]),
    )
    _check_task(found)
    return found


def _check_task(found: MedMNISTSet) -> None:
    if "multi-label" in found.task:
        raise ValueError(
            f"{found.flag} is multi-label ({found.num_classes} findings per image: {found.task}); "
            "multi-label is not supported yet, choose a single-label data.flag"
        )


_NAME = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?\.npz$")


def npz_medmnist_set(path: str | os.PathLike) -> MedMNISTSet | None:
    """The MedMNIST set a file name stands for ({flag}.npz, {flag}_{size}.npz), else None."""
    match = _NAME.match(Path(path).name)
    if not match or match["flag"] not in medmnist_flags():
        return None
    size = int(match["size"] or 28)
    if size not in MEDMNIST_SIZES:
        return None
    return medmnist_set(match["flag"], size)


def _official_files() -> dict[str, tuple[str, str]]:
    files: dict[str, tuple[str, str]] = {}
    for flag in medmnist_flags():
        info = MEDMNIST_INFO[flag]
        for size in MEDMNIST_SIZES:
            suffix = "" if size == 28 else f"_{size}"
            if f"url{suffix}" in info:
                files[medmnist_file_name(flag, size)] = (info[f"url{suffix}"], info[f"MD5{suffix}"])
        # {flag}_28.npz (what data=medmnist's path gives for data.size=28) is the 28 px file.
        files[f"{flag}_28.npz"] = files[f"{flag}.npz"]
    return files


# File name -> (official URL, MD5), for every 2D flag and size.
MEDMNIST_FILES: dict[str, tuple[str, str]] = _official_files()
# Seconds a stalled connection may block; urllib has no timeout of its own and would hang forever.
DOWNLOAD_TIMEOUT_S = 30.0


def npz_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names of an npz: medmnist.INFO's labels for a file named after a flag, else the
    chest X-ray names (`class_names`)."""
    found = npz_medmnist_set(path)
    return list(found.label_names) if found is not None else class_names(num_classes)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def file_md5(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def ensure_npz(path: str | os.PathLike, download: bool = True) -> Path:
    """Return `path` as a Path, downloading the official MedMNIST file there if it is missing.

    The download lands in a temporary folder beside the target and is moved into place only once
    complete and md5-checked, so a failed or interrupted download never leaves a partial file.
    A file that already exists is used as it is (its md5 may differ: see `load_npz`).
    """
    target = Path(path).expanduser()
    found = npz_medmnist_set(target)  # refuses a multi-label set before any download
    if target.is_file():
        return target
    if target.exists():
        raise FileNotFoundError(f"{target} exists but is not a file; expected a MedMNIST .npz file")
    if found is not None and found.file != target.name and (target.parent / found.file).is_file():
        return target.parent / found.file  # {flag}_28.npz is MedMNIST's {flag}.npz
    official = MEDMNIST_FILES.get(target.name)
    if official is None:
        known = ", ".join(f"{f}.npz" for f in medmnist_flags()) or MEDMNIST_PACKAGE_HINT
        raise FileNotFoundError(
            f"{target} is missing and has no official download (known names: {known}, with "
            f"_64/_128/_224 before .npz for larger images); put a MedMNIST-format npz at {target}"
        )
    url, md5 = official
    if not download:
        raise FileNotFoundError(
            f"{target} is missing and download=False; put the file at {target} (official: {url})"
        )
    try:
        _download(url, target, md5)
    except Exception as exc:  # noqa: BLE001 - any failure gets the same actionable message
        raise FileNotFoundError(
            f"{target} is missing and downloading it failed ({_one_line(exc)}); "
            f"put the file at {target} (official: {url})"
        ) from exc
    log.info("downloaded %s to %s", url, target)
    return target


def _download(url: str, target: Path, md5: str) -> None:
    # Imported here: torchvision pulls in torch, which spawned decode workers must not pay for.
    from torchvision.datasets.utils import download_url

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_url(url, str(tmp_dir), target.name, md5)
        os.replace(tmp_dir / target.name, target)
    finally:
        socket.setdefaulttimeout(previous_timeout)
        shutil.rmtree(tmp_dir, ignore_errors=True)


@dataclass(frozen=True)
class ArraySplit:
    """One split held in memory: images (N, H, W) uint8 (grayscale) or (N, H, W, 3) uint8 (RGB
    MedMNIST sets keep their 3 channels) and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray


def load_npz(
    path: str | os.PathLike, num_classes: int = 2, in_channels: int | None = None
) -> dict[str, ArraySplit]:
    """Load and check a MedMNIST-format npz: `{split}_images` (N,H,W) or (N,H,W,3) uint8,
    `{split}_labels` (N,1) or (N,) integers.

    Files whose md5 differs from the official one (such as the shared subset copy) are accepted:
    the structure checks below are what the rest of the code relies on. A file named after a
    MedMNIST flag must hold that set's class count and channels; `in_channels` (the model's)
    refuses RGB images for a one-channel model.
    """
    path = Path(path)
    found = npz_medmnist_set(path)
    if found is not None and num_classes != found.num_classes:
        names = ", ".join(found.label_names)
        raise ValueError(
            f"{path}: {found.flag} has {found.num_classes} classes ({names}); "
            f"set data.num_classes={found.num_classes}"
        )
    expected = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - np.load raises many types for a bad file
        raise ValueError(f"{path}: not a readable npz file ({_one_line(exc)})") from exc
    if not hasattr(archive, "files"):
        raise ValueError(f"{path}: holds a single array, expected an npz with keys {expected}")
    with archive:
        missing = [k for k in expected if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: missing keys {missing}; expected {expected} (found {archive.files})"
            )
        splits = {s: _check_split(path, s, archive, num_classes) for s in SPLITS}
    channels = {s: 3 if d.images.ndim == 4 else 1 for s, d in splits.items()}
    if len(set(channels.values())) > 1:
        raise ValueError(
            f"{path}: splits differ in channels {channels}; expected (N, H, W) uint8 grayscale "
            "in every split or (N, H, W, 3) uint8 RGB in every split"
        )
    n_channels = channels["train"]
    if found is not None and n_channels != found.n_channels:
        raise ValueError(
            f"{path}: images have {n_channels} channel(s) but {found.flag} has "
            f"{found.n_channels}; expected the official layout"
        )
    if in_channels is not None and n_channels == 3 and in_channels != 3:
        raise ValueError(
            f"{path}: 3-channel (RGB) images but model.in_channels={in_channels}; set "
            "model.in_channels=3 (data.in_channels follows it)"
        )
    official = MEDMNIST_FILES.get(path.name)
    if official is not None and file_md5(path) != official[1]:
        log.info("%s: md5 differs from the official file; using it after structure checks", path)
    return splits


def _read(path: Path, archive, key: str) -> np.ndarray:
    try:
        return archive[key]
    except Exception as exc:  # noqa: BLE001 - damaged members and object arrays alike
        raise ValueError(
            f"{path}: cannot read {key} ({_one_line(exc)}); expected a plain numeric array"
        ) from exc


def _check_split(path: Path, split: str, archive, num_classes: int) -> ArraySplit:
    images = _read(path, archive, f"{split}_images")
    labels = _read(path, archive, f"{split}_labels")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (images.ndim == 3 or rgb) or images.dtype != np.uint8:
        raise ValueError(
            f"{path}: {split}_images has shape {images.shape} dtype {images.dtype}; "
            "expected (N, H, W) uint8 grayscale or (N, H, W, 3) uint8 RGB"
        )
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise ValueError(
            f"{path}: {split}_labels has shape {labels.shape}: {labels.shape[1]} labels per "
            "image; expected (N, 1) or (N,) integers (multi-label is not supported yet)"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {split}_labels has shape {labels.shape} dtype {labels.dtype}; "
            "expected (N, 1) or (N,) integers"
        )
    if len(labels) != len(images):
        raise ValueError(
            f"{path}: {split}_labels has {len(labels)} entries but {split}_images has "
            f"{len(images)}; expected one label per image"
        )
    if len(images) == 0:
        raise ValueError(f"{path}: {split}_images is empty; expected at least one image")
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ValueError(
            f"{path}: {split}_labels holds values {bad[:10].tolist()} outside the "
            f"{num_classes} classes 0..{num_classes - 1}"
        )
    return ArraySplit(images=images, labels=labels.astype(np.int64))
