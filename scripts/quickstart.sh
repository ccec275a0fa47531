#!/usr/bin/env bash
# README command 1: set up maelab in .venv and run a short real MAE pre-training on CIFAR-10 (ViT-Tiny/4,
# 32 px) within a 3-minute budget (BUDGET=10m for longer, in runs/quickstart_10m), ending with reconstruction
# pictures and a loss curve in runs/quickstart/.
# Uses ../shared/datasets/cifar10/train when present, else downloads CIFAR-10 with torchvision.
# Override the data with DATA=/path/to/images; extra arguments go to `maelab pretrain`.
set -euo pipefail
if [ -n "${DATA:-}" ]; then  # the user's own folder, relative to where the script was started
  if [ ! -d "$DATA" ]; then  # never silently train on another
    echo "quickstart: DATA=$DATA is not a folder" >&2
    exit 2
  fi
  DATA=$(cd "$DATA" && pwd)
fi
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir -e .
DATA=${DATA:-../shared/datasets/cifar10/train}
if [ ! -d "$DATA" ]; then
  "$VENV/bin/python" -m maelab.data.cifar data/cifar10
  DATA=data/cifar10/train
fi
BUDGET=${BUDGET:-3m}
# a finished run keeps the plan of the budget it started with: another budget is another run folder
OUT=runs/quickstart
[ "$BUDGET" = 3m ] || OUT=runs/quickstart_$BUDGET
# --precision fast: bf16 autocast where the CPU or GPU has native bf16 (AVX-512 BF16 / AMX: ~1.8x faster
# steps, docs/benchmarks.md), fp32 elsewhere
"$VENV/bin/maelab" pretrain --config pretrain_cifar10_tiny --data "$DATA" \
  --limit-images 10000 --budget "$BUDGET" --batch-size 128 --base-lr 1.5e-3 \
  --vis-every 1 --save-every 1 --precision fast --out "$OUT" "$@"
