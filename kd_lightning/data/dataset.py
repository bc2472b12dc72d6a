"""The training stream: the dataset that reads and augments one item, and the sampler whose
order is a pure function of (seed, epoch), so a run replays the same batches with any num_workers
and after a resume."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kd_lightning.data.transforms import (
    AlbumentationsLike,
    ToNormalizedTensor,
    apply_augmentation,
    seed_augmentation,
)

# Tags that keep the stream's two uses of (seed, epoch) apart: the epoch's order, an item's draws.
_ORDER, _ITEM = 0x0DE5, 0x17E3


def stream_seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of non-negative integers (numpy's SeedSequence
    hash: well mixed, the same on every machine, process and worker)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)
    return int(state[0])


class EpochSampler(Sampler):
    """Shuffled training order that is a pure function of (seed, epoch), yielding (epoch, i).

    Lightning's fit loop calls `set_epoch(epoch)` on a loader's sampler at the start of every
    epoch (the hook DistributedSampler uses), so the epoch needs no callback and no dataloader
    reload; a plain loop calls `loader.sampler.set_epoch(e)` itself. The sampler runs in the main
    process and hands each worker (epoch, i), so the item's augmentation is seeded the same with
    any num_workers, also with persistent workers. `shuffle=False` keeps 0..n-1.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(stream_seed(_ORDER, self.seed, epoch) % 2**63)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.n


class XRayDataset(Dataset):
    """Rows `indices` of a uint8 (N, S, S) array (in memory or memory-mapped) with their labels."""

    def __init__(
        self,
        images: np.ndarray,
        indices: np.ndarray,
        labels: np.ndarray,
        to_tensor: ToNormalizedTensor,
        transform: AlbumentationsLike | None = None,
        name: str = "transform",
        return_index: bool = False,
        stream_seed: int | None = None,
    ) -> None:
        self.images, self.indices, self.labels = images, indices, labels
        self.to_tensor, self.transform, self.name = to_tensor, transform, name
        self.return_index = return_index
        # Deterministic stream (not None): item i of epoch e is augmented from a generator seeded
        # by (stream_seed, e, i) alone. `epoch` is the epoch of plain integer keys; EpochSampler
        # keys (epoch, i) carry their own.
        self.stream_seed = stream_seed
        self.epoch = 0
        self._seeded_pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _seed_transform(self) -> None:
        # albumentations 2.x draws from its own generator, not numpy's global one, so
        # seed_everything alone would leave augmentation unseeded. Seed it once per process from
        # torch (the worker seed in a worker), which seed_everything controls.
        if self._seeded_pid == os.getpid() or not hasattr(self.transform, "set_random_seed"):
            return
        info = torch.utils.data.get_worker_info()
        seed = info.seed if info is not None else torch.initial_seed()
        self.transform.set_random_seed(seed % 2**32)
        self._seeded_pid = os.getpid()

    def __getitem__(
        self, key: int | tuple[int, int]
    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        epoch, i = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (None, key)
        image = np.asarray(self.images[self.indices[i]])
        if self.transform is not None:
            if self.stream_seed is not None:
                epoch = self.epoch if epoch is None else epoch
                seed_augmentation(self.transform, stream_seed(_ITEM, self.stream_seed, epoch, i))
            else:
                self._seed_transform()
            image = apply_augmentation(self.transform, np.ascontiguousarray(image), self.name)
        if self.return_index:  # CRD's memory bank is indexed by the item's position
            return self.to_tensor(image), int(self.labels[i]), i
        return self.to_tensor(image), int(self.labels[i])
