"""Each compared method's share of the distillation step and its peak memory, side by side with NST.

The CPU studies' size (methods_cpu, scarce_cpu): ResNet-34 teacher -> ResNet-18 student,
1 channel, batch 128, at 32 px and 64 px; the real shared X-rays (upsampled from 28 px) when
$KD_DATA_DIR/pneumoniamnist.npz exists, else random images. Every method is built from its config
through hydra.utils.instantiate, so the bench uses the real defaults: KD and NST-poly (layer4,
weight 50) from conf/module/distill.yaml, FitNets, AT, DKD, RKD and CRD from conf/methods/*.yaml
(CRD's banks sized for the training split, N = 3882, with its real labels).

* step ms: the whole distillation step without any method term, in plain PyTorch: teacher
  forward (eval, no_grad), student forward + cross-entropy + backward, Adam step. (The studies
  read the teacher from the teacher cache after the first seed, which makes the real step
  shorter by the teacher's forward: the share against the student-only step is printed too.)
* method ms: forward + backward of the method's weighted loss on the feature maps / logits that
  one real training-mode step hooked (student maps as leaves that take gradients, teacher maps
  detached; learned parts - FitNets' connector, CRD's heads - take gradients too; CRD also
  samples its negatives and updates its banks, as in training).
* share = method ms / step ms; goal <= 5%.
* Alternating rounds: each round times the step and every method in a rotated order; medians
  over all rounds (after one untimed warm-up call each).
* peak extra MB: the largest amount of CPU memory the method's forward + backward holds above
  what was allocated before it, from torch.profiler(profile_memory=True)'s allocation records
  (every allocation and free of the CPU allocator, in time order; the maximum of the running
  sum). The same for one whole step gives the memory column's reference. largest tensor MB: the
  largest single tensor an op creates during the method's forward + backward (a dispatch mode).
* CRD bank MB: the two persistent memory banks, 2 x N x feat_dim float32 (not in the peak).

    python benchmarks/bench_methods.py            # both sizes, ~3 minutes on one core
    python benchmarks/bench_methods.py --quick    # batch 16, 32 px, one round
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from kd_lightning.distill import DistillInputs, DistillMethod
from kd_lightning.distill.crd import bank_megabytes
from kd_lightning.models.networks import build_model

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STUDENT, TEACHER = "resnet18", "resnet34"
NUM_CLASSES = 2
N_TRAIN = 3882  # the training split of the shared PneumoniaMNIST copy
GOAL_PCT = 5.0
# Bench name -> conf/methods/<file> (None: from conf/module/distill.yaml).
METHODS = {
    "KD": None,
    "NST-poly (layer4)": None,
    "FitNets": "fitnets",
    "AT": "at",
    "DKD": "dkd",
    "RKD": "rkd",
    "CRD": "crd",
}
KD_WEIGHT = 16.0  # the studies' KD and NST-Poly+KD weight (methods_cpu, scarce_cpu)


def model_spec(arch: str) -> dict[str, Any]:
    return {"arch": arch, "stem": "imagenet", "in_channels": 1}


# ---------------------------------------------------------------------------------------------
# Inputs and networks


def load_images(n: int, size: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(images (n, 1, size, size) normalised as the DataModule does, targets, all N labels)."""
    g = torch.Generator().manual_seed(seed)
    npz = Path(os.environ.get("KD_DATA_DIR", ROOT.parent / "shared" / "data")) / (
        "pneumoniamnist.npz"
    )
    if npz.is_file():
        data = np.load(npz)
        all_labels = torch.from_numpy(data["train_labels"].reshape(-1)).long()
        idx = torch.randperm(len(all_labels), generator=g)[:n]
        raw = torch.from_numpy(data["train_images"][idx.numpy()]).float().div(255.0)
        images = F.interpolate(raw.unsqueeze(1), size=(size, size), mode="bilinear")
        images = (images - 0.5) / 0.5
        return images.contiguous(), all_labels[idx], all_labels
    all_labels = (torch.rand(N_TRAIN, generator=g) < 0.9).long()
    idx = torch.randperm(N_TRAIN, generator=g)[:n]
    return torch.randn(n, 1, size, size, generator=g), all_labels[idx], all_labels


class Hooked:
    """A network whose named submodules' outputs of the latest forward land in `feats`."""

    def __init__(self, net: nn.Module, layers: tuple[str, ...]) -> None:
        self.net = net
        self.feats: dict[str, Tensor] = {}
        for name in layers:
            net.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            self.feats[name] = output

        return hook


def make_teacher(size: int, images: Tensor) -> nn.Module:
    """An untrained ResNet-34 whose BatchNorm statistics come from real images (a sane scale)."""
    torch.manual_seed(1)
    teacher = build_model(model_spec(TEACHER), NUM_CLASSES, untrained=True)
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    teacher.train()
    with torch.no_grad():
        teacher(images[:32])
    return teacher.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# The methods, from their configs


@dataclass
class Bench:
    name: str
    source: str
    loss: Callable[[DistillInputs], Tensor]
    module: nn.Module
    bank_mb: float | None = None


def _method_node(file: str) -> Any:
    node = OmegaConf.load(CONF / "methods" / f"{file}.yaml")
    return node


def build_benches(
    student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size], labels: Tensor
) -> list[Bench]:
    distill = OmegaConf.load(CONF / "module" / "distill.yaml")
    kd = instantiate(OmegaConf.create(OmegaConf.to_container(distill.kd)))
    nst = instantiate(OmegaConf.create(OmegaConf.to_container(distill.nst)))
    pair = distill.feature_pairs[0]
    nst_weight = float(pair.weight)
    benches = [
        Bench(
            "KD",
            f"conf/module/distill.yaml kd (T={kd.temperature}), weight {KD_WEIGHT:g}",
            lambda x: KD_WEIGHT * kd(x.logits_s, x.logits_t),
            kd,
        ),
        Bench(
            "NST-poly (layer4)",
            f"conf/module/distill.yaml nst ({nst.kernel}), {pair.student}, weight {nst_weight:g}",
            lambda x: nst_weight * nst(x.student[pair.student], x.teacher[pair.teacher]),
            nst,
        ),
    ]
    for name, file in METHODS.items():
        if file is None:
            continue
        method: DistillMethod = instantiate(_method_node(file))
        method.build(student_shapes, teacher_shapes, NUM_CLASSES)
        bank = None
        if file == "crd":
            method.allocate(len(labels), labels)
            bank = bank_megabytes(len(labels), method.feat_dim)
        method.train()

        def loss(x: DistillInputs, m: DistillMethod = method) -> Tensor:
            return sum(w * v for w, v in m.terms(x).values())

        benches.append(Bench(name, f"conf/methods/{file}.yaml", loss, method, bank))
    return benches


# ---------------------------------------------------------------------------------------------
# Measuring


class LargestTensor(TorchDispatchMode):
    """Largest numel of any op output during the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest_bytes = max(self.largest_bytes, o.numel() * o.element_size())
        return out


def profiled_peak_mb(fn: Callable[[], None]) -> float:
    """Peak of the running sum of the CPU allocator's allocations and frees during fn(), MB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


class Setup:
    """Networks, optimizer, one batch and the methods at one image size."""

    def __init__(self, size: int, batch: int) -> None:
        self.size, self.batch = size, batch
        self.images, self.targets, labels = load_images(batch, size)
        self.teacher = Hooked(make_teacher(size, self.images), self._layers())
        torch.manual_seed(0)
        self.student = Hooked(
            build_model(model_spec(STUDENT), NUM_CLASSES, untrained=True).train(), self._layers()
        )
        self.opt = torch.optim.Adam(self.student.net.parameters())
        self.indices = torch.randperm(len(labels), generator=torch.Generator().manual_seed(2))[
            :batch
        ]
        self.crd_targets = labels[self.indices]
        self.step()  # hooks the real shapes of a training-mode step
        shapes_s = {k: v.shape for k, v in self.student.feats.items()}
        shapes_t = {k: v.shape for k, v in self.teacher.feats.items()}
        self.benches = build_benches(shapes_s, shapes_t, labels)

    @staticmethod
    def _layers() -> tuple[str, ...]:
        return ("layer1", "layer2", "layer3", "layer4", "avgpool")

    def step(self, with_teacher: bool = True) -> None:
        """The distillation step without method terms: teacher forward, student step."""
        self.opt.zero_grad(set_to_none=True)
        if with_teacher:
            with torch.no_grad():
                self.logits_t = self.teacher.net(self.images)
        self.logits_s = self.student.net(self.images)
        F.cross_entropy(self.logits_s, self.targets).backward()
        self.opt.step()

    def inputs(self) -> DistillInputs:
        """The last step's hooked maps and logits as fresh leaves (student) / constants."""
        return DistillInputs(
            student={k: v.detach().requires_grad_(True) for k, v in self.student.feats.items()},
            teacher={k: v.detach() for k, v in self.teacher.feats.items()},
            logits_s=self.logits_s.detach().requires_grad_(True),
            logits_t=self.logits_t.detach(),
            targets=self.crd_targets,
            indices=self.indices,
            epoch=5,
        )

    def method_call(self, bench: Bench, inputs: DistillInputs) -> Callable[[], None]:
        def run() -> None:
            for p in bench.module.parameters():
                p.grad = None
            for t in (*inputs.student.values(), inputs.logits_s):
                t.grad = None
            bench.loss(inputs).backward()

        return run


def _ms(fn: Callable[[], None], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def measure(setup: Setup, rounds: int, step_reps: int, method_reps: int) -> dict[str, Any]:
    inputs = setup.inputs()
    items: dict[str, Callable[[], None]] = {
        "step": setup.step,
        "student step": lambda: setup.step(with_teacher=False),
    }
    items.update({b.name: setup.method_call(b, inputs) for b in setup.benches})
    for fn in items.values():  # untimed warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in items}
    names = list(items)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            reps = step_reps if name in ("step", "student step") else method_reps
            times[name] += _ms(items[name], reps)
    medians = {k: statistics.median(v) for k, v in times.items()}
    step_peak = profiled_peak_mb(setup.step)
    memory = {}
    for bench in setup.benches:
        call = setup.method_call(bench, inputs)
        with LargestTensor() as mode:
            call()
        memory[bench.name] = (profiled_peak_mb(call), mode.largest_bytes / 2**20)
    return {"ms": medians, "step_peak_mb": step_peak, "memory": memory, "n": len(times["step"])}


def table(setup: Setup, result: dict[str, Any]) -> list[str]:
    ms, step = result["ms"], result["ms"]["step"]
    student = result["ms"]["student step"]
    rows = [
        f"{setup.size} px, batch {setup.batch}: step (teacher fwd + student fwd/bwd + Adam) "
        f"{step:.0f} ms, student-only step {student:.0f} ms (median of {result['n']}); step peak "
        f"extra {result['step_peak_mb']:.0f} MB (profiler).",
        "",
        "| method | config | method fwd+bwd ms | share of step | <= 5%? | share of student-only "
        "step | peak extra MB | peak / step peak | largest tensor MB | CRD bank MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bench in setup.benches:
        peak, largest = result["memory"][bench.name]
        pct = 100 * ms[bench.name] / step
        rows.append(
            f"| {bench.name} | {bench.source} | {ms[bench.name]:.2f} | {pct:.2f}% | "
            f"{'yes' if pct <= GOAL_PCT else 'NO'} | {100 * ms[bench.name] / student:.2f}% | "
            f"{peak:.2f} | {100 * peak / result['step_peak_mb']:.2f}% | {largest:.2f} | "
            f"{'-' if bench.bank_mb is None else f'{bench.bank_mb:.2f}'} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 32 px, one round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch, sizes, rounds, step_reps, method_reps = args.batch, args.sizes, args.rounds, 2, 5
    if args.quick:
        batch, sizes, rounds, step_reps, method_reps = 16, [32], 1, 1, 2
    print(
        f"# Compared methods: share of the distillation step and peak memory\n\n"
        f"torch {torch.__version__}, CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, float32; {TEACHER} -> {STUDENT}, 1 channel; "
        f"{rounds} alternating rounds, medians; share goal <= {GOAL_PCT:g}%.\n"
    )
    for size in sizes:
        started = time.perf_counter()
        setup = Setup(size, batch)
        result = measure(setup, rounds, step_reps, method_reps)
        print(f"## {size} px\n")
        print("\n".join(table(setup, result)))
        print(f"\n({time.perf_counter() - started:.0f} s)\n")


if __name__ == "__main__":
    main()
