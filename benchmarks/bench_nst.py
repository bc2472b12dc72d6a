"""Benchmark NST loss formulations: forward+backward time and memory, printed as markdown tables.

Table 1, polynomial kernel (d=2, c=0) on the stage shapes in POLY_SHAPES: channel-pair
Gram form vs spatial Gram form vs the automatic choice vs the naive broadcast B x C x C x HW
kernel of public code (run only where its largest tensor fits under --naive-max-gb).
Table 2, every kernel on ResNet-18 -> ResNet-152 layer1 maps at 224 px (batch 32, 64 vs 256
channels, 56x56): time, peak memory above the inputs (CUDA allocator; on CPU the peak RSS of the
first call in a fresh process), and the largest single tensor created (exact, by a dispatch mode).
Table 3, the Gaussian kernel: the blocked autograd Function of kd_lightning against the same math as
plain autograd ops on whole (B, C, C') matrices (the previous implementation), and what dropping
the constant teacher-teacher term (teacher_term=False, the NST authors' code) saves for the
Gaussian and polynomial kernels, on ResNet-50 -> ResNet-18 maps at 64 px.

    python benchmarks/bench_nst.py            # full sizes (minutes on 2 CPU cores)
    python benchmarks/bench_nst.py --quick    # reduced batch, one repetition
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kd_lightning.distill import NSTLoss, choose_poly_form
from kd_lightning.distill.nst import _default_sigma2

# (batch, C_s, C_t, H) with H = W: ResNet-18 stages against ResNet-50 stages (C_t = 4 C_s) at
# 64 px (2x2 layer4, 16x16 layer1) and 224 px (56x56 layer1, 14x14 layer3).
POLY_SHAPES = [(64, 512, 2048, 2), (32, 64, 256, 16), (8, 64, 256, 56), (32, 256, 1024, 14)]
LAYER1 = (32, 64, 256, 56)
BYTES = 4


def naive_poly_broadcast(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The public RepDistiller/mdistiller kernel: a B x C_a x C_b x HW product per term."""
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(f_t.detach().flatten(2), dim=2)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return (k(t, t).mean((1, 2)) + k(s, s).mean((1, 2)) - 2 * k(s, t).mean((1, 2))).mean()


def dense_gaussian(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Gaussian NST as plain autograd ops on whole (B, C_a, C_b) matrices; same value as NSTLoss."""
    s = F.normalize(f_s.flatten(2), dim=2, eps=1e-12)
    t = F.normalize(f_t.detach().flatten(2), dim=2, eps=1e-12)
    sq_s, sq_t = (s * s).sum(2), (t * t).sum(2)
    # The same bandwidth as NSTLoss: only the kernel evaluation is under test here.
    inv = (-0.5 / _default_sigma2(s, t)).view(-1, 1, 1)

    def k(a, b, sq_a, sq_b):
        base = sq_a.unsqueeze(2) + sq_b.unsqueeze(1)
        d = torch.baddbmm(base, a, b.transpose(1, 2), alpha=-2.0).clamp_min(0.0)
        return torch.exp(d * inv).mean((1, 2))

    with torch.no_grad():
        k_tt = k(t, t, sq_t, sq_t)
    return (k(s, s, sq_s, sq_s) + k_tt - 2 * k(s, t, sq_s, sq_t)).mean()


# (batch, C_s, C_t, H): ResNet-18 vs ResNet-50 stages at 64 px (layer4, layer3, layer1).
TERM_SHAPES = [(128, 512, 2048, 2), (64, 256, 1024, 4), (64, 64, 256, 16)]


def naive_largest_bytes(b: int, c_s: int, c_t: int, hw: int) -> int:
    return b * max(c_s, c_t) ** 2 * hw * BYTES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    reps: int,
) -> float:
    """Median milliseconds of one forward+backward after one warm-up call."""
    times = []
    for i in range(reps + 1):
        f_s.grad = None
        _sync(f_s.device)
        start = time.perf_counter()
        fn(f_s, f_t).backward()
        _sync(f_s.device)
        if i > 0:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class LargestTensor(TorchDispatchMode):
    """Largest numel of any op output during the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


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
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0): the peak of this call alone.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_extra_mb(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], f_s: torch.Tensor, f_t: torch.Tensor
) -> float | None:
    """Peak memory above what was in use before one forward+backward, in MB (CUDA only here)."""
    f_s.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(f_s, f_t).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _child_peak_rss_mb(kernel: str, shape: tuple[int, int, int, int], threads: int) -> float | None:
    # Runs in a fresh process: the allocator has no freed memory to reuse yet, so the RSS
    # high-water mark of the first call is the call's real footprint (plus one-time set-up).
    torch.set_num_threads(threads)
    f_s, f_t = make_maps(*shape, torch.device("cpu"))
    if not _reset_peak_rss():
        return None
    before = _rss_kb("VmRSS")
    NSTLoss(kernel)(f_s, f_t).backward()
    peak = _rss_kb("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024


def peak_extra_rss_mb(kernel: str, shape: tuple[int, int, int, int]) -> float | None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child_peak_rss_mb, (kernel, shape, torch.get_num_threads()))


def largest_tensor_mb(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], f_s: torch.Tensor, f_t: torch.Tensor
) -> float:
    f_s.grad = None
    with LargestTensor() as mode:
        fn(f_s, f_t).backward()
    return mode.largest * f_s.element_size() / 2**20


def make_maps(
    b: int, c_s: int, c_t: int, h: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    f_s = torch.rand(b, c_s, h, h, generator=g, device=device).requires_grad_(True)
    f_t = torch.rand(b, c_t, h, h, generator=g, device=device)
    return f_s, f_t


def _fmt(ms: float | None) -> str:
    return "skipped" if ms is None else f"{ms:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.1f}x"


def poly_table(shapes, reps: int, naive_max_gb: float, device: torch.device) -> list[str]:
    rows = [
        "| maps (B, C_s, C_t, HxW) | auto picks | channel ms | spatial ms | auto ms | "
        "naive broadcast ms | channel / spatial | naive / auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    losses = {f: NSTLoss("poly", form=f) for f in ("channel", "spatial", "auto")}
    for b, c_s, c_t, h in shapes:
        f_s, f_t = make_maps(b, c_s, c_t, h, device)
        ms = {f: time_fwd_bwd(loss, f_s, f_t, reps) for f, loss in losses.items()}
        need_gb = naive_largest_bytes(b, c_s, c_t, h * h) / 1e9
        naive = None
        naive_cell = f"skipped ({need_gb:.1f} GB tensor)"
        if need_gb <= naive_max_gb:
            naive = time_fwd_bwd(naive_poly_broadcast, f_s, f_t, reps)
            naive_cell = _fmt(naive)
        rows.append(
            f"| {b}, {c_s}, {c_t}, {h}x{h} | {choose_poly_form(c_s, c_t, h * h)} | "
            f"{_fmt(ms['channel'])} | {_fmt(ms['spatial'])} | {_fmt(ms['auto'])} | {naive_cell} | "
            f"{_ratio(ms['channel'], ms['spatial'])} | {_ratio(naive, ms['auto'])} |"
        )
        del f_s, f_t
    return rows


def layer1_table(shape, reps: int, device: torch.device) -> list[str]:
    b, c_s, c_t, h = shape
    f_s, f_t = make_maps(b, c_s, c_t, h, device)
    input_mb = (f_s.numel() + f_t.numel()) * BYTES / 2**20
    naive_gb = naive_largest_bytes(b, c_s, c_t, h * h) / 2**30
    mem_label = (
        "peak extra MB (CUDA)" if device.type == "cuda" else "peak extra RSS MB (fresh process)"
    )
    rows = [
        f"layer1 maps {b} x ({c_s} vs {c_t}) x {h}x{h}; inputs {input_mb:.0f} MB; "
        f"the naive broadcast's largest tensor would be {naive_gb:.1f} GiB",
        "",
        f"| kernel | form | fwd+bwd ms | {mem_label} | largest tensor MB |",
        "|---|---|---|---|---|",
    ]
    for kernel in ("linear", "poly", "gaussian"):
        loss = NSTLoss(kernel)
        form = choose_poly_form(c_s, c_t, h * h) if kernel == "poly" else "-"
        ms = time_fwd_bwd(loss, f_s, f_t, reps)
        if device.type == "cuda":
            peak = peak_extra_mb(loss, f_s, f_t)
        else:
            peak = peak_extra_rss_mb(kernel, shape)
        largest = largest_tensor_mb(loss, f_s, f_t)
        peak_cell = "n/a" if peak is None else f"{peak:.0f}"
        rows.append(f"| {kernel} | {form} | {ms:.1f} | {peak_cell} | {largest:.1f} |")
    return rows


def gaussian_and_teacher_term_table(shapes, reps: int, device: torch.device) -> list[str]:
    rows = [
        "| maps (B, C_s, C_t, HxW) | gaussian dense autograd ms | gaussian blocked ms | "
        "dense / blocked | gaussian, no teacher term ms | poly ms | poly, no teacher term ms "
        "(form) | poly / no teacher term |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, c_s, c_t, h in shapes:
        f_s, f_t = make_maps(b, c_s, c_t, h, device)
        check = float(dense_gaussian(f_s, f_t)), float(NSTLoss("gaussian")(f_s, f_t))
        if abs(check[0] - check[1]) > 1e-4 * max(1.0, abs(check[0])):
            raise RuntimeError(f"dense and blocked Gaussian NST disagree: {check}")
        dense = time_fwd_bwd(dense_gaussian, f_s, f_t, reps)
        blocked = time_fwd_bwd(NSTLoss("gaussian"), f_s, f_t, reps)
        g_drop = time_fwd_bwd(NSTLoss("gaussian", teacher_term=False), f_s, f_t, reps)
        poly = time_fwd_bwd(NSTLoss("poly"), f_s, f_t, reps)
        p_drop = time_fwd_bwd(NSTLoss("poly", teacher_term=False), f_s, f_t, reps)
        form = choose_poly_form(c_s, c_t, h * h, teacher_term=False)
        rows.append(
            f"| {b}, {c_s}, {c_t}, {h}x{h} | {_fmt(dense)} | {_fmt(blocked)} | "
            f"{_ratio(dense, blocked)} | {_fmt(g_drop)} | {_fmt(poly)} | {_fmt(p_drop)} "
            f"({form}) | {_ratio(poly, p_drop)} |"
        )
        del f_s, f_t
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch / 8 (layer1: / 16), 1 rep")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument(
        "--naive-max-gb",
        type=float,
        default=2.5,
        help="run the naive broadcast only if its largest tensor is at most this many GB",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    shapes, layer1, reps, naive_max = POLY_SHAPES, LAYER1, args.reps, args.naive_max_gb
    term_shapes = TERM_SHAPES
    if args.quick:
        shapes = [(max(1, b // 8), cs, ct, h) for b, cs, ct, h in shapes]
        term_shapes = [(max(1, b // 8), cs, ct, h) for b, cs, ct, h in term_shapes]
        layer1 = (max(1, LAYER1[0] // 16), *LAYER1[1:])
        reps, naive_max = 1, min(naive_max, 1.0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# NST benchmark: torch {torch.__version__}, {name}, "
        f"{torch.get_num_threads()} threads, median of {reps} (after 1 warm-up), float32\n"
    )
    print("## Polynomial kernel (d=2, c=0), forward + backward\n")
    print("\n".join(poly_table(shapes, reps, naive_max, device)))
    print("\n## All kernels on ResNet-18 <- ResNet-152 layer1 maps (224 px)\n")
    print("\n".join(layer1_table(layer1, reps, device)))
    print("\n## Gaussian kernel, and dropping the teacher-teacher term (ResNet-50 -> 18, 64 px)\n")
    print("\n".join(gaussian_and_teacher_term_table(term_shapes, reps, device)))


if __name__ == "__main__":
    main()
