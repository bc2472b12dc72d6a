"""Data-layer benchmark on generated Kermany-size JPEGs (1000-2000 px).

(a) one epoch read through the resize-once cache vs one epoch decoding every JPEG (goal >= 20x),
    plus the one-time cache build cost;
(b) the training DataLoader (YAML train transform, batch 64, 64 px) vs a ResNet-18 training step
    (1 input channel, ImageNet stem, 2 classes) at the same size and batch (goal >= 2x).

    python benchmarks/bench_data.py            # 300 images
    python benchmarks/bench_data.py --quick    # 60 images, fewer steps: a check that it runs
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from PIL import Image  # noqa: E402

from kd_lightning.data.cache import decode_image  # noqa: E402
from kd_lightning.data.datamodule import XRayDataModule  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n chest-film-like JPEGs, 1000-2000 px wide, grayscale and RGB, in the Kermany layout."""
    rng = np.random.default_rng(seed)
    base = root / "chest_xray"
    for i in range(n):
        split = "test" if i % 5 == 4 else "train"
        cls = "NORMAL" if i % 4 == 0 else "PNEUMONIA"
        name = f"IM-{i:04d}-0001.jpeg" if cls == "NORMAL" else f"person{i}_bacteria_{i}.jpeg"
        width = int(rng.integers(1000, 2000))
        height = int(width * rng.uniform(0.65, 0.95))
        # Smooth low-resolution field upsampled plus fine noise: compresses like a film.
        coarse = rng.normal(150, 40, (12, 16)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(coarse, "L").resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 4, (height, width)).astype(np.float32)
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), "L")
        if i % 3 == 0:
            img = img.convert("RGB")
        folder = base / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / name, quality=85)
    return base


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def resnet18_step_rate(size: int, batch: int, steps: int) -> float:
    model = torchvision.models.resnet18(num_classes=2)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 2, (batch,))
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator and kernel selection
        step()
    seconds, _ = timed(lambda: [step() for _ in range(steps)])
    return steps * batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of generated JPEGs")
    parser.add_argument("--size", type=int, default=64, help="cached image size (px)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed ResNet-18 steps")
    parser.add_argument("--quick", action="store_true", help="60 images, 3 steps")
    parser.add_argument("--workdir", default=None, help="keep generated files here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps = 60, 3

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        gen_s, root = timed(lambda: make_jpegs(tmp, args.n))
        jpegs = sorted(root.rglob("*.jpeg"))
        mb = sum(p.stat().st_size for p in jpegs) / 2**20
        print(f"generated {len(jpegs)} JPEGs ({mb:.0f} MB) in {gen_s:.1f} s under {root}")

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(overrides=["+data=kermany"])
        train_tf = instantiate(cfg.data.train_transform)

        def datamodule() -> XRayDataModule:
            return XRayDataModule(
                str(root),
                image_size=args.size,
                batch_size=args.batch,
                cache_dir=str(tmp / "cache"),
                val_fraction=0.1,
                train_transform=train_tf,
            )

        # One-time build (decode pool over the cores), then a fresh DataModule as a later run.
        build_s, _ = timed(lambda: datamodule().prepare_data())
        dm = datamodule()
        setup_s, _ = timed(dm.setup)
        assert dm.cache is not None and not dm.cache.built

        # (a) one epoch of per-item work, single process: from the cache vs decoding each JPEG.
        items = [dm.datasets[s] for s in ("train", "val", "test")]
        items = [(ds, ds.transform) for ds in items]
        for ds, _ in items:
            ds.transform = None  # same per-item work on both sides: read + normalize only
        cached_s, _ = timed(lambda: [ds[i] for ds, _ in items for i in range(len(ds))])
        for ds, tf in items:
            ds.transform = tf
        to_tensor = dm.to_tensor
        decode_s, _ = timed(lambda: [to_tensor(decode_image(p, args.size)) for p in jpegs])

        def full_decode(path: Path) -> np.ndarray:
            with Image.open(path) as img:
                gray = img.convert("L")
            side = min(gray.size)
            left, top = (gray.size[0] - side) // 2, (gray.size[1] - side) // 2
            square = gray.crop((left, top, left + side, top + side))
            return np.asarray(square.resize((args.size, args.size), Image.Resampling.BILINEAR))

        nodraft_s, _ = timed(lambda: [to_tensor(full_decode(p)) for p in jpegs])

        # (b) the training loader (augmentation, batching) vs a ResNet-18 training step.
        loader = dm.train_dataloader()
        next(iter(loader))  # warm-up
        torch.manual_seed(0)
        epochs = max(1, int(np.ceil(2000 / len(dm.datasets["train"]))))
        loader_s, n_loaded = timed(lambda: sum(len(y) for _ in range(epochs) for _, y in loader))
        step_rate = resnet18_step_rate(args.size, args.batch, args.steps)

    n = len(jpegs)
    cache_rate, decode_rate, nodraft_rate = n / cached_s, n / decode_s, n / nodraft_s
    loader_rate = n_loaded / loader_s
    print()
    print(
        f"{n} JPEGs 1000-2000 px -> {args.size} px, batch {args.batch}, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    )
    print()
    print("| measurement | images/s | ratio | goal |")
    print("|---|---|---|---|")
    print(f"| (a) epoch through the cache (memmap read + normalize) | {cache_rate:,.0f} | | |")
    print(f"| (a) epoch decoding every JPEG (draft mode) | {decode_rate:,.0f} | | |")
    print(f"| (a) epoch decoding every JPEG (full decode) | {nodraft_rate:,.0f} | | |")
    print(f"| (a) cache vs draft decode | | {cache_rate / decode_rate:,.0f}x | >= 20x |")
    print(f"| (a) one-time cache build: {build_s:.2f} s | {n / build_s:,.0f} | | |")
    print(f"| (a) later run: setup from cache: {setup_s:.3f} s | | | |")
    print(f"| (b) train loader (YAML augmentation, batch {args.batch}) | {loader_rate:,.0f} | | |")
    step_name = f"ResNet-18 train step ({args.size} px, batch {args.batch})"
    print(f"| (b) {step_name} | {step_rate:,.0f} | | |")
    print(f"| (b) loader vs training step | | {loader_rate / step_rate:,.1f}x | >= 2x |")


if __name__ == "__main__":
    main()
