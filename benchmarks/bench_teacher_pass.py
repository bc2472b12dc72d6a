"""What one teacher pass costs, and what the teacher-output cache saves (CPU, images/s).

(1) Precision and memory layout, side by side in one run: ResNet-50 teacher forward (eval,
    no_grad) and ResNet-18 student training step (forward, CE, backward, Adam) at 32 and 64 px, in
    float32 and bf16 autocast (what Trainer precision="bf16-mixed" runs), each contiguous (NCHW)
    and channels_last. Configurations alternate in rounds; images/s from the median step.
(2) The distillation step at 64 px, ResNet-50 -> ResNet-18 (NST poly on layer4, weight 50, + KD
    T=4 weight 16: the nst_poly_kd step of +experiment=methods_cpu), under a real Trainer on the
    shared PneumoniaMNIST stream (augmented, deterministic): live teacher vs teacher outputs read
    from the cache (filled by one untimed run first). Rounds alternate live / cached.

Untrained networks (random weights): speed does not depend on them. Run it with one thread, as a
long study runs:

    OMP_NUM_THREADS=1 python benchmarks/bench_teacher_pass.py            # ~3 min
    OMP_NUM_THREADS=1 python benchmarks/bench_teacher_pass.py --quick    # ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import StepTimer, make_teacher_checkpoint, make_trainer, quiet_lightning  # noqa: E402

from kd_lightning.data.datamodule import XRayDataModule  # noqa: E402
from kd_lightning.distill import KDLoss, NSTLoss  # noqa: E402
from kd_lightning.models.networks import build_model  # noqa: E402
from kd_lightning.modules.distill import DistillModule  # noqa: E402

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def spec(arch: str) -> dict:
    return {"arch": arch, "stem": "imagenet", "in_channels": 1}


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def time_teacher(net, x, precision, channels_last, steps) -> list[float]:
    x = layout(x, channels_last)
    times = []
    with torch.no_grad(), autocast(precision):
        for i in range(steps + 1):
            start = time.perf_counter()
            net(x)
            if i:
                times.append(time.perf_counter() - start)
    return times


def time_student(net, opt, x, y, precision, channels_last, steps) -> list[float]:
    x = layout(x, channels_last)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(precision):
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return times


def precision_section(args) -> list[str]:
    rows = [
        f"batch {args.batch}, {args.steps} timed steps after 1 warm-up per round, {args.rounds} "
        "rounds; images/s = batch / median step; x = vs fp32 contiguous of the same row.",
        "",
        "| network | px | fp32 | fp32 + channels_last | bf16 autocast | bf16 + channels_last |",
        "|---|---|---|---|---|---|",
    ]
    g = torch.Generator().manual_seed(0)
    for role, arch in (("teacher forward", "resnet50"), ("student train step", "resnet18")):
        for size in (32, 64):
            x = torch.randn(args.batch, 1, size, size, generator=g)
            y = torch.randint(0, 2, (args.batch,), generator=g)
            times: dict[tuple[str, bool], list[float]] = {c: [] for c in CONFIGS}
            nets = {}
            for cfg in CONFIGS:
                torch.manual_seed(0)
                net = build_model(spec(arch), 2, untrained=True)
                if cfg[1]:
                    net = net.to(memory_format=torch.channels_last)
                if role == "teacher forward":
                    nets[cfg] = (net.eval(), None)
                else:
                    nets[cfg] = (net.train(), torch.optim.Adam(net.parameters()))
            for r in range(args.rounds):
                for cfg in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
                    net, opt = nets[cfg]
                    if opt is None:
                        times[cfg] += time_teacher(net, x, *cfg, args.steps)
                    else:
                        times[cfg] += time_student(net, opt, x, y, *cfg, args.steps)
            ips = {c: args.batch / statistics.median(t) for c, t in times.items()}
            base = ips[CONFIGS[0]]
            cells = [f"{ips[c]:.0f} ({ips[c] / base:.2f}x)" for c in CONFIGS]
            rows.append(f"| {arch} {role} | {size} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def distill_section(args, tmp: Path) -> list[str]:
    size, batch = 64, args.batch
    ckpt = make_teacher_checkpoint("resnet50", tmp, size, 0)
    n = batch * (args.steps + 1)
    cache_dir = tmp / "cache"

    def datamodule() -> XRayDataModule:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/data/pneumoniamnist.yaml")
        dm = XRayDataModule(
            args.npz,
            image_size=size,
            batch_size=batch,
            train_subset=n,
            eval_subset=batch,
            train_transform=instantiate(conf.train_transform),
            stream_seed=0,
        )
        dm.setup("fit")
        return dm

    def module(cached: bool) -> DistillModule:
        torch.manual_seed(0)
        return DistillModule(
            spec("resnet18"),
            str(ckpt),
            nst=NSTLoss("poly"),
            feature_pairs=[{"student": "layer4", "teacher": "layer4", "weight": 50.0}],
            kd=KDLoss(4.0),
            kd_weight=16.0,
            teacher_cache={"enabled": cached, "dir": str(cache_dir)},
        )

    def run(cached: bool) -> StepTimer:
        timer = StepTimer(warmup=1)
        make_trainer(args.steps + 1, [timer]).fit(module(cached), datamodule=datamodule())
        return timer

    run(True)  # fills the cache (epoch 0 of seed 0), untimed
    steps: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for cached in (False, True) if r % 2 == 0 else (True, False):
            steps[cached] += run(cached).steps
    live, cached = (batch / statistics.median(steps[k]) for k in (False, True))
    return [
        f"64 px, batch {batch}, {args.steps} timed steps after 1 warm-up per run, {args.rounds} "
        "rounds alternating; fp32; step = batch start -> end under a Trainer.",
        "",
        "| teacher -> student | live teacher img/s | cached teacher img/s | cached / live |",
        "|---|---|---|---|",
        f"| resnet50 -> resnet18 (NST layer4 + KD) | {live:.0f} | {cached:.0f} | "
        f"{cached / live:.2f}x |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: env)")
    parser.add_argument(
        "--npz",
        default=str(Path(os.environ.get("KD_DATA_DIR", "data")) / "pneumoniamnist.npz"),
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["precision", "distill"])
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 6)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    print(
        f"# Teacher-pass benchmark: torch {torch.__version__}, lightning {L.__version__}, CPU, "
        f"{torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
        "\n",
        flush=True,
    )
    if "precision" not in args.skip:
        print("## Precision and layout: images/s\n")
        rows = precision_section(args)
        print("\n" + "\n".join(rows) + "\n", flush=True)
    if "distill" not in args.skip:
        print("## Distillation step: live vs cached teacher\n")
        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(distill_section(args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
