"""Which layers of a network can be feature pairs, and the shape of their outputs.

    python -m kd_lightning.layers MODEL_NAME [--family torchvision|timm|resnet] [--image-size N]
                                  [--in-channels 1] [--stem imagenet|small] [--depth 2]

Builds the untrained network (no download) as training would and runs one forward of a zero image
with a hook on every module up to --depth levels deep, printing each one's name, type and output
shape (C, H, W). The names are what `module.feature_pairs` take (e.g. densenet121
`features.denseblock4`, mobilenet_v3_small `features.12`, resnet18 `layer4`); NST pairs need the
same H x W on both sides. Without --family, a torchvision name is taken before a timm one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kd_lightning.models.backbones import STEMS
from kd_lightning.models.networks import (
    FAMILIES,
    build_model,
    candidate_layers,
    layer_shapes,
    torchvision_names,
    unknown_name_message,
)

PROG = "kd_lightning.layers"


def guess_family(name: str) -> str:
    """torchvision when it has the name, else timm (when installed and it has it)."""
    if name in torchvision_names():
        return "torchvision"
    try:
        import timm
    except ImportError:
        raise ValueError(unknown_name_message(name, "torchvision", torchvision_names())) from None
    if timm.is_model(name):
        return "timm"
    raise ValueError(unknown_name_message(name, "torchvision", torchvision_names()))


def format_rows(rows: list[tuple[str, str, tuple[int, ...] | None]], image_size: int) -> list[str]:
    width = max([len(n) for n, _, _ in rows] + [5])
    kind_width = max([len(k) for _, k, _ in rows] + [6])
    lines = [f"{'layer':<{width}}  {'module':<{kind_width}}  output (C, H, W)  px per cell"]
    for name, kind, shape in rows:
        if shape is None:
            text, stride = "- (not a tensor / not called)", ""
        else:
            text = "x".join(str(d) for d in shape)
            stride = str(image_size // shape[-1]) if len(shape) == 3 and shape[-1] else ""
        lines.append(f"{name:<{width}}  {kind:<{kind_width}}  {text:<16}  {stride}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="network name, e.g. densenet121, mobilenet_v3_small")
    parser.add_argument("--family", choices=FAMILIES, default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--in-channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--stem", choices=STEMS, default="imagenet")
    parser.add_argument("--depth", type=int, default=2, help="module levels listed (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.image_size < 1 or args.depth < 1:
            raise ValueError("--image-size and --depth must be positive integers")
        family = args.family or guess_family(args.name)
        spec = {
            "family": family,
            "name": args.name,
            "in_channels": args.in_channels,
            "stem": args.stem,
        }
        net = build_model(spec, num_classes=2, untrained=True)
        rows = layer_shapes(
            net, args.image_size, args.in_channels, list(candidate_layers(net, args.depth))
        )
    except (ValueError, RuntimeError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(
        f"{family} {args.name}: {args.in_channels} x {args.image_size} x {args.image_size} input, "
        f"modules up to depth {args.depth}"
    )
    print("\n".join(format_rows(rows, args.image_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
