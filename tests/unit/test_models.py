from pathlib import Path

import pytest
import torch

from kd_lightning.models.backbones import (
    ARCHITECTURES,
    build_resnet,
    check_image_size,
    count_parameters,
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_resnet_builds_for_one_channel_xrays(arch: str) -> None:
    model = build_resnet(arch, num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3)


def test_parameter_counts_match_the_papers_ratio() -> None:
    # The paper: ResNet-152 teacher, ResNet-18 student, "around 10 times smaller".
    r18 = count_parameters(build_resnet("resnet18", num_classes=2))
    r152 = count_parameters(build_resnet("resnet152", num_classes=2))
    assert 11.0e6 < r18 < 11.3e6
    assert 58.0e6 < r152 < 58.3e6
    assert 5.0 < r152 / r18 < 5.5  # parameters; the paper's 10x is file size incl. its setup


def test_small_stem_keeps_resolution() -> None:
    small = build_resnet("resnet18", stem="small")
    imagenet = build_resnet("resnet18", stem="imagenet")
    feats = {}
    small.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("small", o.shape))
    imagenet.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("imagenet", o.shape))
    x = torch.randn(1, 1, 32, 32)
    small.eval()(x), imagenet.eval()(x)
    assert feats["small"][-1] == 4 and feats["imagenet"][-1] == 1
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


def test_three_channel_input() -> None:
    model = build_resnet("resnet34", in_channels=3).eval()
    assert model.conv1.in_channels == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet19"}, "unknown model.arch='resnet19'; expected one of ['resnet101'"),
        ({"stem": "tiny"}, "unknown model.stem='tiny'; expected one of ['imagenet', 'small']"),
        ({"in_channels": 2}, "model.in_channels=2 not supported; expected 1 or 3"),
    ],
)
def test_bad_model_options_name_the_valid_ones(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_resnet(**kwargs)
    assert message in str(err.value)


def test_image_too_small_for_stem() -> None:
    check_image_size(32, "imagenet")
    check_image_size(8, "small")
    with pytest.raises(
        ValueError, match=r"data.image_size=28 is too small for model.stem=imagenet"
    ):
        check_image_size(28, "imagenet")
    with pytest.raises(ValueError, match=r"expected >= 8 px"):
        check_image_size(7, "small")


def test_local_weights_round_trip(tmp_path: Path) -> None:
    source = build_resnet("resnet18", stem="small")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    loaded = build_resnet("resnet18", stem="small", weights_path=str(tmp_path / "model.pt"))
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_local_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(build_resnet("resnet34").state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match=r"do not fit the model"):
        build_resnet("resnet18", weights_path=str(tmp_path / "r34.pt"))
    with pytest.raises(FileNotFoundError, match=r"model.weights_path=.*missing.pt does not exist"):
        build_resnet("resnet18", weights_path=str(tmp_path / "missing.pt"))


def test_pretrained_offline_names_the_switch(tmp_path: Path, monkeypatch) -> None:
    # This machine has no route to download.pytorch.org; an empty TORCH_HOME forces a download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        build_resnet("resnet18", pretrained=True)
    message = str(err.value)
    assert "model.pretrained=false" in message and "model.weights_path" in message
    assert str(tmp_path) in message  # where to put the file by hand
