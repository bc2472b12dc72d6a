"""Kermany's chest_xray folders: scanning train/val/test NORMAL and PNEUMONIA images, patient ids
from file names, and the patient-grouped validation split carved from train."""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.data.sources import SPLITS, class_names

KERMANY_URL = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png"})


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
