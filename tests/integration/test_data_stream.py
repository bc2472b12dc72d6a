"""The deterministic data stream: batch order a pure function of (seed, epoch), each item's
augmentation of (seed, epoch, index), whatever the model, method or num_workers."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from kd_lightning.data.datamodule import XRayDataModule  # noqa: E402
from kd_lightning.data.dataset import EpochSampler  # noqa: E402
from kd_lightning.distill import KDLoss, NSTLoss  # noqa: E402
from kd_lightning.modules.classifier import ClassifierModule  # noqa: E402
from kd_lightning.modules.distill import DistillModule  # noqa: E402

PROJECT = Path(__file__).resolve().parents[2]
SMALL = {"arch": "resnet18", "stem": "small", "in_channels": 1}


def _transform() -> A.Compose:
    return A.Compose(
        [
            A.Affine(rotate=(-10, 10), translate_percent=(-0.05, 0.05), p=0.8),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    )


def _datamodule(npz: Path, **kwargs) -> XRayDataModule:
    args = dict(image_size=16, batch_size=8, train_subset=40, eval_subset=8)
    dm = XRayDataModule(str(npz), train_transform=_transform(), **{**args, **kwargs})
    dm.setup("fit")
    return dm


def _epochs(loader, epochs=(0, 1)) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append([(b[0].clone(), b[1].clone()) for b in loader])
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        len(ea) == len(eb)
        and all(
            torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(ea, eb, strict=True)
        )
        for ea, eb in zip(a, b, strict=True)
    )


def test_num_workers_0_and_2_give_identical_batches(shared_npz):
    seen = []
    for workers in (0, 2):
        dm = _datamodule(shared_npz, num_workers=workers, stream_seed=5)
        seen.append(_epochs(dm.train_dataloader()))
    assert _same(seen[0], seen[1])


def test_epochs_differ_in_order_and_augmentation_and_seeds_differ(shared_npz):
    dm = _datamodule(shared_npz, stream_seed=5)
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler)
    assert sampler.order(0) != sampler.order(1)
    assert sorted(sampler.order(1)) == list(range(40))
    dataset = dm.datasets["train"]
    assert not torch.equal(dataset[(0, 3)][0], dataset[(1, 3)][0])  # same image, another epoch
    e0, e1 = _epochs(loader)
    assert not torch.equal(e0[0][0], e1[0][0])
    other = _datamodule(shared_npz, stream_seed=6)
    assert other.train_dataloader().sampler.order(0) != sampler.order(0)


def test_an_item_is_a_pure_function_of_seed_epoch_index(shared_npz):
    dm = _datamodule(shared_npz, stream_seed=5)
    dm.train_dataloader()
    dataset = dm.datasets["train"]
    first = dataset[(1, 7)][0]
    for i in (0, 3, 9):  # other items drawn in between change nothing
        dataset[(1, i)]
    assert torch.equal(dataset[(1, 7)][0], first)
    again = _datamodule(shared_npz, stream_seed=5)
    again.train_dataloader()
    assert torch.equal(again.datasets["train"][(1, 7)][0], first)


def test_stream_seed_defaults_to_torch_initial_seed(shared_npz):
    dm = _datamodule(shared_npz)
    torch.manual_seed(11)
    assert dm.train_dataloader().sampler.seed == 11 == dm.resolved_stream_seed()


def test_stream_off_keeps_the_global_rng_shuffle(shared_npz):
    dm = _datamodule(shared_npz, deterministic_stream=False)
    assert not isinstance(dm.train_dataloader().sampler, EpochSampler)
    assert dm.stream_identity() is None


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.batches.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[-1].append((batch[0].clone(), batch[1].clone()))


def _fit(module: L.LightningModule, dm: XRayDataModule, tmp_path: Path) -> _Recorder:
    recorder = _Recorder()
    L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    ).fit(module, datamodule=dm)
    return recorder


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    teacher = ClassifierModule({"arch": "resnet34", "stem": "small", "in_channels": 1})
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    torch.save(
        {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path
    )
    return path


def test_a_classifier_and_a_distill_run_see_bit_identical_batches(
    shared_npz, teacher_ckpt, tmp_path
):
    L.seed_everything(3)
    base = _fit(ClassifierModule(SMALL), _datamodule(shared_npz), tmp_path)
    L.seed_everything(3)
    student = DistillModule(
        SMALL,
        str(teacher_ckpt),
        nst=NSTLoss("poly"),
        feature_pairs=[{"student": "layer4", "teacher": "layer4", "weight": 50.0}],
        kd=KDLoss(4.0),
        kd_weight=16.0,
    )
    distill = _fit(student, _datamodule(shared_npz), tmp_path)
    assert len(base.batches) == 2 and len(base.batches[0]) == 5
    assert _same(base.batches, distill.batches)
    assert not torch.equal(base.batches[0][0][0], base.batches[1][0][0])  # Lightning set_epoch


def test_yaml_streams_deterministically_from_the_run_seed():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["seed=4"])
    assert cfg.data.deterministic_stream is True and cfg.data.stream_seed == 4
