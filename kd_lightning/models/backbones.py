"""torchvision ResNets for chest X-rays: 1 or 3 input channels, ImageNet or small stem, weights.

The small stem (3x3 stride-1 conv, no max-pool) is MedMNIST's choice for 28-64 px images: it keeps
the spatial resolution that the ImageNet stem's stride-4 entry would throw away. Weights come from
torchvision (online), from a local file, or not at all. Every other network (and the one entry
point used wherever a network is built from a spec) is in networks.py: `build_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

ARCHITECTURES: dict[str, tuple[Any, Any]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2),
    "resnet152": (models.resnet152, models.ResNet152_Weights.IMAGENET1K_V2),
}
STEMS = ("imagenet", "small")
# Total downsampling before layer4's output: below this the last stage sees mostly padding.
STEM_STRIDE = {"imagenet": 32, "small": 8}


class WeightsUnavailableError(RuntimeError, ValueError):
    """Pretrained weights could not be fetched (offline): one line naming the file to place.

    A ValueError too, so the CLI shows it as a one-line user error.
    """


def check_image_size(image_size: int, stem: str, spec: Mapping[str, Any] | None = None) -> None:
    """Refuse an input too small for the stem, naming the option that fixes it.

    `stem=imagenet` is every network's own ImageNet entry: total stride 32 for the ResNets and for
    the torchvision / timm families (DenseNet, MobileNet, EfficientNet, ConvNeXt, RegNet, ...), so
    the same minimum holds for them. With the model `spec`, networks that accept one input size
    only (ViTs, MaxViT, timm models with a fixed input size) are checked too.
    """
    if stem not in STEMS:
        raise ValueError(f"unknown model.stem={stem!r}; expected one of {list(STEMS)}")
    minimum = STEM_STRIDE[stem]
    if image_size < minimum:
        hint = " (use model.stem=small for small images)" if stem == "imagenet" else ""
        if spec is not None and (spec.get("family") or "resnet") != "resnet":
            hint = " (only ResNets have model.stem=small; use a larger data.image_size)"
        raise ValueError(
            f"data.image_size={image_size} is too small for model.stem={stem}: "
            f"expected >= {minimum} px, its total stride{hint}"
        )
    if spec is not None:
        from kd_lightning.models.networks import fixed_input_size

        fixed = fixed_input_size(spec)
        if fixed is not None and image_size != fixed:
            raise ValueError(
                f"data.image_size={image_size}: {spec.get('name') or spec.get('arch')} takes "
                f"{fixed} px inputs only; set data.image_size={fixed}"
            )


def build_resnet(
    arch: str = "resnet18",
    num_classes: int = 2,
    in_channels: int = 1,
    stem: str = "imagenet",
    pretrained: bool = False,
    weights_path: str | None = None,
) -> nn.Module:
    """Build a torchvision ResNet for `num_classes` outputs.

    Pretrained ImageNet weights are loaded before the stem and head are replaced; a one-channel
    stem keeps the pretrained filters summed over RGB, the usual way to reuse them for grayscale.
    `weights_path` loads a state dict saved by this project (`model.pt`) or a torchvision file.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch={arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown model.stem={stem!r}; expected one of {list(STEMS)}")
    if in_channels not in (1, 3):
        raise ValueError(f"model.in_channels={in_channels} not supported; expected 1 or 3")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; expected >= 2")
    factory, imagenet_weights = ARCHITECTURES[arch]
    model = factory(weights=_load_imagenet(arch, imagenet_weights) if pretrained else None)

    old_conv = model.conv1
    if stem == "small":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if (
        pretrained
        and model.conv1 is not old_conv
        and model.conv1.kernel_size == old_conv.kernel_size
    ):
        with torch.no_grad():
            model.conv1.weight.copy_(old_conv.weight.sum(dim=1, keepdim=True))
    model.fc = nn.Linear(model.fc.in_features, num_classes)

    if weights_path:
        load_weights(model, weights_path)
    return model


def torchvision_imagenet_weights(arch: str, weights: Any) -> Any:
    """`weights` (a torchvision weights enum member) once its file is in the hub cache; offline,
    one line naming the exact file and the folder to place it in."""
    try:
        weights.get_state_dict(progress=False)
    except Exception as err:  # URLError offline, HTTP errors, truncated downloads
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailableError(
            f"cannot fetch ImageNet weights for {arch} ({type(err).__name__}); offline, set "
            f"model.pretrained=false, or place {Path(weights.url).name} at {cache}, "
            f"or pass model.weights_path=FILE"
        ) from err
    return weights


_load_imagenet = torchvision_imagenet_weights


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into `model`, accepting Lightning checkpoints and `model.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights_path={path} does not exist; expected a .pt/.ckpt file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read weights from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}; expected a state dict")
    prefixed = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    state = prefixed or state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: another architecture or class count
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise ValueError(
            f"weights in {path} do not fit the model ({first[0].strip()}); "
            f"check model.arch (or model.name) / num_classes / in_channels / stem"
        ) from err
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit the model: missing {missing[:3]}..., "
            f"unexpected {unexpected[:3]}... (check model.arch or model.name / num_classes / "
            "in_channels / stem)"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
