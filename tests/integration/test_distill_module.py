"""The frozen-teacher rules and the weighted loss of DistillModule, on real X-rays."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data.datamodule import XRayDataModule
from kd_lightning.distill import KDLoss, NSTLoss
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule

TEACHER_MODEL = {"arch": "resnet34", "stem": "small", "in_channels": 1}
STUDENT_MODEL = {"arch": "resnet18", "stem": "small", "in_channels": 1}
PAIRS = [
    {"student": "layer3", "teacher": "layer3", "weight": 10.0},
    {"student": "layer4", "teacher": "layer4", "weight": 50.0},
]


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def datamodule(shared_npz: Path) -> XRayDataModule:
    dm = XRayDataModule(
        str(shared_npz), image_size=16, batch_size=8, train_subset=32, eval_subset=16
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, datamodule: XRayDataModule) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    teacher = ClassifierModule(TEACHER_MODEL, num_classes=2)
    trainer = _trainer(out, enable_checkpointing=False)
    trainer.fit(teacher, datamodule=datamodule)
    path = out / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def _student(teacher_ckpt: Path, **kwargs) -> DistillModule:
    args = dict(
        model=STUDENT_MODEL,
        teacher=str(teacher_ckpt),
        nst=NSTLoss("poly"),
        feature_pairs=PAIRS,
        kd=KDLoss(4.0),
        kd_weight=16.0,
    )
    return DistillModule(**{**args, **kwargs})


def test_teacher_is_frozen_and_stays_in_eval_mode(teacher_ckpt: Path) -> None:
    module = _student(teacher_ckpt)
    assert all(not p.requires_grad for p in module.teacher.parameters())
    module.train()
    assert module.model.training
    assert not any(m.training for m in module.teacher.modules())


def test_optimizer_holds_only_student_parameters(teacher_ckpt: Path) -> None:
    module = _student(teacher_ckpt)
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters()}
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}


def test_teacher_is_not_a_hyperparameter(teacher_ckpt: Path) -> None:
    module = _student(teacher_ckpt)
    assert module.hparams["teacher"] == str(teacher_ckpt)  # the path, never the network
    for key, value in module.hparams.items():
        assert not isinstance(value, torch.nn.Module | torch.Tensor), key


def test_loss_is_ce_plus_weighted_nst_plus_kd(teacher_ckpt: Path, datamodule) -> None:
    torch.manual_seed(0)
    module = _student(teacher_ckpt)
    module.train()
    images, targets = next(iter(datamodule.train_dataloader()))
    captured: dict[str, torch.Tensor] = {}
    module.log_dict = lambda values, **kw: captured.update(values)
    module.log = lambda *a, **kw: None
    loss = module.training_step((images, targets), 0)

    # Recompute the same terms by hand, with the teacher's output detached.
    s_feats, t_feats = {}, {}
    hooks = [
        module.model.layer3.register_forward_hook(lambda m, i, o: s_feats.__setitem__("l3", o)),
        module.model.layer4.register_forward_hook(lambda m, i, o: s_feats.__setitem__("l4", o)),
        module.teacher.layer3.register_forward_hook(lambda m, i, o: t_feats.__setitem__("l3", o)),
        module.teacher.layer4.register_forward_hook(lambda m, i, o: t_feats.__setitem__("l4", o)),
    ]
    with torch.no_grad():
        z_t = module.teacher(images)
        z_s = module.model(images)
        ce = torch.nn.functional.cross_entropy(z_s, targets)
        nst = NSTLoss("poly")
        expected = (
            ce
            + 10.0 * nst(s_feats["l3"], t_feats["l3"])
            + 50.0 * nst(s_feats["l4"], t_feats["l4"])
            + 16.0 * KDLoss(4.0)(z_s, z_t)
        )
    for h in hooks:
        h.remove()
    # BatchNorm in train mode updated running stats during the step: outputs use batch statistics,
    # so the recomputation matches up to float noise.
    assert torch.allclose(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert set(captured) == {"train/ce", "train/nst_layer3", "train/nst_layer4", "train/kd"}
    assert torch.allclose(captured["train/ce"], ce, rtol=1e-4)


def test_gradients_reach_the_student_only_and_features_are_cleared(
    teacher_ckpt: Path, datamodule
) -> None:
    module = _student(teacher_ckpt)
    module.log_dict = lambda *a, **kw: None
    module.log = lambda *a, **kw: None
    module.train()
    loss = module.training_step(next(iter(datamodule.train_dataloader())), 0)
    assert loss.grad_fn is not None
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.model.layer1.parameters())
    assert len(module.student_hooks.features) == 0
    assert len(module.teacher_hooks.features) == 0


def test_teacher_forward_runs_without_autograd(teacher_ckpt: Path, datamodule) -> None:
    module = _student(teacher_ckpt)
    module.log_dict = lambda *a, **kw: None
    module.log = lambda *a, **kw: None
    seen = []
    module.teacher.fc.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    module.train()
    module.training_step(next(iter(datamodule.train_dataloader())), 0)
    assert seen == [False]


def test_teacher_bit_identical_after_an_epoch_and_not_in_checkpoint(
    teacher_ckpt: Path, datamodule, tmp_path: Path
) -> None:
    module = _student(teacher_ckpt)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = module.model.conv1.weight.detach().clone()
    trainer = _trainer(tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    after = module.teacher.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # BatchNorm running stats and num_batches_tracked included
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(student_before, module.model.conv1.weight)

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in saved if k.startswith("teacher.")]
    assert any(k.startswith("model.") for k in saved)
    # It still reloads for testing: the module supplies its own teacher.
    results = _trainer(tmp_path).test(module, datamodule=datamodule, ckpt_path=str(path))
    assert 0.0 <= results[0]["test/acc"] <= 1.0


def test_keep_teacher_in_checkpoint_on_request(teacher_ckpt: Path, datamodule, tmp_path) -> None:
    module = _student(teacher_ckpt, keep_teacher_in_checkpoint=True)
    trainer = _trainer(tmp_path, enable_checkpointing=False, max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "with_teacher.ckpt")
    saved = torch.load(tmp_path / "with_teacher.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("teacher.") for k in saved["state_dict"])


def test_kd_only_needs_no_hooks(teacher_ckpt: Path) -> None:
    module = _student(teacher_ckpt, feature_pairs=[], nst=None)
    assert module.hooks == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"teacher_model": {"arch": "resnet50"}},
            ValueError,
            "has arch='resnet34'; expected 'resnet50'",
        ),
        ({"num_classes": 3}, ValueError, "predicts 2 classes; expected 3"),
        ({"teacher": "/nonexistent/teacher.ckpt"}, FileNotFoundError, "does not exist"),
        (
            {"feature_pairs": [{"student": "layer9", "teacher": "layer4", "weight": 1.0}]},
            ValueError,
            "unknown layer 'layer9'",
        ),
    ],
)
def test_bad_teacher_or_layer_is_refused_before_training(
    teacher_ckpt: Path, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        _student(teacher_ckpt, **kwargs)


def test_unfinished_teacher_run_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no summary.json"):
        _student(tmp_path)


# ---------------------------------------------------------------- the compared methods

from kd_lightning.distill import (  # noqa: E402
    ATLoss,
    CRDLoss,
    DKDLoss,
    FitNetsLoss,
    RKDLoss,
)
from kd_lightning.distill.dkd import BINARY_WARNING  # noqa: E402
from kd_lightning.modules.teacher import load_teacher  # noqa: E402


class _Indexed(torch.utils.data.Dataset):
    """(image, label, index): what XRayDataset returns with data.return_index=true."""

    def __init__(self, base) -> None:
        self.base, self.labels = base, base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, label, i


class _IndexedDataModule(XRayDataModule):
    def train_dataloader(self):
        loader = super().train_dataloader()
        return torch.utils.data.DataLoader(
            _Indexed(loader.dataset), batch_size=loader.batch_size, shuffle=True
        )


@pytest.fixture(scope="module")
def indexed_datamodule(shared_npz: Path) -> XRayDataModule:
    dm = _IndexedDataModule(
        str(shared_npz), image_size=16, batch_size=8, train_subset=32, eval_subset=16
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _methods(crd: bool = False) -> dict:
    methods = {
        "fitnets": FitNetsLoss("layer2", "layer2"),
        "at": ATLoss([{"student": "layer3", "teacher": "layer3"}]),
        "dkd": DKDLoss(warmup=0),
        "rkd": RKDLoss(),
    }
    if crd:
        methods["crd"] = CRDLoss(num_negatives=8, feat_dim=16)
    return methods


def _method_student(teacher_ckpt: Path, crd: bool = False, **kwargs) -> DistillModule:
    args = dict(feature_pairs=[], nst=None, kd_weight=0.0, methods=_methods(crd), image_size=16)
    return _student(teacher_ckpt, **{**args, **kwargs})


def test_learned_parts_are_in_the_optimizer_but_not_in_model_pt(teacher_ckpt: Path) -> None:
    module = _method_student(teacher_ckpt, crd=True)
    learned = {id(p) for p in module.methods.parameters()}
    assert learned  # FitNets connector, CRD embedding heads
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters()} | learned
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}
    assert module.deployable_state_dict().keys() == module.model.state_dict().keys()
    for key, value in module.hparams.items():
        assert not isinstance(value, torch.nn.Module | torch.Tensor), key


def test_probe_forward_moves_no_batchnorm_statistics(teacher_ckpt: Path) -> None:
    module = _method_student(teacher_ckpt)
    fresh, _ = load_teacher(str(teacher_ckpt), 2)
    for key, value in fresh.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[key], value), key
    assert int(module.model.bn1.num_batches_tracked) == 0
    assert module.model.training and not module.teacher.training
    assert len(module.student_hooks.features) == 0


def test_every_method_term_is_logged_and_weighted_into_the_loss(
    teacher_ckpt: Path, indexed_datamodule
) -> None:
    torch.manual_seed(0)
    module = _method_student(teacher_ckpt, crd=True, kd_weight=2.0)
    module.methods["crd"].bind_data(indexed_datamodule.train_dataloader().dataset)
    module.train()
    captured: dict[str, torch.Tensor] = {}
    module.log_dict = lambda values, **kw: captured.update(values)
    module.log = lambda *a, **kw: None
    batch = next(iter(indexed_datamodule.train_dataloader()))
    loss = module.training_step(batch, 0)
    assert set(captured) == {
        "train/ce",
        "train/kd",
        "train/fitnets",
        "train/at_layer3",
        "train/dkd_tckd",
        "train/dkd_nckd",
        "train/rkd_distance",
        "train/rkd_angle",
        "train/crd_s",
        "train/crd_t",
    }
    weights = {"ce": 1.0, "kd": 2.0, "fitnets": 100.0, "at_layer3": 1000.0, "dkd_tckd": 1.0}
    weights |= {"dkd_nckd": 8.0, "rkd_distance": 25.0, "rkd_angle": 50.0, "crd_s": 0.8}
    weights["crd_t"] = 0.8
    expected = sum(w * captured[f"train/{k}"] for k, w in weights.items())
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert captured["train/dkd_nckd"].item() == 0.0  # two classes
    loss.backward()
    assert module.methods["fitnets"].connector[0].weight.grad is not None
    assert module.methods["crd"].embed_t.linear.weight.grad is not None
    assert all(p.grad is None for p in module.teacher.parameters())


def test_binary_dkd_run_logs_exactly_one_warning(teacher_ckpt: Path, datamodule, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="kd_lightning.distill.dkd"):
        module = _student(
            teacher_ckpt, feature_pairs=[], nst=None, methods={"dkd": DKDLoss()}, image_size=16
        )
        _trainer(tmp_path, enable_checkpointing=False).fit(module, datamodule=datamodule)
    assert [r.getMessage() for r in caplog.records] == [BINARY_WARNING]


def test_methods_state_is_checkpointed_and_restored_on_resume(
    teacher_ckpt: Path, indexed_datamodule, tmp_path: Path
) -> None:
    module = _method_student(teacher_ckpt, crd=True)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = _trainer(tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=indexed_datamodule)
    for key, value in before.items():
        assert torch.equal(module.teacher.state_dict()[key], value), key
    path = tmp_path / "methods.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in saved if k.startswith("teacher.")]
    for key in ("memory_s", "memory_t", "labels", "z_s", "z_t", "embed_s.linear.weight"):
        assert f"methods.crd.{key}" in saved, key
    assert "methods.fitnets.connector.0.weight" in saved
    assert float(saved["methods.crd.z_s"]) > 0  # estimated on the first batch

    resumed = _method_student(teacher_ckpt, crd=True)
    _trainer(tmp_path, enable_checkpointing=False).fit(
        resumed, datamodule=indexed_datamodule, ckpt_path=str(path)
    )  # max_epochs reached: restores, trains nothing
    state = resumed.state_dict()
    for key, value in saved.items():
        if key.startswith("methods."):
            assert torch.equal(state[key], value), key


def test_crd_without_indices_or_with_a_bank_too_large_is_refused(
    teacher_ckpt: Path, datamodule, indexed_datamodule, tmp_path
) -> None:
    module = _method_student(teacher_ckpt, crd=True)
    with pytest.raises(ValueError, match=r"set data.return_index=true"):
        _trainer(tmp_path).fit(module, datamodule=datamodule)
    big = _student(
        teacher_ckpt,
        feature_pairs=[],
        methods={"crd": CRDLoss(num_negatives=4096)},
        image_size=16,
    )
    with pytest.raises(
        ValueError, match=r"num_negatives=4096 is not smaller than the training set \(32"
    ):
        _trainer(tmp_path).fit(big, datamodule=indexed_datamodule)
    module.train()
    module.log_dict = lambda *a, **kw: None
    images, targets, _ = next(iter(indexed_datamodule.train_dataloader()))
    with pytest.raises(ValueError, match=r"module.methods.crd \(CRDLoss\) needs each sample"):
        module.training_step((images, targets), 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"methods": {"fitnets": FitNetsLoss("layer9", "layer2")}},
            "unknown layer 'layer9' in ResNet; valid: conv1",
        ),
        ({"methods": {"at": "attention"}}, "module.methods.at='attention': expected a method"),
        ({"methods": {"kd": DKDLoss()}}, "module.methods key 'kd': expected an identifier other"),
        ({"kd_weight": -1.0}, r"module.kd_weight=-1.0: expected a finite number >= 0"),
        ({"ce_weight": float("nan")}, r"module.ce_weight=nan: expected a finite number >= 0"),
        (
            {"methods": {"fitnets": FitNetsLoss("layer2", "layer3", connector="identity")}},
            r"connector='identity' cannot align student layer2",
        ),
        (
            {"methods": {"rkd": RKDLoss("layer4", "layer4")}},
            r"RKD layer 'layer4' gives shape",
        ),
    ],
)
def test_bad_method_config_is_refused_before_training(teacher_ckpt: Path, kwargs, message):
    args = dict(feature_pairs=[], nst=None, image_size=16)
    with pytest.raises(ValueError, match=message) as info:
        _student(teacher_ckpt, **{**args, **kwargs})
    assert "\n" not in str(info.value)
