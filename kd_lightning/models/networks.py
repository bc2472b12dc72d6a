"""Any torchvision or timm classification network from a spec dict: the one way networks are built.

A spec is the config's `model` entry, saved in every checkpoint's hyperparameters and in
summary.json, so whatever trained a network can rebuild it:

- ResNets of conf/model/resnet*.yaml: `{arch, stem, in_channels, pretrained, weights_path}` (no
  `family`, or `family: resnet`) -> `build_resnet`, unchanged (ImageNet or small stem).
- `{family: torchvision, name, ...}`: any network of `torchvision.models.list_models()`. The first
  Conv2d is rebuilt for `in_channels` inputs and the ImageNet head for `num_classes` outputs, found
  generically by module type, so one code path covers DenseNet, MobileNet, EfficientNet, ConvNeXt,
  RegNet, ... A torchvision ResNet name goes through `build_resnet` (same network as model=resnet18,
  and model.stem=small works).
- `{family: timm, name, ...}`: `timm.create_model(name, in_chans=..., num_classes=...)`; timm
  adapts its own first convolution and head.

`arch` is what summaries, chains and reports call the network; for torchvision and timm specs it
equals `name` (conf/model/torchvision.yaml sets `arch: ${.name}`).
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models

from kd_lightning.models.backbones import (
    ARCHITECTURES,
    STEMS,
    WeightsUnavailableError,
    build_resnet,
    load_weights,
    torchvision_imagenet_weights,
)

FAMILIES = ("resnet", "torchvision", "timm")
IMAGENET_CLASSES = 1000
IN_CHANNELS = (1, 3)
# Networks whose training forward returns auxiliary outputs unless told not to.
_AUX_LOGITS = frozenset({"googlenet", "inception_v3"})
# Total stride of the ImageNet entry of the torchvision/timm classification families: the smallest
# input whose last stage still has a 1x1 map (the same rule as a ResNet's ImageNet stem).
IMAGENET_STRIDE = 32


def spec_family(spec: Mapping[str, Any]) -> str:
    """The spec's family; specs written before families existed are ResNets."""
    family = spec.get("family") or "resnet"
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family={family!r}; expected one of {list(FAMILIES)}")
    return str(family)


def spec_name(spec: Mapping[str, Any]) -> str:
    """The network's name: `name` (torchvision / timm) or `arch` (the ResNet configs)."""
    name, arch = spec.get("name"), spec.get("arch")
    if name and arch and str(name) != str(arch):
        raise ValueError(
            f"model.name={name!r} and model.arch={arch!r} disagree; set model.name only "
            "(arch follows it)"
        )
    chosen = name or arch
    if not chosen:
        raise ValueError(f"model entry {dict(spec)} names no network; expected model.name")
    return str(chosen)


@cache
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification networks (detection, video, quantized ones left out)."""
    return tuple(tv_models.list_models(module=tv_models))


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ValueError(
            "model.family=timm needs the timm package (pip install timm); or use model=torchvision"
        ) from err
    return timm


@cache
def timm_names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def unknown_name_message(name: str, family: str, known: tuple[str, ...] | list[str]) -> str:
    """One line: the unknown name, up to 5 close matches, and where to find every name."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    if family == "torchvision":
        where = f"torchvision.models.list_models() lists all {len(known)}"
    else:
        where = f"timm.list_models() lists all {len(known)}"
    return f"unknown {family} model.name={name!r}{hint} ({where})"


def check_spec(spec: Mapping[str, Any]) -> tuple[str, str]:
    """(family, name) of a spec, refusing an unknown family or name before anything is built."""
    family, name = spec_family(spec), spec_name(spec)
    if family == "resnet":
        if name not in ARCHITECTURES:
            close = difflib.get_close_matches(name, sorted(ARCHITECTURES), n=3, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(
                f"unknown model.arch={name!r}; expected one of {sorted(ARCHITECTURES)}{hint} "
                "(other networks: model=torchvision or model=timm with model.name=...)"
            )
    elif family == "torchvision":
        if name not in torchvision_names():
            raise ValueError(unknown_name_message(name, family, torchvision_names()))
    elif not _timm().is_model(name):
        raise ValueError(unknown_name_message(name, family, timm_names()))
    in_channels = spec.get("in_channels", 1)
    if in_channels not in IN_CHANNELS:
        raise ValueError(f"model.in_channels={in_channels} not supported; expected 1 or 3")
    stem = spec.get("stem", "imagenet") or "imagenet"
    if stem not in STEMS:
        raise ValueError(f"unknown model.stem={stem!r}; expected one of {list(STEMS)}")
    if stem == "small" and not (family in ("resnet", "torchvision") and name in ARCHITECTURES):
        raise ValueError(
            f"model.stem=small is only implemented for the torchvision ResNets "
            f"({', '.join(sorted(ARCHITECTURES))}); {family} {name} keeps its own entry "
            f"(stride {IMAGENET_STRIDE}): use model.stem=imagenet and data.image_size >= "
            f"{IMAGENET_STRIDE}"
        )
    return family, name


def build_model(
    spec: Mapping[str, Any], num_classes: int | None = None, *, untrained: bool = False
) -> nn.Module:
    """The network a spec describes, with `num_classes` outputs (default: the spec's, else 2).

    `untrained=True` ignores `pretrained` and `weights_path`: the architecture only, for loading a
    saved state dict into (teacher checkpoints, run directories, export).
    """
    spec = dict(spec)
    family, name = check_spec(spec)
    num_classes = int(num_classes if num_classes is not None else spec.get("num_classes", 2))
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; expected >= 2")
    in_channels = int(spec.get("in_channels", 1))
    stem = str(spec.get("stem") or "imagenet")
    pretrained = bool(spec.get("pretrained", False)) and not untrained
    weights_path = None if untrained else spec.get("weights_path")
    if name in ARCHITECTURES and family in ("resnet", "torchvision"):
        net = build_resnet(name, num_classes, in_channels, stem, pretrained, weights_path)
    else:
        if family == "torchvision":
            net = _build_torchvision(
                name, num_classes, in_channels, pretrained, spec.get("weights")
            )
        else:
            net = _build_timm(name, num_classes, in_channels, pretrained)
        if weights_path:
            load_weights(net, weights_path)
    momentum = spec.get("bn_momentum")
    if momentum is not None:
        set_bn_momentum(net, float(momentum))
    return net


def set_bn_momentum(net: nn.Module, momentum: float) -> int:
    """Set every BatchNorm's running-statistics momentum; returns how many were set.

    torchvision builds MobileNetV3 and EfficientNet with momentum 0.01, tuned for hundreds of
    ImageNet epochs: after the ~100 optimizer steps of a CPU study the running statistics are
    still near their initial (0, 1), so eval-mode outputs are wrong although training loss falls
    (deploy_cpu's MobileNetV3-Small: train loss 0.17, val AUROC 0.73 after 4 epochs at 0.01).
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"model.bn_momentum={momentum}; expected a number in (0, 1] or null")
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.momentum = momentum
    return len(norms)


def fixed_input_size(spec: Mapping[str, Any]) -> int | None:
    """The one input size a network accepts (ViT, MaxViT, timm's fixed-size models), else None."""
    family, name = check_spec(spec)
    if family == "torchvision":
        if name.startswith("vit_") or name == "maxvit_t":
            return 224
        return None
    if family == "timm":
        cfg = _timm().models.get_pretrained_cfg(name)
        if cfg is not None and getattr(cfg, "fixed_input_size", False):
            return int(cfg.input_size[-1])
    return None


# ----------------------------------------------------------------------------- torchvision


def _build_torchvision(
    name: str, num_classes: int, in_channels: int, pretrained: bool, weights: str | None
) -> nn.Module:
    imagenet = None
    if pretrained:
        enum = tv_models.get_model_weights(name)
        member = str(weights or "DEFAULT")
        try:
            chosen = enum[member] if member != "DEFAULT" else enum.DEFAULT
        except KeyError:
            valid = ["DEFAULT", *(w.name for w in enum)]
            raise ValueError(
                f"model.weights={member!r} is not a {enum.__name__} member; expected one of {valid}"
            ) from None
        imagenet = torchvision_imagenet_weights(name, chosen)
    kwargs: dict[str, Any] = {"aux_logits": False} if name in _AUX_LOGITS else {}
    if name in _AUX_LOGITS and imagenet is None:
        kwargs["init_weights"] = True
    net = tv_models.get_model(name, weights=imagenet, **kwargs)
    adapt_first_conv(net, in_channels)
    replace_head(net, num_classes)
    return net


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    """(dotted name, module) of the first Conv2d in definition order: the network's input conv."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(net).__name__} has no Conv2d; cannot adapt its input channels")


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, module)


def adapt_first_conv(net: nn.Module, in_channels: int) -> str:
    """Rebuild the first Conv2d for `in_channels` inputs; returns its name.

    For one channel the RGB filters are summed over their input channels: a gray image is the same
    value v in R, G and B, and sum_c w_c * v = (sum_c w_c) * v, so the summed filter's response to
    the gray image equals the RGB filter's response to its RGB copy; pretrained features start
    exactly where they were (the same rule as the ResNet stems). Random weights are summed too:
    a batch norm follows the input conv in every family here, so only the filters' shapes matter.
    """
    name, conv = first_conv(net)
    if conv.in_channels == in_channels:
        return name
    if conv.groups != 1 or in_channels != 1:
        raise ValueError(
            f"{type(net).__name__}.{name} takes {conv.in_channels} channels (groups="
            f"{conv.groups}); cannot adapt it to in_channels={in_channels}"
        )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(net, name, new)
    return name


def classifier_head(net: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the ImageNet classifier: the last Linear (or, as in SqueezeNet,
    the last Conv2d) with 1000 outputs."""
    linear = [
        (n, m)
        for n, m in net.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES
    ]
    if linear:
        return linear[-1]
    conv = [
        (n, m)
        for n, m in net.named_modules()
        if isinstance(m, nn.Conv2d) and m.out_channels == IMAGENET_CLASSES
    ]
    if conv:
        return conv[-1]
    raise ValueError(
        f"{type(net).__name__}: no Linear or Conv2d with {IMAGENET_CLASSES} outputs; "
        "cannot find its classifier head"
    )


def replace_head(net: nn.Module, num_classes: int) -> str:
    """Replace the ImageNet head by a freshly initialised one with `num_classes` outputs."""
    name, head = classifier_head(net)
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(
            head.in_channels,
            num_classes,
            kernel_size=head.kernel_size,
            stride=head.stride,
            padding=head.padding,
            bias=head.bias is not None,
        )
    _set_submodule(net, name, new)
    return name


# ----------------------------------------------------------------------------- timm


def timm_weights_file(name: str) -> tuple[Path, str]:
    """(local file that is used when present, its download URL) of a timm model's weights."""
    cfg = _timm().models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        url = getattr(cfg, "url", None) or "(no published weights)"
        local = Path(torch.hub.get_dir()) / "checkpoints" / f"timm--{name}.pth"
        return local, url
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    local = Path(torch.hub.get_dir()) / "checkpoints" / f"{hub_id.replace('/', '--')}-{filename}"
    return local, f"https://huggingface.co/{hub_id}/resolve/main/{filename}"


HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0


@contextmanager
def _hub_offline_unless_reachable() -> Iterator[None]:
    """Without a route to the Hugging Face hub, put huggingface_hub in offline mode for the
    call: files already in its cache still load, a missing one fails at once instead of after
    ~50 s of retries."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    try:
        socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        reachable = True
    except OSError:
        reachable = False
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _build_timm(name: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    timm = _timm()
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    local, url = timm_weights_file(name)
    if local.is_file():
        kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    try:
        with _hub_offline_unless_reachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # offline hub errors, missing weights, bad files
        first = " ".join(str(err).split())[:100]
        raise WeightsUnavailableError(
            f"cannot fetch timm weights for {name} ({type(err).__name__}: {first}); offline, set "
            f"model.pretrained=false, or place {url} at {local}, or pass model.weights_path=FILE"
        ) from err


# ----------------------------------------------------------------------------- feature layers


def candidate_layers(net: nn.Module, depth: int = 2) -> Iterator[str]:
    """Dotted module names up to `depth` levels deep, in definition order (the hookable stages)."""
    for name, _ in net.named_modules():
        if name and name.count(".") < depth:
            yield name


def layer_shapes(
    net: nn.Module, image_size: int, in_channels: int, names: list[str] | None = None
) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(name, module type, output shape without the batch) of each layer, from one forward of a
    zero image in eval mode (a layer the forward never calls, or a non-tensor output: None)."""
    names = list(names if names is not None else candidate_layers(net))
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        module = net.get_submodule(name)

        def hook(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])

        handles.append(module.register_forward_hook(hook))
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_channels, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return [(n, type(net.get_submodule(n)).__name__, shapes.get(n)) for n in names]
