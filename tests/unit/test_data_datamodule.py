"""XRayDataModule on the npz source: batches, normalization, channels, subsets, class weights,
CLAHE, seeded augmentation, argument checks and the Hydra YAML configs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from kd_lightning.data import npz  # noqa: E402
from kd_lightning.data.datamodule import XRayDataModule  # noqa: E402
from kd_lightning.data.sources import SPLITS  # noqa: E402

PROJECT = Path(__file__).resolve().parents[2]
SHARED_NPZ = PROJECT.parent / "shared" / "data" / "pneumoniamnist.npz"
needs_shared = pytest.mark.skipif(not SHARED_NPZ.is_file(), reason=f"{SHARED_NPZ} not present")


@pytest.fixture(scope="module")
def raw():
    with np.load(SHARED_NPZ) as z:
        return {k: z[k] for k in z.files}


def _small_npz(path: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4 == 0).astype(np.uint8).reshape(n, 1)
    np.savez(path, **arrays)
    return path


@needs_shared
@pytest.mark.parametrize("in_channels", [1, 3])
def test_batches_are_normalized_with_explicit_stats(raw, in_channels):
    dm = XRayDataModule(
        str(SHARED_NPZ), image_size=28, in_channels=in_channels, batch_size=16, mean=0.4, std=0.2
    )
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, in_channels, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    expected = (torch.from_numpy(raw["test_images"][:16]).float() / 255 - 0.4) / 0.2
    for c in range(in_channels):
        torch.testing.assert_close(x[:, c], expected)
    assert y.tolist() == raw["test_labels"][:16, 0].tolist()


@needs_shared
def test_resize_once_to_64_and_split_sizes():
    dm = XRayDataModule(str(SHARED_NPZ), image_size=64, batch_size=8)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 3882, "val": 524, "test": 624}
    # Resized once at setup: the dataset holds 64 px arrays, items only index them.
    assert dm.datasets["train"].images.shape == (3882, 64, 64)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 64, 64)
    assert -1.0 <= x.min() and x.max() <= 1.0


@needs_shared
def test_class_weights_are_inverse_frequency():
    dm = XRayDataModule(str(SHARED_NPZ), class_weighting=True)
    dm.setup()
    assert dm.train_counts == [388, 3494]
    assert dm.class_names == ["normal", "pneumonia"] and dm.num_classes == 2
    torch.testing.assert_close(dm.class_weights, torch.tensor([3882 / 776, 3882 / 6988]))
    plain = XRayDataModule(str(SHARED_NPZ))
    plain.setup()
    assert plain.class_weights is None


@needs_shared
def test_subsets_are_stratified_not_the_first_rows():
    dm = XRayDataModule(str(SHARED_NPZ), train_subset=100, eval_subset=50, class_weighting=True)
    dm.setup()
    assert dm.train_counts == [10, 90]  # the first 100 rows would all be pneumonia
    assert len(dm.datasets["val"]) == 50 and len(dm.datasets["test"]) == 50
    assert dm.split_counts["test"] == [19, 31]  # 234/624 * 50 = 18.75
    torch.testing.assert_close(dm.class_weights, torch.tensor([5.0, 100 / 180]))


def test_local_npz_with_other_md5_is_used_without_download(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(npz, "_download", no_download)
    path = _small_npz(tmp_path / "pneumoniamnist.npz")
    dm = XRayDataModule(str(path), image_size=32, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert dm.train_counts == [15, 5]
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 1, 32, 32)


def test_clahe_is_deterministic_and_applies_to_eval(tmp_path):
    path = _small_npz(tmp_path / "pneumoniamnist.npz")
    plain = XRayDataModule(str(path), image_size=64, batch_size=20)
    eq1 = XRayDataModule(str(path), image_size=64, batch_size=20, clahe=True)
    eq2 = XRayDataModule(str(path), image_size=64, batch_size=20, clahe=True)
    batches = []
    for dm in (plain, eq1, eq2):
        dm.setup()
        batches.append(next(iter(dm.test_dataloader()))[0])
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(batches[1], batches[2])


def test_augmentation_is_reproducible_under_a_torch_seed(tmp_path):
    path = _small_npz(tmp_path / "pneumoniamnist.npz")

    def first_batch() -> torch.Tensor:
        tf = A.Compose([A.Affine(rotate=(-20, 20), p=1.0)])
        dm = XRayDataModule(str(path), batch_size=20, train_transform=tf)
        dm.setup()
        torch.manual_seed(0)
        return next(iter(dm.train_dataloader()))[0]

    a, b = first_batch(), first_batch()
    assert torch.equal(a, b)
    dm = XRayDataModule(str(path), batch_size=20)
    dm.setup()
    torch.manual_seed(0)
    assert not torch.equal(a, next(iter(dm.train_dataloader()))[0])  # augmentation did act


def test_transform_that_normalizes_is_rejected(tmp_path):
    path = _small_npz(tmp_path / "pneumoniamnist.npz")
    dm = XRayDataModule(str(path), train_transform=A.Compose([A.Normalize()]))
    dm.setup()
    with pytest.raises(ValueError, match="train transform returned .* float32; expected uint8"):
        dm.datasets["train"][0]


def test_last_train_batch_of_one_is_dropped(tmp_path):
    path = _small_npz(tmp_path / "pneumoniamnist.npz", n=21)
    dm = XRayDataModule(str(path), batch_size=10)
    dm.setup()
    assert [len(y) for _, y in dm.train_dataloader()] == [10, 10]
    assert [len(y) for _, y in dm.val_dataloader()] == [10, 10, 1]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"num_classes": 3},
            "num_classes=3 with .*pneumoniamnist.npz: pneumoniamnist has 2 classes; set "
            "data.num_classes=2 .*need the Kermany folder",
        ),
        ({"in_channels": 2}, "in_channels=2: expected 1 or 3"),
        ({"image_size": 4}, "image_size=4: expected an integer >= 8"),
        ({"batch_size": 0}, "batch_size=0: expected an integer >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0: expected a value in \[0, 1\)"),
        ({"train_subset": 0}, "train_subset=0: expected None or an integer >= 1"),
        ({"std": 0.0}, "std=0.0: expected a positive number"),
        ({"train_transform": "flip"}, "train_transform='flip': expected an albumentations"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        XRayDataModule("data/pneumoniamnist.npz", **kwargs)


def test_loader_before_setup_is_a_clear_error():
    dm = XRayDataModule("data/pneumoniamnist.npz")
    with pytest.raises(RuntimeError, match="before setup"):
        dm.train_dataloader()


@pytest.mark.parametrize("config", ["pneumoniamnist", "kermany"])
def test_yaml_transforms_build_without_albumentations_warnings(config, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data={config}"])
    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_tf = instantiate(cfg.data.train_transform)
        out = train_tf(image=image)["image"]
    assert [str(w.message) for w in caught] == []
    assert isinstance(train_tf, A.Compose) and out.shape == (64, 64) and out.dtype == np.uint8
    names = [type(t).__name__ for t in train_tf.transforms]
    assert "HorizontalFlip" not in names and names == ["Affine", "RandomBrightnessContrast"]
    assert cfg.data.eval_transform is None
    assert cfg.data._target_ == "kd_lightning.data.datamodule.XRayDataModule"
    if config == "pneumoniamnist":
        path = _small_npz(tmp_path / "pneumoniamnist.npz")
        dm = instantiate(cfg.data, path=str(path), batch_size=4)
        dm.setup()
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (4, 1, 32, 32) and y.dtype == torch.int64


@needs_shared
def test_labeled_fraction_hides_a_stratified_seeded_share_of_train_labels(raw):
    full = XRayDataModule(str(SHARED_NPZ), image_size=28)
    full.setup()
    dm = XRayDataModule(str(SHARED_NPZ), image_size=28, labeled_fraction=0.03, class_weighting=True)
    dm.setup()
    labels = dm.datasets["train"].labels
    true = raw["train_labels"].ravel()
    kept = labels != -100
    assert kept.sum() == int(np.floor(0.03 * len(true))) == 116
    assert (labels[kept] == true[kept]).all()  # the kept labels are the true ones
    # Stratified: the labelled share has the train split's class balance (388 normal of 3882).
    assert dm.labeled_counts == np.bincount(true[kept], minlength=2).tolist() == [12, 104]
    assert dm.train_counts == full.train_counts  # true counts of the split stay reported
    assert dm.split_counts["val"] == full.split_counts["val"]  # val and test keep every label
    assert (dm.datasets["test"].labels == full.datasets["test"].labels).all()
    # Class weights come from the labelled images, whose CE they weigh.
    assert torch.allclose(dm.class_weights, torch.tensor([116 / 24, 116 / 208]))
    # Seeded: the same subset again, another with another seed.
    again = XRayDataModule(str(SHARED_NPZ), image_size=28, labeled_fraction=0.03)
    again.setup()
    other = XRayDataModule(str(SHARED_NPZ), image_size=28, labeled_fraction=0.03, labeled_seed=1)
    other.setup()
    assert (again.datasets["train"].labels == labels).all()
    assert (other.datasets["train"].labels != labels).any()
    _, y = next(iter(dm.train_dataloader()))
    assert (y == -100).any() and y.dtype == torch.int64


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True])
def test_labeled_fraction_out_of_range_is_one_line(fraction):
    with pytest.raises(
        ValueError, match=r"data.labeled_fraction=.*: expected a number in \(0, 1\]"
    ):
        XRayDataModule("x.npz", labeled_fraction=fraction)


def test_labeled_fraction_leaving_a_class_unlabelled_names_the_smallest_valid(tmp_path):
    dm = XRayDataModule(
        str(_small_npz(tmp_path / "small.npz")), image_size=28, labeled_fraction=0.05
    )
    with pytest.raises(ValueError) as err:
        dm.setup()
    message = str(err.value)
    assert message.startswith("data.labeled_fraction=0.05 keeps 1 of 20 training images")
    assert "the smallest valid value is 0.1 (one image per class)" in message
    ok = XRayDataModule(str(_small_npz(tmp_path / "ok.npz")), image_size=28, labeled_fraction=0.1)
    ok.setup()
    assert ok.labeled_counts == [1, 1]


def test_cross_entropy_skips_hidden_labels_and_an_all_hidden_batch_is_zero():
    from kd_lightning.modules.classifier import ClassifierModule

    module = ClassifierModule({"arch": "resnet18"}, class_weights=[2.0, 0.5])
    logits = torch.randn(6, 2, requires_grad=True)
    targets = torch.tensor([0, -100, 1, 1, -100, 0])
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(
        logits[keep], targets[keep], weight=torch.tensor([2.0, 0.5])
    )
    assert torch.allclose(module.cross_entropy(logits, targets), expected)
    none = module.cross_entropy(logits, torch.full((6,), -100))
    assert none.item() == 0.0 and none.requires_grad
