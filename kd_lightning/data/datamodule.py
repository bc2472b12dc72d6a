"""LightningDataModule over the MedMNIST npz or a Kermany chest_xray folder (resize-once cache)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from kd_lightning.data.cache import ImageCache, build_image_cache
from kd_lightning.data.dataset import EpochSampler, XRayDataset
from kd_lightning.data.kermany import ImageRecord, carve_val, scan_kermany
from kd_lightning.data.npz import (
    ensure_npz,
    load_npz,
    medmnist_set,
    npz_class_names,
    npz_medmnist_set,
)
from kd_lightning.data.sources import SPLITS, class_names, stratified_subset
from kd_lightning.data.transforms import (
    AlbumentationsLike,
    ToNormalizedTensor,
    clahe_stack,
    resize_square,
    transform_fingerprint,
)

log = logging.getLogger(__name__)

# The target of a training image whose label is hidden (data.labeled_fraction < 1): PyTorch's
# cross_entropy default ignore_index, so plain CE skips it without special code.
IGNORE_LABEL = -100


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "None or an integer" if optional else "an integer"
        raise ValueError(f"{name}={value!r}: expected {kind} >= {minimum}")


class XRayDataModule(L.LightningDataModule):
    """Chest X-ray data: a PneumoniaMNIST npz (`path` ends in .npz) or a Kermany folder.

    After `setup()`: `class_names`, `num_classes`, `train_counts` (images per class in train),
    `split_counts`, `class_weights` (inverse-frequency float32 tensor when `class_weighting`, else
    None) and `skipped` (unreadable files left out with `skip_corrupt`). Loaders yield float32
    images (B, in_channels, S, S) normalized as ((x / 255) - mean) / std and int64 labels (B,).
    """

    def __init__(
        self,
        path: str,
        image_size: int = 32,
        num_classes: int = 2,
        in_channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        train_transform: AlbumentationsLike | None = None,
        eval_transform: AlbumentationsLike | None = None,
        cache_dir: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        skip_corrupt: bool = False,
        download: bool = True,
        class_weighting: bool = False,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        clahe: bool = False,
        mean: float = 0.5,
        std: float = 0.5,
        labeled_fraction: float = 1.0,
        labeled_seed: int = 0,
        flag: str | None = None,
        size: int | None = None,
        return_index: bool = False,
        deterministic_stream: bool = True,
        stream_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])
        _check_int("image_size", image_size, 8)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("split_seed", split_seed, 0)
        _check_int("train_subset", train_subset, 1, optional=True)
        _check_int("eval_subset", eval_subset, 1, optional=True)
        if (
            isinstance(labeled_fraction, bool)
            or not isinstance(labeled_fraction, (int, float))
            or not 0.0 < labeled_fraction <= 1.0
        ):
            raise ValueError(
                f"data.labeled_fraction={labeled_fraction!r}: expected a number in (0, 1] "
                "(the fraction of training images that keep their label)"
            )
        _check_int("labeled_seed", labeled_seed, 0)
        _check_int("stream_seed", stream_seed, 0, optional=True)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r}: expected a value in [0, 1)")
        for name, tf in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            if tf is not None and not callable(tf):
                raise ValueError(f"{name}={tf!r}: expected an albumentations Compose or None")
        self.path = str(path)
        self.is_npz = self.path.lower().endswith(".npz")
        # data=medmnist: flag/size checked (unknown flag, unpublished size, multi-label) before
        # anything is read; an npz named after a flag carries its class count and names.
        if flag is not None:
            medmnist_set(flag, 28 if size is None else size)
        medmnist = npz_medmnist_set(self.path) if self.is_npz else None
        if medmnist is not None and num_classes != medmnist.num_classes:
            raise ValueError(
                f"num_classes={num_classes!r} with {self.path}: {medmnist.flag} has "
                f"{medmnist.num_classes} classes; set data.num_classes={medmnist.num_classes}"
                + (
                    " (3 classes, normal/bacteria/virus, need the Kermany folder)"
                    if medmnist.flag == "pneumoniamnist"
                    else ""
                )
            )
        if self.is_npz and medmnist is None and num_classes != 2:
            raise ValueError(
                f"num_classes={num_classes!r} with {self.path}: the npz source has 2 classes "
                "(normal/pneumonia); 3 classes (normal/bacteria/virus) need the Kermany folder"
            )
        if medmnist is not None and medmnist.n_channels == 3 and in_channels != 3:
            raise ValueError(
                f"{self.path}: {medmnist.flag} has 3-channel (RGB) images but "
                f"model.in_channels={in_channels}; set model.in_channels=3"
            )
        if medmnist is not None and medmnist.n_channels == 3 and clahe:
            raise ValueError(f"data.clahe=true needs grayscale images; {medmnist.flag} is RGB")
        self.class_names = (
            npz_class_names(self.path, num_classes) if self.is_npz else class_names(num_classes)
        )
        self.num_classes = num_classes
        self.to_tensor = ToNormalizedTensor(mean, std, in_channels)
        self.image_size, self.in_channels = image_size, in_channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.cache_dir, self.val_fraction, self.split_seed = cache_dir, val_fraction, split_seed
        self.skip_corrupt, self.download = skip_corrupt, download
        self.class_weighting, self.clahe = class_weighting, clahe
        self.train_subset, self.eval_subset = train_subset, eval_subset
        self.labeled_fraction, self.labeled_seed = float(labeled_fraction), labeled_seed
        self.return_index = bool(return_index)
        # Deterministic stream: training order a pure function of (seed, epoch), each item's
        # augmentation of (seed, epoch, index); the seed is `stream_seed`, else torch's initial
        # seed (what seed_everything set) when the training loader is made.
        self.deterministic_stream = bool(deterministic_stream)
        self.stream_seed = stream_seed
        self.labeled_counts: list[int] | None = None

        self.datasets: dict[str, XRayDataset] = {}
        self.class_weights: torch.Tensor | None = None
        self.train_counts: list[int] | None = None
        self.split_counts: dict[str, list[int]] = {}
        # Per split: each item's row in its source split, and its file for folder data (what
        # the per-image predictions record, so they can be traced back to an image).
        self.sample_index: dict[str, np.ndarray] = {}
        self.sample_files: dict[str, list[str] | None] = {}
        self._split_files: dict[str, list[str]] = {}
        self.skipped: list[str] = []
        self.cache: ImageCache | None = None
        self._scanned: tuple[Path, list[ImageRecord]] | None = None

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        """Download the npz if missing, or build the Kermany image cache (rank 0 only)."""
        if self.is_npz:
            ensure_npz(self.path, download=self.download)
        else:
            self._load_folder()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.is_npz:
            arrays = self._load_npz()
        else:
            arrays = self._load_folder()
        for split, (images, indices, labels) in arrays.items():
            subset = self.train_subset if split == "train" else self.eval_subset
            files = self._split_files.get(split)
            if subset is not None:
                keep = stratified_subset(labels, subset, self.split_seed)
                indices, labels = indices[keep], labels[keep]
                files = [files[i] for i in keep] if files is not None else None
            # npz: the row in the split's arrays; folders: the position in the split's sorted list.
            self.sample_index[split] = indices.copy() if files is None else np.arange(len(labels))
            self.sample_files[split] = files
            if self.clahe:
                # Deterministic, so applied once here (train and eval alike), not per item.
                images, indices = clahe_stack(np.asarray(images[indices])), np.arange(len(labels))
            self.split_counts[split] = np.bincount(labels, minlength=self.num_classes).tolist()
            if split == "train":
                labels = self._hide_labels(labels)
            transform = self.train_transform if split == "train" else self.eval_transform
            self.datasets[split] = XRayDataset(
                images,
                indices,
                labels,
                self.to_tensor,
                transform,
                f"{split} transform",
                return_index=self.return_index and split == "train",
            )
        self.train_counts = self.split_counts["train"]
        if self.labeled_fraction >= 1.0:
            self.labeled_counts = self.train_counts
        self.class_weights = self._class_weights() if self.class_weighting else None
        log.info(
            "data %s at %d px: %s (classes %s)",
            self.path,
            self.image_size,
            self.split_counts,
            self.class_names,
        )

    def _load_npz(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        file = ensure_npz(self.path, download=self.download)
        out = {}
        for split, data in load_npz(file, self.num_classes, self.in_channels).items():
            images = resize_square(data.images, self.image_size)
            out[split] = (images, np.arange(len(images)), data.labels)
        return out

    def _load_folder(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        # prepare_data() already scanned and built in this process: setup() reuses that.
        if self._scanned is None:
            root, records = scan_kermany(self.path, self.num_classes)
            self.cache = build_image_cache(
                root,
                [r.relpath for r in records],
                self.image_size,
                cache_dir=self.cache_dir,
                skip_corrupt=self.skip_corrupt,
            )
            self._scanned = (root, records)
        root, records = self._scanned
        self.skipped = sorted(self.cache.failed)
        good = [r for r in records if r.relpath not in self.cache.failed]
        parts = carve_val(good, self.val_fraction, self.split_seed, self.num_classes)
        row = self.cache.index()
        out = {}
        for split in SPLITS:
            if not parts[split]:
                raise ValueError(
                    f"{root}: the {split} split is empty after carving validation "
                    f"(val_fraction={self.val_fraction}); expected at least one image"
                )
            indices = np.array([row[r.relpath] for r in parts[split]], dtype=np.int64)
            labels = np.array([r.label for r in parts[split]], dtype=np.int64)
            self._split_files[split] = [r.relpath for r in parts[split]]
            out[split] = (self.cache.images, indices, labels)
        return out

    def _hide_labels(self, labels: np.ndarray) -> np.ndarray:
        """Label-scarce training: a stratified, seeded `labeled_fraction` of the training images
        keeps its label; the others get IGNORE_LABEL, which cross-entropy skips while every
        distillation term still sees the image. split_counts keep the true counts."""
        if self.labeled_fraction >= 1.0:
            return labels
        n_classes = int(np.count_nonzero(np.bincount(labels, minlength=self.num_classes)))
        n_labeled = int(np.floor(self.labeled_fraction * len(labels)))
        if n_labeled < n_classes:
            raise ValueError(
                f"data.labeled_fraction={self.labeled_fraction!r} keeps {n_labeled} of "
                f"{len(labels)} training images, leaving a class without a labelled image; the "
                f"smallest valid value is {n_classes / len(labels):.6g} (one image per class)"
            )
        keep = stratified_subset(labels, n_labeled, self.labeled_seed)
        hidden = np.full_like(labels, IGNORE_LABEL)
        hidden[keep] = labels[keep]
        self.labeled_counts = np.bincount(labels[keep], minlength=self.num_classes).tolist()
        return hidden

    def _class_weights(self) -> torch.Tensor:
        # Cross-entropy sees only the labelled images: weigh by their counts.
        counts = np.asarray(self.labeled_counts, dtype=np.float64)
        if (counts == 0).any():
            missing = [n for n, c in zip(self.class_names, counts, strict=True) if c == 0]
            raise ValueError(
                f"class_weighting: train split of {self.path} has no images of {missing}; "
                "expected every class present"
            )
        # n / (k * n_c): weights average to 1 over training samples, as sklearn's 'balanced'.
        return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)

    # ------------------------------------------------------------------ loaders
    def resolved_stream_seed(self) -> int:
        """The deterministic stream's seed: data.stream_seed, else torch's initial seed."""
        return int(self.stream_seed if self.stream_seed is not None else torch.initial_seed())

    def use_train_indices(self) -> None:
        """Training items become (image, label, index) (what data.return_index=true gives)."""
        if not self.datasets:
            raise RuntimeError("use_train_indices() called before setup(); call setup() first")
        self.return_index = True
        self.datasets["train"].return_index = True

    def stream_identity(self) -> dict[str, object] | None:
        """What decides the training images a model sees in (epoch, index) under the
        deterministic stream: data file, the resized/CLAHE'd training pixels, normalization,
        augmentation, seed and batching. None without a deterministic stream. Content hashes, so
        a renamed copy of the same data has the same identity and an edited one has another."""
        if not self.deterministic_stream or not self.datasets:
            return None
        dataset = self.datasets["train"]
        pixels = hashlib.sha256()
        rows = np.asarray(dataset.indices)
        for start in range(0, len(rows), 1024):  # chunked: memmapped folder caches can be large
            pixels.update(np.ascontiguousarray(dataset.images[rows[start : start + 1024]]))
        source = Path(self.path)
        return {
            "data_file": _file_sha256(source) if source.is_file() else str(source.resolve()),
            "train_pixels": pixels.hexdigest(),
            "n_train": len(dataset),
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "normalize": [self.to_tensor.mean, self.to_tensor.std],
            "transform": transform_fingerprint(self.train_transform),
            "stream_seed": self.resolved_stream_seed(),
            "batch_size": self.batch_size,
            "drop_last": self._drop_last(len(dataset), shuffle=True),
        }

    def _drop_last(self, n: int, shuffle: bool) -> bool:
        # A last training batch of one image breaks BatchNorm; drop it only in that case.
        return shuffle and n % self.batch_size == 1 and n > 1

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            raise RuntimeError(f"{split}_dataloader() called before setup(); call setup() first")
        dataset = self.datasets[split]
        sampler = None
        if shuffle and self.deterministic_stream:
            seed = self.resolved_stream_seed()
            dataset.stream_seed = seed
            sampler = EpochSampler(len(dataset), seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=self._drop_last(len(dataset), shuffle),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
