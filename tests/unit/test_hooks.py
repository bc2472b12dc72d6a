"""FeatureHooks on torchvision ResNet-18 and a branching toy model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from kd_lightning.distill import FeatureHooks, MissingFeatureError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=2).eval()


def test_captures_stage_shapes(model):
    names = ["layer1", "layer2", "layer3", "layer4", "layer4.1.conv2"]
    with FeatureHooks(model, names) as hooks, torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        shapes = {k: tuple(v.shape) for k, v in hooks.features.items()}
    assert shapes == {
        "layer1": (2, 64, 16, 16),
        "layer2": (2, 128, 8, 8),
        "layer3": (2, 256, 4, 4),
        "layer4": (2, 512, 2, 2),
        "layer4.1.conv2": (2, 512, 2, 2),
    }


def test_captured_feature_is_the_module_output_with_grad(model):
    x = torch.randn(1, 3, 32, 32)
    with FeatureHooks(model, ["layer1"]) as hooks:
        model(x)
        feat = hooks.features["layer1"]
        assert feat.requires_grad  # student features must carry the graph
        expected = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        torch.testing.assert_close(feat, expected)


def test_unknown_name_lists_valid_layers(model):
    with pytest.raises(ValueError) as err:
        FeatureHooks(model, ["layer1", "layer9"])
    msg = str(err.value)
    assert msg.startswith("unknown layer 'layer9' in ResNet; valid: conv1, bn1, relu, maxpool, ")
    assert "layer4, avgpool, fc (and any dotted submodule such as layer4.1." in msg
    assert msg.endswith("; did you mean layer4, layer3, layer2?")
    assert "\n" not in msg
    # Nothing was registered by the failed constructor.
    assert not model.layer1._forward_hooks and not model._forward_pre_hooks


def test_small_model_lists_every_module():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
    with pytest.raises(ValueError) as err:
        FeatureHooks(net, ["1.2"])
    assert str(err.value) == (
        "unknown layer '1.2' in Sequential; valid: 0, 1, 1.0, 1.1; did you mean 1.1, 1.0?"
    )


@pytest.mark.parametrize(
    ("names", "match"),
    [("layer1", "sequence of layer names"), ([], "at least one"), (["layer1", ""], "non-empty")],
)
def test_bad_names(model, names, match):
    with pytest.raises(ValueError, match=match):
        FeatureHooks(model, names)


def test_clear_empties_and_stale_access_raises(model):
    with FeatureHooks(model, ["layer1", "layer2"]) as hooks, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        assert set(hooks.features) == {"layer1", "layer2"}
        hooks.clear()
        assert len(hooks.features) == 0
        with pytest.raises(KeyError, match="'layer1' was not captured by the latest forward"):
            hooks.features["layer1"]
        with pytest.raises(MissingFeatureError, match="'fc' is not a hooked layer"):
            hooks.features["fc"]


def test_repeated_name_gets_one_hook(model):
    with FeatureHooks(model, ["layer1", "layer2", "layer1"]) as hooks:
        assert hooks.names == ("layer1", "layer2")
        assert len(model.layer1._forward_hooks) == 1


def test_overwrites_and_never_keeps_previous_forward(model):
    with FeatureHooks(model, ["layer1"]) as hooks, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        snapshot = hooks.features
        model(torch.randn(3, 3, 32, 32))
        assert len(hooks.features) == 1
        assert hooks.features["layer1"].shape[0] == 3
        assert snapshot["layer1"].shape[0] == 1  # an earlier snapshot is not mutated


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, use_a: bool) -> torch.Tensor:
        return self.a(x) if use_a else self.b(x)


def test_layer_skipped_by_latest_forward_is_not_stale():
    net = _Branchy()
    with FeatureHooks(net, ["a", "b"]) as hooks:
        net(torch.randn(1, 2), use_a=True)
        assert set(hooks.features) == {"a"}
        net(torch.randn(1, 2), use_a=False)  # no clear() in between
        assert set(hooks.features) == {"b"}
        with pytest.raises(KeyError, match="not captured by the latest forward"):
            hooks.features["a"]


def test_remove_detaches_hooks(model):
    hooks = FeatureHooks(model, ["layer1", "layer3"])
    hooks.remove()
    hooks.remove()  # idempotent
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(hooks.features) == 0
    assert not model.layer1._forward_hooks and not model.layer3._forward_hooks
    assert not model._forward_pre_hooks
    with pytest.raises(KeyError, match="hooks were removed"):
        hooks.features["layer1"]


def test_context_manager_removes_on_exit(model):
    with FeatureHooks(model, ["layer2"]) as hooks:
        assert len(model.layer2._forward_hooks) == 1
    assert not model.layer2._forward_hooks
    assert "removed" in repr(hooks)
