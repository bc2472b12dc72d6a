"""Distillation training-step benchmark: DistillModule under a Lightning Trainer vs a hand loop.

(1) Throughput of the distillation module (real `lightning.Trainer` fit, CPU) against a minimal
    hand-written PyTorch loop doing the same math: teacher forward under no_grad in eval mode,
    student forward/backward, CE + sum_i lambda_i NST_i (poly, d=2) + beta KD, Adam, the same
    student/teacher weights, batch and input; the hand loop fixes each pair's NST form with
    choose_poly_form (the cheaper one). ResNet-50 -> 18 and ResNet-152 -> 18 at 64 px, NST on
    every stage (layer1..4) and on the last stage only. Module and hand loop alternate in rounds;
    images/s are medians over timed steps after warm-up. Goal: module >= 0.95 x hand loop.
(2) The NST loss's share of a step: forward+backward of the NST terms on the feature maps one
    step captures vs the module's median step time (goal <= 3%).
(3) The NST loss alone on ResNet-18 <- ResNet-152 layer1 maps at 224 px (batch 32, 64 vs 256
    channels, 56x56): time and peak memory (CUDA allocator, or on CPU the RSS high-water mark of
    the first call in a fresh process).
(4) Peak memory of a distillation training step vs a plain student training step
    (ClassifierModule alone), each fitted by a Trainer in a fresh process: RSS high-water mark
    during the steps above the RSS just before the first step, and the whole process's peak.

Teachers are untrained (random weights, BatchNorm statistics set from one batch) and saved as a
Lightning-style checkpoint that `load_teacher` reads; inputs are random (or --npz upsampled).

    python benchmarks/bench_distill.py            # full sizes (several minutes on 2 CPU cores)
    python benchmarks/bench_distill.py --quick    # batch 16, few steps, ResNet-50 -> 18 only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.distill import KDLoss, NSTLoss, choose_poly_form
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.teacher import load_teacher

STUDENT = "resnet18"
TEACHERS = ("resnet50", "resnet152")
PAIR_SETS = {
    "every stage": ("layer1", "layer2", "layer3", "layer4"),
    "last stage": ("layer4",),
}
NUM_CLASSES = 2
LAYER1 = (32, 64, 256, 56)  # batch, C_s, C_t, H = W: ResNet-18 / ResNet-152 layer1 at 224 px


def model_spec(arch: str) -> dict[str, Any]:
    return {"arch": arch, "stem": "imagenet", "in_channels": 1}


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    # The frozen teacher is in eval mode on purpose; these runs have no validation data.
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")


def make_trainer(
    max_steps: int,
    callbacks: Sequence[L.Callback],
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> L.Trainer:
    return L.Trainer(
        accelerator=accelerator,
        precision=precision,
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )


# ---------------------------------------------------------------------------------------------
# Inputs, teachers, modules


def make_dataset(n: int, size: int, seed: int, npz: str | None = None) -> TensorDataset:
    """n single-channel images of size x size with binary labels, held in memory."""
    g = torch.Generator().manual_seed(seed)
    if npz:
        data = np.load(npz)
        idx = torch.randperm(len(data["train_images"]), generator=g)[:n].numpy()
        raw = torch.from_numpy(data["train_images"][idx]).float().div(255.0).unsqueeze(1)
        images = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
        images = (images - 0.5) / 0.5
        labels = torch.from_numpy(data["train_labels"][idx].reshape(-1)).long()
        if len(labels) < n:  # repeat a small file up to n
            reps = -(-n // len(labels))
            images, labels = images.repeat(reps, 1, 1, 1)[:n], labels.repeat(reps)[:n]
    else:
        images = torch.randn(n, 1, size, size, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return TensorDataset(images.contiguous(), labels)


def make_loader(dataset: TensorDataset, batch: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0, drop_last=True)


def make_teacher_checkpoint(arch: str, out_dir: Path, size: int, seed: int) -> Path:
    """An untrained teacher as a checkpoint `load_teacher` reads (state_dict + hyper_parameters).

    BatchNorm running statistics are set from one batch (cumulative average) so the eval-mode
    teacher sees activations of a sane scale, as a trained one would, not the 0 / 1 defaults.
    """
    torch.manual_seed(seed)
    module = ClassifierModule(model=model_spec(arch), num_classes=NUM_CLASSES)
    bns = [m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.model.train()
    with torch.no_grad():
        module.model(make_dataset(32, size, seed + 1).tensors[0])
    for bn in bns:
        bn.momentum = 0.1
    path = out_dir / f"teacher_{arch}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def build_distill(
    teacher_ckpt: Path, layers: Sequence[str], nst_weight: float, kd_weight: float, temp: float
) -> DistillModule:
    return DistillModule(
        model=model_spec(STUDENT),
        teacher=str(teacher_ckpt),
        num_classes=NUM_CLASSES,
        nst=NSTLoss("poly"),  # form "auto", as the config leaves it
        feature_pairs=[{"student": n, "teacher": n, "weight": nst_weight} for n in layers],
        kd=KDLoss(temperature=temp),
        kd_weight=kd_weight,
    )


# ---------------------------------------------------------------------------------------------
# (1) Throughput: Lightning module vs hand loop


class StepTimer(L.Callback):
    """Per-step seconds (batch start -> end, i.e. forward/backward/optimizer step) and per-cycle
    seconds (batch start -> next batch start: adds data fetching and the loop's own work)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[float] = []
        self.cycles: list[float] = []
        self._start: float | None = None
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = _now()
        if self._start is not None and self._seen > self.warmup:
            self.cycles.append(now - self._start)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert self._start is not None
        self._seen += 1
        if self._seen > self.warmup:
            self.steps.append(_now() - self._start)


def _now() -> float:
    """perf_counter after the GPU's queued work is done (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_module(
    module: L.LightningModule,
    loader: DataLoader,
    warmup: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> StepTimer:
    timer = StepTimer(warmup)
    make_trainer(len(loader), [timer], accelerator, precision).fit(module, loader)
    return timer


class HandLoop:
    """The same distillation step in plain PyTorch: forward hooks into dicts, Adam, no Lightning.
    On `device`; with `bf16` the forwards run under bf16 autocast, as Trainer(precision=
    "bf16-mixed") runs them (the losses turn autocast off and compute in float32 themselves)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layers: Sequence[str],
        nst_weight: float,
        kd_weight: float,
        temp: float,
        sample: torch.Tensor,
        device: torch.device | str = "cpu",
        bf16: bool = False,
    ) -> None:
        self.device, self.bf16 = torch.device(device), bf16
        sample = sample.to(self.device)
        self.student = student.to(self.device).train()
        self.teacher = teacher.to(self.device).requires_grad_(False).eval()
        self.layers = tuple(layers)
        self.nst_weight, self.kd_weight = nst_weight, kd_weight
        self.kd = KDLoss(temperature=temp)
        self.opt = torch.optim.Adam(self.student.parameters())
        self.s_feats: dict[str, torch.Tensor] = {}
        self.t_feats: dict[str, torch.Tensor] = {}
        for name in self.layers:
            student.get_submodule(name).register_forward_hook(self._hook(self.s_feats, name))
            teacher.get_submodule(name).register_forward_hook(self._hook(self.t_feats, name))
        # The cheaper exact form per pair, fixed once from the maps' shapes.
        with torch.no_grad():
            self.teacher(sample[:1])
            self.student.eval()
            self.student(sample[:1])
            self.student.train()
        self.forms = {}
        for name in self.layers:
            fs, ft = self.s_feats[name], self.t_feats[name]
            hw = min(fs.shape[2], ft.shape[2]) * min(fs.shape[3], ft.shape[3])
            self.forms[name] = choose_poly_form(fs.shape[1], ft.shape[1], hw)
        self.nst = {name: NSTLoss("poly", form=self.forms[name]) for name in self.layers}
        self.s_feats.clear()
        self.t_feats.clear()

    @staticmethod
    def _hook(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            store[name] = output

        return hook

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        images, targets = images.to(self.device), targets.to(self.device)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            logits = self.student(images)
            loss = F.cross_entropy(logits, targets)
            for name in self.layers:
                nst = self.nst[name](self.s_feats[name], self.t_feats[name])
                loss = loss + self.nst_weight * nst
            if self.kd_weight:
                loss = loss + self.kd_weight * self.kd(logits, teacher_logits)
        loss.backward()
        self.opt.step()
        self.s_feats.clear()
        self.t_feats.clear()

    def run(self, loader: DataLoader, warmup: int) -> StepTimer:
        """Timed like the module: step = step(); cycle = loop iteration start to the next one."""
        timer = StepTimer(warmup)
        for batch_idx, (images, targets) in enumerate(loader):
            timer.on_train_batch_start(None, None, None, batch_idx)
            self.step(images, targets)
            timer.on_train_batch_end(None, None, None, None, batch_idx)
        return timer


def nst_terms_ms(
    module: DistillModule, images: torch.Tensor, reps: int, teacher_term: bool = True
) -> tuple[float, dict[str, str]]:
    """Median ms of forward+backward of all weighted NST terms on one step's captured maps.

    ``teacher_term=False`` times the module's loss without the constant teacher-teacher term
    (the NST authors' variant: same gradients).
    """
    nst = copy.copy(module.nst)
    nst.teacher_term = teacher_term
    module.train()
    with torch.no_grad():
        module.teacher(images)
        module.model(images)
    s_maps = {k: v.detach().clone() for k, v in module.student_hooks.features.items()}
    t_maps = {k: v.detach().clone() for k, v in module.teacher_hooks.features.items()}
    module.clear_features()
    forms = {}
    for pair in module.pairs:
        fs, ft = s_maps[pair["student"]], t_maps[pair["teacher"]]
        hw = min(fs.shape[2], ft.shape[2]) * min(fs.shape[3], ft.shape[3])
        forms[pair["student"]] = choose_poly_form(fs.shape[1], ft.shape[1], hw, teacher_term)
    leaves = {k: v.requires_grad_(True) for k, v in s_maps.items()}
    times = []
    for i in range(reps + 1):
        for leaf in leaves.values():
            leaf.grad = None
        start = time.perf_counter()
        terms = [
            float(p["weight"]) * nst(leaves[p["student"]], t_maps[p["teacher"]])
            for p in module.pairs
        ]
        torch.stack(terms).sum().backward()
        if i > 0:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), forms


def throughput_section(args: argparse.Namespace, ckpts: dict[str, Path]) -> list[str]:
    batch, warmup, steps = args.batch, args.warmup, args.steps
    dataset = make_dataset(batch * (warmup + steps), args.size, args.seed, args.npz)
    loader = make_loader(dataset, batch)
    thr = [
        f"Student {STUDENT}, input {args.size} px, batch {batch}, {steps} timed "
        f"steps after {warmup} warm-up, x {args.rounds} round(s) alternating module / hand "
        f"loop; NST poly d=2 weight {args.nst_weight} per pair, KD T={args.temperature} weight "
        f"{args.kd_weight}, Adam. step = batch start -> end (forward, backward, optimizer); "
        "cycle = batch start -> next batch start (adds data fetch and loop overhead).",
        "",
        "| teacher -> student | NST on | hand-loop NST forms | module img/s (step) | "
        "hand img/s (step) | module / hand (step) | module img/s (cycle) | "
        "hand img/s (cycle) | module / hand (cycle) | goal >= 0.95 (both) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    share = [
        "NST terms (all pairs, weighted, form auto) forward+backward on the maps one step "
        f"captured, median of {args.reps} after 1 warm-up, vs the module's median step.",
        "",
        "| teacher -> student | NST on | forms (student layer: form) | NST ms | module step ms "
        "| NST share | goal <= 3% | without teacher term: forms | NST ms | share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for teacher_arch in args.teachers:
        for label, layers in PAIR_SETS.items():
            torch.manual_seed(args.seed)
            module = build_distill(
                ckpts[teacher_arch], layers, args.nst_weight, args.kd_weight, args.temperature
            )
            student = copy.deepcopy(module.model)  # same initial weights, separate copy
            teacher, _ = load_teacher(ckpts[teacher_arch], NUM_CLASSES)
            hand = HandLoop(
                student,
                teacher,
                layers,
                args.nst_weight,
                args.kd_weight,
                args.temperature,
                dataset.tensors[0][:1],
                "cuda" if args.accelerator == "gpu" else "cpu",
                args.precision == "bf16-mixed",
            )
            mod_timers, hand_timers = [], []
            for r in range(args.rounds):
                order = ("module", "hand") if r % 2 == 0 else ("hand", "module")
                for which in order:
                    if which == "module":
                        mod_timers.append(
                            run_module(module, loader, warmup, args.accelerator, args.precision)
                        )
                    else:
                        hand_timers.append(hand.run(loader, warmup))
            m_step = statistics.median(t for tm in mod_timers for t in tm.steps)
            h_step = statistics.median(t for tm in hand_timers for t in tm.steps)
            m_cyc = _median_or_none([t for tm in mod_timers for t in tm.cycles])
            h_cyc = _median_or_none([t for tm in hand_timers for t in tm.cycles])
            forms = ", ".join(f"{k}: {v}" for k, v in hand.forms.items())
            name = f"{teacher_arch} -> {STUDENT}"
            ratio_step = h_step / m_step
            ratio_cyc = None if m_cyc is None or h_cyc is None else h_cyc / m_cyc
            ok = min(ratio_step, ratio_cyc if ratio_cyc is not None else ratio_step) >= 0.95
            thr.append(
                f"| {name} | {label} | {forms} | {batch / m_step:.1f} | {batch / h_step:.1f} | "
                f"{ratio_step:.3f} | {_rate(batch, m_cyc)} | {_rate(batch, h_cyc)} | "
                f"{'-' if ratio_cyc is None else f'{ratio_cyc:.3f}'} | "
                f"{'yes' if ok else 'NO'} |"
            )
            if args.accelerator != "cpu":
                del module, hand, student, teacher
                continue  # the share table is this CPU's cost model; on a GPU: throughput only
            images = dataset.tensors[0][:batch]
            nst_ms, nst_forms = nst_terms_ms(module, images, args.reps)
            drop_ms, drop_forms = nst_terms_ms(module, images, args.reps, teacher_term=False)
            pct = 100.0 * nst_ms / (m_step * 1e3)
            drop_pct = 100.0 * drop_ms / (m_step * 1e3)
            share.append(
                f"| {name} | {label} | {', '.join(f'{k}: {v}' for k, v in nst_forms.items())} "
                f"| {nst_ms:.1f} | {m_step * 1e3:.0f} | {pct:.1f}% | "
                f"{'yes' if pct <= 3.0 else 'NO'} | "
                f"{', '.join(f'{k}: {v}' for k, v in drop_forms.items())} | {drop_ms:.1f} | "
                f"{drop_pct:.1f}% |"
            )
            del module, hand, student, teacher
    return thr + ["", "### NST share of the step", ""] + share


def _median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _rate(batch: int, seconds: float | None) -> str:
    return "-" if seconds is None else f"{batch / seconds:.1f}"


# ---------------------------------------------------------------------------------------------
# Memory helpers (fresh processes)


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0): the peak from here on alone.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakProbe:
    """RSS high-water mark of a stretch of work, from /proc/self/status.

    Not getrusage's ru_maxrss: exec folds the parent's high-water mark into the child's
    ru_maxrss (fork + exec of a big parent reports the parent's peak), and clear_refs does not
    reset it. The baseline is the current RSS after resetting VmHWM, or VmHWM so far where it
    cannot be reset (then transient set-up peaks hide part of the step's memory).
    """

    def mark(self) -> None:
        self.before_peak_kb = _rss_kb("VmHWM") or 0
        self.reset = _reset_peak_rss()
        current = _rss_kb("VmRSS")
        self.base_kb = current if self.reset and current is not None else self.before_peak_kb

    def extra_mb(self) -> float:
        return ((_rss_kb("VmHWM") or 0) - self.base_kb) / 1024

    def process_peak_mb(self) -> float:
        return max(self.before_peak_kb, _rss_kb("VmHWM") or 0) / 1024


class RssCallback(L.Callback):
    def __init__(self) -> None:
        self.probe = PeakProbe()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.probe.mark()


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit `steps` training steps in this (fresh) process; report RSS around them."""
    quiet_lightning()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if spec["teacher"]:
        module: ClassifierModule = build_distill(
            Path(spec["teacher"]),
            spec["layers"],
            spec["nst_weight"],
            spec["kd_weight"],
            spec["temperature"],
        )
    else:
        module = ClassifierModule(model=model_spec(STUDENT), num_classes=NUM_CLASSES)
    dataset = make_dataset(spec["batch"] * spec["steps"], spec["size"], 0)
    probe = RssCallback()
    make_trainer(spec["steps"], [probe]).fit(module, make_loader(dataset, spec["batch"]))
    return {
        "base_mb": probe.probe.base_kb / 1024,
        "extra_mb": probe.probe.extra_mb(),
        "peak_mb": probe.probe.process_peak_mb(),
        "reset": probe.probe.reset,
    }


def nst_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    f_s, f_t = make_maps(*spec["shape"])
    probe = PeakProbe()
    probe.mark()
    NSTLoss("poly")(f_s, f_t).backward()
    return {"extra_mb": probe.extra_mb(), "reset": probe.reset}


def run_child(flag: str, spec: dict[str, Any]) -> dict[str, Any]:
    # A fresh interpreter: nothing freed earlier in this process can be reused by the child.
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {flag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# (3) NST alone on 224 px layer1 maps


def make_maps(b: int, c_s: int, c_t: int, h: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    f_s = torch.rand(b, c_s, h, h, generator=g).requires_grad_(True)
    f_t = torch.rand(b, c_t, h, h, generator=g)
    return f_s, f_t


def layer1_section(args: argparse.Namespace, shape: tuple[int, int, int, int]) -> list[str]:
    b, c_s, c_t, h = shape
    f_s, f_t = make_maps(*shape)
    loss = NSTLoss("poly")
    times = []
    for i in range(args.reps + 1):
        f_s.grad = None
        start = time.perf_counter()
        loss(f_s, f_t).backward()
        if i > 0:
            times.append((time.perf_counter() - start) * 1e3)
    spec = {"shape": list(shape), "threads": torch.get_num_threads()}
    mem = run_child("--nst-memory-child", spec)
    inputs_mb = (f_s.numel() + f_t.numel()) * 4 / 2**20
    how = "reset high-water mark" if mem["reset"] else "high-water mark not resettable"
    return [
        f"Maps {b} x ({c_s} vs {c_t}) x {h}x{h}, float32, poly d=2 form auto "
        f"({choose_poly_form(c_s, c_t, h * h)}); memory: RSS high-water mark of the first call "
        f"in a fresh process above the RSS with the inputs allocated ({how}).",
        "",
        "| maps (B, C_s, C_t, HxW) | form | fwd+bwd ms | peak extra RSS MB | inputs MB | "
        "peak extra / inputs |",
        "|---|---|---|---|---|---|",
        f"| {b}, {c_s}, {c_t}, {h}x{h} | {choose_poly_form(c_s, c_t, h * h)} | "
        f"{statistics.median(times):.1f} | {mem['extra_mb']:.0f} | {inputs_mb:.0f} | "
        f"{mem['extra_mb'] / inputs_mb:.2f}x |",
    ]


# ---------------------------------------------------------------------------------------------
# (4) Step peak memory: distillation vs plain student training


def memory_section(args: argparse.Namespace, ckpts: dict[str, Path]) -> list[str]:
    base = {
        "batch": args.batch,
        "size": args.size,
        "steps": 3,
        "threads": torch.get_num_threads(),
        "nst_weight": args.nst_weight,
        "kd_weight": args.kd_weight,
        "temperature": args.temperature,
    }
    plain = run_child("--memory-child", {**base, "teacher": None, "layers": []})
    how = "reset high-water mark" if plain["reset"] else "high-water mark not resettable"
    rows = [
        f"Trainer fit of 3 steps (batch {args.batch}, {args.size} px) in a fresh process each. "
        "step extra = RSS high-water mark during the steps above the RSS just before the first "
        f"step ({how}, VmHWM): activations, gradients, Adam state, NST/KD intermediates; "
        "baseline includes the teacher's weights. process peak = whole run's VmHWM.",
        "",
        "| run | NST on | baseline RSS MB | step extra MB | step extra / plain | "
        "process peak MB | process peak / plain |",
        "|---|---|---|---|---|---|---|",
        f"| plain {STUDENT} (ClassifierModule) | - | {plain['base_mb']:.0f} | "
        f"{plain['extra_mb']:.0f} | 1.00 | {plain['peak_mb']:.0f} | 1.00 |",
    ]
    for teacher_arch in args.teachers:
        for label, layers in PAIR_SETS.items():
            spec = {**base, "teacher": str(ckpts[teacher_arch]), "layers": list(layers)}
            res = run_child("--memory-child", spec)
            rows.append(
                f"| distill {teacher_arch} -> {STUDENT} | {label} | {res['base_mb']:.0f} | "
                f"{res['extra_mb']:.0f} | {res['extra_mb'] / plain['extra_mb']:.2f} | "
                f"{res['peak_mb']:.0f} | {res['peak_mb'] / plain['peak_mb']:.2f} |"
            )
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 3 steps, R50 only")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="module/hand rounds (default 2)")
    parser.add_argument("--reps", type=int, default=None, help="NST timing reps (default 3)")
    parser.add_argument("--size", type=int, default=64, help="input size in px (default 64)")
    parser.add_argument("--teachers", nargs="+", default=None, choices=TEACHERS)
    parser.add_argument("--nst-weight", type=float, default=50.0, help="lambda per NST pair")
    parser.add_argument("--kd-weight", type=float, default=16.0, help="beta (0 turns KD off)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    parser.add_argument("--npz", default=None, help="use this npz's train_images, upsampled")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["layer1", "memory"])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--nst-memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    if args.nst_memory_child:
        print(json.dumps(nst_memory_child(json.loads(args.nst_memory_child))))
        return

    quick = args.quick
    defaults = {"batch": (16, 64), "steps": (3, 10), "warmup": (1, 2), "rounds": (1, 2)}
    defaults["reps"] = (1, 3)
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key} must be >= {0 if key == 'warmup' else 1}")
    if args.teachers is None:
        args.teachers = ["resnet50"] if quick else list(TEACHERS)
    layer1 = (max(1, LAYER1[0] // 16), *LAYER1[1:]) if quick else LAYER1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_lightning()

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: no CUDA device (torch.cuda.is_available() is False)")
    if args.accelerator == "gpu":
        args.skip = sorted(set(args.skip) | {"layer1", "memory"})  # both measure this CPU
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "CPU"
    print(
        f"# Distillation step benchmark: torch {torch.__version__}, lightning {L.__version__}, "
        f"{device}, {threads} threads, {args.precision}{' (--quick)' if quick else ''}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {
            a: make_teacher_checkpoint(a, Path(tmp), args.size, args.seed) for a in args.teachers
        }
        print("## Training-step throughput: DistillModule (Trainer) vs hand-written loop\n")
        print("\n".join(throughput_section(args, ckpts)))
        if torch.get_num_threads() != threads:
            print(f"\n(note: torch threads changed to {torch.get_num_threads()} during fit)")
        if "layer1" not in args.skip:
            print("\n## NST loss alone: ResNet-18 <- ResNet-152 layer1 maps at 224 px\n")
            print("\n".join(layer1_section(args, layer1)))
        if "memory" not in args.skip:
            print("\n## Step peak memory: distillation vs plain student training\n")
            print("\n".join(memory_section(args, ckpts)))


if __name__ == "__main__":
    main()
