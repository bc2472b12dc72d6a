"""Any torchvision / timm network from a spec: real builds of small networks, one-channel input
adaptation, head replacement, pretrained weights from local files (no network), feature hooks by
name, save -> load round trips through summary.json's spec, errors, and the layers CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.distill import FeatureHooks
from kd_lightning.models.backbones import (
    WeightsUnavailableError,
    build_resnet,
    check_image_size,
)
from kd_lightning.models.loading import load_run_network
from kd_lightning.models.networks import (
    adapt_first_conv,
    build_model,
    first_conv,
    timm_weights_file,
)
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.teacher import load_teacher

timm = pytest.importorskip("timm")

SMALL = [
    ("torchvision", "mobilenet_v3_small", 32),
    ("torchvision", "efficientnet_b0", 32),
    ("torchvision", "densenet121", 64),
    ("timm", "resnet18", 32),
    ("timm", "mobilenetv3_small_050", 64),
]


def spec(family: str, name: str, **extra) -> dict:
    return {"family": family, "name": name, "arch": name, "in_channels": 1, **extra}


@pytest.mark.parametrize(("family", "name", "size"), SMALL)
def test_small_networks_build_for_one_channel_and_num_classes(family, name, size) -> None:
    net = build_model(spec(family, name), num_classes=3).eval()
    assert first_conv(net)[1].in_channels == 1
    with torch.no_grad():
        out = net(torch.randn(2, 1, size, size))
    assert out.shape == (2, 3)
    # Training mode too (BatchNorm statistics, no auxiliary outputs).
    assert net.train()(torch.randn(2, 1, size, size)).shape == (2, 3)


def test_three_channel_network_keeps_rgb_input() -> None:
    net = build_model(spec("torchvision", "mobilenet_v3_small", in_channels=3), 4).eval()
    assert first_conv(net)[1].in_channels == 3
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "densenet121"])
def test_summed_filters_answer_a_gray_image_as_the_rgb_ones(name: str) -> None:
    rgb = build_model(spec("torchvision", name, in_channels=3), 2).eval()
    gray = copy.deepcopy(rgb)
    conv_name = adapt_first_conv(gray, 1)
    old, new = rgb.get_submodule(conv_name), gray.get_submodule(conv_name)
    assert new.in_channels == 1 and new.weight.shape[1] == 1
    assert torch.equal(new.weight, old.weight.sum(dim=1, keepdim=True))
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image.expand(-1, 3, -1, -1)))


def test_head_is_replaced_for_num_classes() -> None:
    dense = build_model(spec("torchvision", "densenet121"), 5)
    assert isinstance(dense.classifier, nn.Linear) and dense.classifier.out_features == 5
    mobile = build_model(spec("torchvision", "mobilenet_v3_small"), 5)
    assert mobile.classifier[3].out_features == 5 and mobile.classifier[0].out_features == 1024
    squeeze = build_model(spec("torchvision", "squeezenet1_1"), 5).eval()
    assert squeeze(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    assert build_model(spec("timm", "mobilenetv3_small_050"), 5).classifier.out_features == 5


def test_torchvision_resnet_name_is_the_resnet_config_network() -> None:
    generic = build_model(spec("torchvision", "resnet18", stem="small"), 2)
    legacy = build_resnet("resnet18", num_classes=2, stem="small")
    assert list(generic.state_dict()) == list(legacy.state_dict())
    # An old ResNet spec (no family) keeps building the same network.
    old = build_model({"arch": "resnet18", "in_channels": 1, "stem": "imagenet"}, 2)
    assert list(old.state_dict()) == list(build_resnet("resnet18").state_dict())


def test_pretrained_torchvision_file_placed_offline_loads_and_sums_rgb(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as err:
        build_model(spec("torchvision", "mobilenet_v3_small", pretrained=True), 2)
    message = str(err.value)
    target = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert str(target) in message and "model.pretrained=false" in message
    assert "\n" not in message and isinstance(err.value, ValueError)  # one-line CLI error
    # The exact file named, placed there by hand: ImageNet weights, 3 channels, 1000 classes.
    from torchvision.models import mobilenet_v3_small

    imagenet = mobilenet_v3_small()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(imagenet.state_dict(), target)
    net = build_model(spec("torchvision", "mobilenet_v3_small", pretrained=True), 2)
    stem = imagenet.features[0][0].weight
    assert torch.equal(net.features[0][0].weight, stem.sum(dim=1, keepdim=True))
    assert torch.equal(net.features[1].block[0][0].weight, imagenet.features[1].block[0][0].weight)
    assert net.classifier[3].out_features == 2


def test_pretrained_timm_offline_names_the_file_and_loads_it_once_placed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "mobilenetv3_small_050"
    with pytest.raises(WeightsUnavailableError) as err:
        build_model(spec("timm", name, pretrained=True), 2)
    local, url = timm_weights_file(name)
    assert str(local) in str(err.value) and url in str(err.value)
    assert str(local).startswith(str(tmp_path)) and "\n" not in str(err.value)
    from safetensors.torch import save_file

    imagenet = timm.create_model(name, pretrained=False)
    local.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(local))
    net = build_model(spec("timm", name, pretrained=True), 2)
    assert torch.equal(net.conv_stem.weight, imagenet.conv_stem.weight.sum(dim=1, keepdim=True))
    assert net.classifier.out_features == 2


def test_local_weights_path_works_for_any_family(tmp_path: Path) -> None:
    for family, name, _ in SMALL[:1] + SMALL[-1:]:
        source = build_model(spec(family, name), 2)
        torch.save(source.state_dict(), tmp_path / f"{name}.pt")
        loaded = build_model(spec(family, name, weights_path=str(tmp_path / f"{name}.pt")), 2)
        for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("family", "name", "layer", "shape"),
    [
        ("torchvision", "densenet121", "features.denseblock4", (1024, 2, 2)),
        ("torchvision", "mobilenet_v3_small", "features.12", (576, 2, 2)),
        ("torchvision", "efficientnet_b0", "features.7", (320, 2, 2)),
        ("timm", "mobilenetv3_small_050", "blocks.5", (288, 2, 2)),
    ],
)
def test_feature_hooks_capture_named_layers(family, name, layer, shape) -> None:
    net = build_model(spec(family, name), 2).eval()
    with FeatureHooks(net, [layer]) as hooks, torch.no_grad():
        net(torch.zeros(2, 1, 64, 64))
        assert tuple(hooks.features[layer].shape) == (2, *shape)


def test_feature_hooks_wrong_name_lists_valid_and_close_names() -> None:
    net = build_model(spec("torchvision", "densenet121"), 2)
    with pytest.raises(ValueError) as err:
        FeatureHooks(net, ["features.denseblok4"])
    message = str(err.value)
    assert "valid: features, classifier" in message
    assert "did you mean features.denseblock4" in message


def _summary(net_spec: dict, num_classes: int) -> dict:
    return {"model": {**net_spec, "num_classes": num_classes}}


@pytest.mark.parametrize(("family", "name", "size"), SMALL[:1] + SMALL[-1:])
def test_run_directory_round_trip_through_the_summary_spec(tmp_path, family, name, size) -> None:
    # As run.py does: the config's model entry + num_classes in summary.json, model.pt beside it.
    module = ClassifierModule(spec(family, name, pretrained=False, weights_path=None), 3)
    torch.save(module.deployable_state_dict(), tmp_path / "model.pt")
    summary = _summary(dict(module.hparams.model), 3)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    net, read = load_run_network(tmp_path)
    assert read["model"]["family"] == family
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(net(x), module.model.eval()(x))


def test_teacher_checkpoint_of_any_family_loads(tmp_path: Path) -> None:
    module = ClassifierModule(spec("torchvision", "mobilenet_v3_small"), 2)
    ckpt = tmp_path / "best.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    teacher, teacher_spec = load_teacher(ckpt, 2, {"arch": "mobilenet_v3_small"})
    assert teacher_spec["family"] == "torchvision"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval()(x), module.model.eval()(x))
    with pytest.raises(ValueError, match="has arch='mobilenet_v3_small'; expected 'densenet121'"):
        load_teacher(ckpt, 2, {"arch": "densenet121"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            spec("torchvision", "densenet12"),
            "unknown torchvision model.name='densenet12'; close matches: densenet121",
        ),
        (
            spec("timm", "mobilenetv3_smal_050"),
            "unknown timm model.name='mobilenetv3_smal_050'; close matches: mobilenetv3_small_050",
        ),
        ({"arch": "resnet19"}, "unknown model.arch='resnet19'; expected one of ['resnet101'"),
        (spec("keras", "x"), "unknown model.family='keras'; expected one of"),
        (spec("torchvision", "densenet121", stem="small"), "model.stem=small is only implemented"),
        (spec("torchvision", "densenet121", in_channels=2), "model.in_channels=2 not supported"),
        ({**spec("timm", "resnet18"), "arch": "resnet34"}, "model.name='resnet18' and model.arch"),
        (
            spec("torchvision", "densenet121", pretrained=True, weights="IMAGENET9K"),
            "model.weights='IMAGENET9K' is not a DenseNet121_Weights member",
        ),
    ],
)
def test_bad_model_specs_are_one_line_errors(bad: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_model(bad, 2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_image_size_check_with_the_model_spec() -> None:
    check_image_size(32, "imagenet", spec("torchvision", "densenet121"))
    with pytest.raises(ValueError, match="only ResNets have model.stem=small"):
        check_image_size(28, "imagenet", spec("torchvision", "densenet121"))
    with pytest.raises(ValueError, match="takes 224 px inputs only; set data.image_size=224"):
        check_image_size(64, "imagenet", spec("torchvision", "vit_b_16"))
    check_image_size(28, "small")  # the two-argument form run.py uses is unchanged


def test_layers_cli_prints_each_layers_output_shape(capsys) -> None:
    from kd_lightning.layers import main

    assert main(["mobilenet_v3_small", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "torchvision mobilenet_v3_small: 1 x 64 x 64 input" in out
    row = next(line for line in out.splitlines() if line.startswith("features.12 "))
    assert "576x2x2" in row and row.split()[-1] == "32"
    assert main(["mobilenetv3_small_050", "--family", "timm", "--depth", "1"]) == 0
    assert "blocks" in capsys.readouterr().out
    assert main(["densnet121"]) == 2
    err = capsys.readouterr().err
    assert "close matches: densenet121" in err and err.count("\n") == 1


def test_torchvision_config_composes_with_arch_following_name() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kd_lightning.conf_path import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", ["model=torchvision", "model.name=densenet121"])
        timm_cfg = compose("config", ["model=timm", "model.name=resnet18"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["arch"] == "densenet121" and cfg.name == "densenet121"
    assert OmegaConf.to_container(timm_cfg.model, resolve=True)["family"] == "timm"
    assert build_model(model, int(cfg.data.num_classes)).classifier.out_features == 2


def test_bn_momentum_sets_every_batchnorm_and_null_keeps_the_networks_own() -> None:
    from torch import nn

    from kd_lightning.models.networks import build_model

    def momenta(net):
        return {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)}

    spec = {"family": "torchvision", "name": "mobilenet_v3_small", "in_channels": 1}
    assert momenta(build_model(spec)) == {0.01}  # torchvision's own
    assert momenta(build_model({**spec, "bn_momentum": 0.1})) == {0.1}
    resnet = {"family": "resnet", "arch": "resnet18", "in_channels": 1, "bn_momentum": 0.3}
    assert momenta(build_model(resnet)) == {0.3}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"model.bn_momentum={bad}; expected a number in"):
            build_model({**spec, "bn_momentum": bad})
