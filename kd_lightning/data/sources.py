"""Where the images come from: MedMNIST npz files and Kermany's chest_xray folders.

Plain numpy/PIL-free file handling only: no torch, Lightning or Hydra here, so the decode pool's
spawned workers (which import the package) start fast.
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
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

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

KERMANY_URL = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
BINARY_CLASSES = ("normal", "pneumonia")
THREE_CLASSES = ("normal", "bacteria", "virus")
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png"})


def npz_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names of an npz: medmnist.INFO's labels for a file named after a flag, else the
    chest X-ray names (`class_names`)."""
    found = npz_medmnist_set(path)
    return list(found.label_names) if found is not None else class_names(num_classes)


def class_names(num_classes: int) -> list[str]:
    """Class names for the binary (normal/pneumonia) or 3-class (normal/bacteria/virus) task."""
    if num_classes == 2:
        return list(BINARY_CLASSES)
    if num_classes == 3:
        return list(THREE_CLASSES)
    raise ValueError(f"num_classes={num_classes!r}: expected 2 (normal/pneumonia) or 3")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def file_md5(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- MedMNIST npz


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


# ----------------------------------------------------------------------------- Kermany folders


@dataclass(frozen=True)
class ImageRecord:
    """One image file of a Kermany-layout folder."""

    relpath: str  # relative to the chest_xray root, '/'-separated
    label: int
    patient: str
    split: str  # the official folder it sits in


_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_IM = re.compile(r"^(.*IM-\d+)-\d+", re.IGNORECASE)


def patient_id(filename: str) -> str:
    """Patient of a Kermany file name: person1_virus_6 -> person1, NORMAL2-IM-1427-0001 ->
    NORMAL2-IM-1427; a name with no recognisable id is its own patient."""
    stem = Path(filename).stem
    for pattern in (_PERSON, _NORMAL_IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def find_kermany_root(path: str | os.PathLike) -> Path:
    """The folder holding train/ and test/: `path` itself or `path`/chest_xray."""
    base = Path(path).expanduser()
    for candidate in (base, base / "chest_xray"):
        if (candidate / "train").is_dir():
            return candidate
    if not base.exists():
        raise FileNotFoundError(
            f"{base} does not exist; expected the Kermany chest_xray folder "
            f"(train/test/val with NORMAL and PNEUMONIA) from {KERMANY_URL}"
        )
    raise FileNotFoundError(
        f"{base}: no train/ folder in it or in {base / 'chest_xray'}; expected "
        "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg"
    )


def _label(path: Path, class_dir: str, num_classes: int) -> int:
    if class_dir == "NORMAL":
        return 0
    if num_classes == 2:
        return 1
    name = path.name.lower()
    kinds = [k for k in ("bacteria", "virus") if k in name]
    if len(kinds) != 1:
        raise ValueError(
            f"{path}: a PNEUMONIA file name must contain exactly one of 'bacteria' or 'virus' "
            "for num_classes=3"
        )
    return 1 if kinds[0] == "bacteria" else 2


def scan_kermany(path: str | os.PathLike, num_classes: int = 2) -> tuple[Path, list[ImageRecord]]:
    """List every image of a Kermany folder, sorted by relative path.

    train/ and test/ must hold non-empty NORMAL and PNEUMONIA folders; val/ (16 images in the
    official release) is optional, since the validation split is carved from train anyway.
    """
    class_names(num_classes)  # validates num_classes
    root = find_kermany_root(path)
    records: list[ImageRecord] = []
    for split in SPLITS:
        split_dir = root / split
        if split == "val" and not split_dir.is_dir():
            continue
        for class_dir in ("NORMAL", "PNEUMONIA"):
            folder = split_dir / class_dir
            if not folder.is_dir():
                if split == "val":
                    continue
                raise FileNotFoundError(
                    f"{folder}: class folder missing; expected {split}/NORMAL and "
                    f"{split}/PNEUMONIA under {root}"
                )
            files = sorted(
                p
                for p in folder.iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not files and split != "val":
                raise ValueError(
                    f"{folder}: holds no images; expected at least one "
                    f"{'/'.join(sorted(IMAGE_EXTENSIONS))} file"
                )
            for file in files:
                records.append(
                    ImageRecord(
                        relpath=file.relative_to(root).as_posix(),
                        label=_label(file, class_dir, num_classes),
                        patient=patient_id(file.name),
                        split=split,
                    )
                )
    records.sort(key=lambda r: r.relpath)
    return root, records


def carve_val(
    records: list[ImageRecord], val_fraction: float, seed: int, num_classes: int
) -> dict[str, list[ImageRecord]]:
    """Split official train+val into train/val by patient, stratified by class; test unchanged.

    Every patient with an image in the official val folder goes to val (so no patient sits in
    both), then whole patients are drawn at random per class until each class has about
    `val_fraction` of its train+val images in val. Each class keeps at least one train patient.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r}: expected a value in [0, 1)")
    pool = [r for r in records if r.split in ("train", "val")]
    test = [r for r in records if r.split == "test"]
    by_patient: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in pool:
        by_patient[r.patient].append(r)
    # A patient is stratified by their most frequent label (ties -> lower label).
    patient_label = {
        p: min(Counter(r.label for r in rs).items(), key=lambda kv: (-kv[1], kv[0]))[0]
        for p, rs in by_patient.items()
    }
    class_total = np.bincount([r.label for r in pool], minlength=num_classes)
    target = np.round(val_fraction * class_total).astype(int)
    val_patients = {r.patient for r in pool if r.split == "val"}
    in_val = np.zeros(num_classes, dtype=int)
    for p in val_patients:
        for r in by_patient[p]:
            in_val[r.label] += 1
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        candidates = sorted(
            p for p, lab in patient_label.items() if lab == c and p not in val_patients
        )
        order = rng.permutation(len(candidates))
        for k in order[: max(len(candidates) - 1, 0)]:
            if in_val[c] >= target[c]:
                break
            p = candidates[k]
            val_patients.add(p)
            for r in by_patient[p]:
                in_val[r.label] += 1
    train = [r for r in pool if r.patient not in val_patients]
    val = [r for r in pool if r.patient in val_patients]
    return {"train": train, "val": val, "test": test}


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of size n with class proportions kept (largest
    remainder), at least one item per present class when n allows."""
    labels = np.asarray(labels)
    if n <= 0:
        raise ValueError(f"subset size {n!r}: expected a positive integer")
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() < n:
        gaps = np.where(take < counts, exact - take, -np.inf)
        take[int(np.argmax(gaps))] += 1
    while take.sum() > n:
        take[int(np.argmax(take))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))
