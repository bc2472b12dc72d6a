"""QuantizedDistillModule: quantized forward, full-precision updates (STE), learnable points,
plain deployable weights, integer artifact, checkpoint round trip and the Hydra composition."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd_lightning.data.datamodule import XRayDataModule
from kd_lightning.distill import FitNetsLoss, KDLoss, NSTLoss
from kd_lightning.distill.quant_pack import packed_nbytes, unpack_quantized
from kd_lightning.models.backbones import build_resnet
from kd_lightning.modules.quantized import MODEL_INT_FILE, QuantizedDistillModule

PROJECT = Path(__file__).resolve().parents[2]
# ImageNet stem at 32 px: the project's default student, and cheap (8x8 maps after the stem).
SPEC = {"arch": "resnet18", "stem": "imagenet", "in_channels": 1}
PAIRS = [{"student": "layer4", "teacher": "layer4", "weight": 50.0}]


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
        str(shared_npz), image_size=32, batch_size=8, train_subset=32, eval_subset=16
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    # A plain weights file is a valid teacher (with module.teacher_model); no training needed here.
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_resnet(num_classes=2, **SPEC).state_dict(), path)
    return path


def _module(teacher_pt: Path, quantization: dict | None = None, **kwargs) -> QuantizedDistillModule:
    torch.manual_seed(0)
    args = dict(
        model=SPEC,
        teacher=str(teacher_pt),
        teacher_model=SPEC,
        quantization={"bits": 4, "bucket_size": 256, **(quantization or {})},
        nst=NSTLoss("poly"),
        feature_pairs=PAIRS,
        kd=KDLoss(2.0),
        kd_weight=0.7,
        ce_weight=0.3,
    )
    return QuantizedDistillModule(**{**args, **kwargs})


def _quiet(module: QuantizedDistillModule) -> QuantizedDistillModule:
    module.log_dict = lambda *a, **kw: None
    module.log = lambda *a, **kw: None
    return module


def _distinct_per_bucket(weight: torch.Tensor, bucket: int = 256) -> int:
    """Most distinct values in any bucket of `bucket` consecutive weights (quant.py's buckets)."""
    flat = weight.detach().reshape(-1)
    # Pad with the last value, as quant.py does: it adds no new value to the last bucket.
    flat = torch.cat([flat, flat[-1:].expand(-flat.numel() % bucket)])
    rows = flat.view(-1, bucket).sort(dim=1).values
    return int((1 + (rows[:, 1:] != rows[:, :-1]).sum(dim=1)).max())


def test_first_and_last_layers_stay_full_precision(teacher_pt: Path) -> None:
    module = _module(teacher_pt)
    # resnet18: 20 convs (incl. 3 downsample) + fc; conv1 and fc are skipped.
    assert len(module.quantized_layers) == 19
    assert "conv1" not in module.quantized_layers and "fc" not in module.quantized_layers
    assert _distinct_per_bucket(module.model.conv1.weight) > 16
    assert _distinct_per_bucket(module.model.fc.weight) > 16


def test_step_updates_full_precision_weights_while_forward_is_quantized(
    teacher_pt: Path, datamodule: XRayDataModule
) -> None:
    bits = 2  # 4 bits: the deployable-weights test
    module = _quiet(_module(teacher_pt, {"bits": bits}))
    layer = module.model.layer2[0].conv1
    original = layer.parametrizations.weight.original
    before = original.detach().clone()
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(original) in in_optimizer

    module.train()
    images, targets = next(iter(datamodule.train_dataloader()))
    loss = module.training_step((images, targets), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert original.grad is not None and original.grad.abs().sum() > 0  # STE reaches w
    optimizer.step()

    assert not torch.equal(before, original.detach())  # the full-precision weights moved
    assert _distinct_per_bucket(original) > 2**bits  # ... and are not on a grid
    for name in module.quantized_layers:  # what the forward uses is on the grid
        weight = module.model.get_submodule(name).weight
        assert _distinct_per_bucket(weight) <= 2**bits, name
    assert len(module.student_hooks.features) == 0


def test_differentiable_points_are_trained_in_their_own_group(
    teacher_pt: Path, datamodule: XRayDataModule
) -> None:
    module = _quiet(_module(teacher_pt, {"bits": 3, "mode": "differentiable", "points_lr": 0.01}))
    optimizer = module.configure_optimizers()
    weights, points = optimizer.param_groups
    assert len(points["params"]) == len(module.quantized_layers) == 19
    assert points["lr"] == 0.01 and points["weight_decay"] == 0.0
    assert all(p.numel() == 8 for p in points["params"])
    every = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert every == {id(p) for p in module.model.parameters()}  # points once, teacher never
    before = [p.detach().clone() for p in points["params"]]

    module.train()
    module.training_step(next(iter(datamodule.train_dataloader())), 0).backward()
    optimizer.step()
    moved = sum(not torch.equal(b, p) for b, p in zip(before, points["params"], strict=True))
    assert moved == len(before)
    weight = module.model.layer3[1].conv2.weight
    assert _distinct_per_bucket(weight) <= 8


def test_distill_arguments_pass_through_and_method_parts_train_with_the_weights(
    teacher_pt: Path,
) -> None:
    # Nothing of DistillModule's signature is restated: its newer arguments arrive unchanged.
    module = _module(
        teacher_pt,
        {"bits": 3, "mode": "differentiable"},
        methods={"fitnets": FitNetsLoss("layer2", "layer2")},
        image_size=32,
    )
    assert list(module.methods) == ["fitnets"] and module.hparams["quantization"]["bits"] == 3
    assert "methods" not in module.hparams and "image_size" not in module.hparams
    weights, points = module.configure_optimizers().param_groups
    weight_ids, point_ids = {id(p) for p in weights["params"]}, {id(p) for p in points["params"]}
    connector = [id(p) for p in module.methods.parameters()]
    assert connector and set(connector) <= weight_ids  # the FitNets connector trains too
    assert not weight_ids & point_ids and len(point_ids) == len(module.quantized_layers)
    assert not any(n.startswith("methods.") for n in module.quantized_layers)


def test_deployable_state_dict_is_a_plain_resnet_with_the_quantized_forward(
    teacher_pt: Path, datamodule: XRayDataModule, tmp_path: Path
) -> None:
    module = _module(teacher_pt)  # training steps: the test above; this is about the weights
    state = module.deployable_state_dict()
    assert not [k for k in state if "parametrizations" in k]
    plain = build_resnet(num_classes=2, **SPEC)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    module.eval()
    images, _ = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        assert torch.equal(plain(images), module(images))
    assert _distinct_per_bucket(plain.layer4[1].conv2.weight) <= 16
    # The module itself keeps its quantizers (deployable_state_dict works on a fresh copy).
    assert "model.layer4.1.conv2.parametrizations.weight.original" in module.state_dict()

    summary = module.write_artifacts(tmp_path)
    path = tmp_path / MODEL_INT_FILE
    assert summary["model_int_file"] == str(path.resolve())
    assert summary["quantization"]["bits"] == 4 and summary["quantized_layers"] == 19
    packed = torch.load(path, map_location="cpu", weights_only=True)
    unpacked = unpack_quantized(packed)
    assert unpacked.keys() == state.keys()
    assert all(torch.equal(unpacked[k], state[k]) for k in state)
    fp32_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert packed_nbytes(packed) < fp32_bytes / 7  # 4-bit codes + 2 floats per 256 weights
    assert summary["model_int_mb"] < fp32_bytes / 2**20 / 7


def test_checkpoint_round_trip(teacher_pt: Path, datamodule: XRayDataModule, tmp_path) -> None:
    module = _module(teacher_pt, {"bits": 3, "mode": "differentiable"})
    trainer = _trainer(tmp_path, enable_checkpointing=False, max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "quant.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["quantization"]["bits"] == 3
    assert not [k for k in saved["state_dict"] if k.startswith("teacher.")]
    assert "model.layer1.0.conv1.parametrizations.weight.0.points" in saved["state_dict"]

    # nst/kd are modules, not hyperparameters: passed again, as for any DistillModule.
    restored = QuantizedDistillModule.load_from_checkpoint(
        path, map_location="cpu", nst=NSTLoss("poly"), kd=KDLoss(2.0)
    )
    assert restored.quantization == module.quantization
    images, _ = next(iter(datamodule.test_dataloader()))
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(images), module(images))
    restored_state = restored.state_dict()  # originals and points, teacher re-supplied
    for key, value in module.state_dict().items():
        assert torch.equal(restored_state[key], value), key
    # run.py's path (trainer.test on the best checkpoint): tests/integration/test_export.py.


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"bits": 9}, r"module.quantization: bits=9: expected an int in 2..8"),
        ({"scaling": "max"}, r"module.quantization: scaling='max'"),
        ({"mode": "log"}, r"module.quantization: mode='log'"),
        ({"bucket": 64}, r"unknown key\(s\) \['bucket'\]"),
        ({"points_lr": 0.1}, r"points_lr=0.1 needs mode=differentiable"),
        ({"stochastic": True, "mode": "differentiable"}, r"stochastic rounding needs"),
    ],
)
def test_bad_quantization_settings_fail_with_the_key(
    teacher_pt: Path, quantization: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _module(teacher_pt, quantization)


@pytest.mark.parametrize(
    "overrides",
    [
        ["+experiment=quantized_distill"],
        # A chain step: an override list, module.teacher set by the chain.
        ["module=quantized_distill", "model=resnet18", "name=quant", "method=quantized_distill"],
    ],
)
def test_hydra_composition_builds_the_module(teacher_pt: Path, overrides: list[str]) -> None:
    extra = [
        f"module.teacher={teacher_pt}",
        "module.teacher_model={arch: resnet18, stem: imagenet, in_channels: 1}",
        "module.quantization.bits=2",
    ]
    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, *extra])
    assert cfg.method == "quantized_distill"
    assert cfg.module.kd.temperature == 2.0  # Polino et al.: T=2, distillation weight 0.7
    assert cfg.module.kd_weight == 0.7 and cfg.module.ce_weight == 0.3
    module = instantiate(cfg.module)
    assert isinstance(module, QuantizedDistillModule)
    assert module.quantization["bits"] == 2 and module.quantization["bucket_size"] == 256
    assert module.pairs == [] and module.kd_weight == 0.7
