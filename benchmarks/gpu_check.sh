#!/usr/bin/env bash
# The GPU numbers, for a machine with one CUDA GPU (never needed by CI); meant to finish in ~8 minutes:
#   1. the distillation step ResNet-152 -> ResNet-18, NST-Poly on every stage + KD, at 224 px,
#      DistillModule under a Trainer vs the hand-written loop, float32 and bf16-mixed (images/s);
#   2. a whole methods_cpu study at its smoke budget on the GPU, teacher-output cache vs live teacher;
#   3. one epoch of every step of the paper chain (teacher, Base, NST-Linear, NST-Poly, TA chain).
# Writes benchmarks/results/<date>-gpu.md naming the GPU. Needs $KD_DATA_DIR/pneumoniamnist.npz
# (default ../shared/data; on a machine without it, copy the file into an ignored folder of the
# checkout and point KD_DATA_DIR there).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export KD_DATA_DIR=${KD_DATA_DIR:-$(cd .. && pwd)/shared/data}
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_SILENT=true
"$PY" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine')"
[ -f "$KD_DATA_DIR/pneumoniamnist.npz" ] || { echo "gpu_check: $KD_DATA_DIR/pneumoniamnist.npz not found (set KD_DATA_DIR)" >&2; exit 2; }
out="benchmarks/results/$(date +%F)-gpu.md"
# Each part has its own time limit; one that fails or runs over is noted and the next one runs.
part() { timeout "$1" "${@:2}" || echo "(part stopped: exit $?; limit ${1}s)"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{
  echo "# GPU check, $(date +%F): $("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB")')"
  echo
  echo "Command: \`bash benchmarks/gpu_check.sh\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  for precision in 32-true bf16-mixed; do
    part 150 "$PY" benchmarks/bench_distill.py --accelerator gpu --precision "$precision" \
      --size 224 --batch 64 --teachers resnet152 --steps 10 --warmup 3 --rounds 2 \
      --npz "$KD_DATA_DIR/pneumoniamnist.npz"
    echo
  done
  part 180 "$PY" benchmarks/bench_study.py --quick trainer=gpu
  echo
  echo "## One epoch of the paper chain (224 px, bf16-mixed, seed 0)"
  echo
  start=$(date +%s)
  part 240 "$PY" -m kd_lightning +experiment=paper trainer=gpu "chain.seeds=[0]" \
    trainer.max_epochs=1 data.path="$KD_DATA_DIR/pneumoniamnist.npz" \
    trainer.enable_progress_bar=false hydra.run.dir="$work/paper"
  echo
  echo "paper chain, one epoch per step: $(( $(date +%s) - start )) s wall"
} 2>&1 | tee "$out"
echo "wrote $out"
