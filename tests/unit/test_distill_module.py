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
