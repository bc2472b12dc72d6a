"""A whole study's wall time with the teacher-output cache vs without it, side by side.

methods_cpu as a user runs it (its teacher, then every method's ResNet-18 student, one seed, 3% of
the labels) at a small budget, through the real CLI in fresh folders, twice per round:
`teacher_cache.enabled=false` (every student runs the teacher forward itself: the code before the
cache) and the default (the first distilled student fills the cache, the others read it). Each mode
gets its own empty KD_CACHE_DIR; rounds alternate which mode goes first.

Printed: each mode's wall time and the ratio (the goal the cache was built for: <= 0.5x), where the
time goes (the students' and the teacher's `fit_seconds` from summary.json: training loops with
validation and the per-epoch test pass; the rest is process start-up, testing, predictions and the
report), and whether every step's test metrics are identical between the modes (float32: a student
trained from the cache must equal the one trained with the live teacher).

    OMP_NUM_THREADS=1 python benchmarks/bench_study.py            # ~25 minutes on one core
    OMP_NUM_THREADS=1 python benchmarks/bench_study.py --quick    # ~5 minutes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"live teacher": ["teacher_cache.enabled=false"], "cached teacher": []}


def budget(quick: bool) -> list[str]:
    batches = 2 if quick else 10
    return [
        "chain.seeds=[0]",
        "chain.axes.labeled_fraction.values=[0.03]",
        f"trainer.max_epochs={1 if quick else 2}",
        f"trainer.limit_train_batches={batches}",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]


def run_study(work: Path, overrides: list[str]) -> float:
    env = dict(os.environ, KD_CACHE_DIR=str(work / "cache"), NO_ALBUMENTATIONS_UPDATE="1")
    env.setdefault("KD_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    command = [sys.executable, "-m", "kd_lightning", "+experiment=methods_cpu", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"study failed in {work}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def steps(work: Path) -> dict[str, dict]:
    """step dir -> its summary.json, for every finished step of the study."""
    study = work / "outputs" / "methods_cpu"
    chain = json.loads((study / "chain.json").read_text())
    return {
        s["dir"]: json.loads((study / s["dir"] / "summary.json").read_text())
        for s in chain["steps"]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch of 2 batches (a smoke run)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "overrides", nargs="*", help="more CLI overrides for both modes (e.g. trainer=gpu)"
    )
    args = parser.parse_args(argv)
    import torch

    print(
        f"# Whole-study benchmark: methods_cpu, torch {torch.__version__}, CPU, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n\n"
        f"Overrides: {' '.join([*budget(args.quick), *args.overrides])}\n",
        flush=True,
    )
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    fits: dict[str, list[float]] = {m: [] for m in MODES}
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
            results = {}
            for mode in order:
                work = Path(tmp) / f"r{r}_{mode.split()[0]}"
                work.mkdir()
                overrides = [*budget(args.quick), *args.overrides, *MODES[mode]]
                walls[mode].append(run_study(work, overrides))
                results[mode] = steps(work)
                fits[mode].append(sum(s["fit_seconds"] for s in results[mode].values()))
                print(f"round {r}: {mode}: {walls[mode][-1]:.0f} s", flush=True)
            live, cached = (results[m] for m in MODES)
            if set(live) != set(cached):
                raise SystemExit(f"different steps: {sorted(set(live) ^ set(cached))}")
            for name in live:
                if live[name]["test"] != cached[name]["test"]:
                    identical = False
                    print(f"  {name}: test metrics differ between the modes")
    n = len(live)
    mean = {m: sum(v) / len(v) for m, v in walls.items()}
    fit = {m: sum(v) / len(v) for m, v in fits.items()}
    rows = [
        "",
        f"{n} steps, {args.rounds} round(s); seconds are means over rounds.",
        "",
        "| mode | study wall s | fit s (training loops) | rest s (start-up, test, report) |",
        "|---|---|---|---|",
    ]
    for m in MODES:
        rows.append(f"| {m} | {mean[m]:.0f} | {fit[m]:.0f} | {mean[m] - fit[m]:.0f} |")
    ratio = mean["cached teacher"] / mean["live teacher"]
    rows += [
        "",
        "| cached / live (study wall) | cached / live (fit) | goal <= 0.5x | identical tests |",
        "|---|---|---|---|",
        f"| {ratio:.2f}x | {fit['cached teacher'] / fit['live teacher']:.2f}x | "
        f"{'yes' if ratio <= 0.5 else 'NO'} | {'yes' if identical else 'NO'} |",
    ]
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
