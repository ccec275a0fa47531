#!/usr/bin/env bash
# CIFAR-10 evaluation pipeline with the exact commands: MAE pre-training (with the kNN monitor) ->
# kNN -> linear probe -> fine-tuning, and the from-scratch fine-tuning baseline (--init none).
# Every command, the machine and the numbers go to $OUT/summary.md; quote accuracies only from there.
#
#   benchmarks/cifar_eval.sh            # the full recipe (200 pre-training epochs, 100 fine-tuning
#                                       # epochs: hours on a GPU, far too long for a laptop CPU)
#   QUICK=1 benchmarks/cifar_eval.sh    # smoke test: 100 train / 20 test images per class (symlinks),
#                                       # 1 epoch of everything; proves the pipeline, measures nothing
#
# Environment: DATA (default: ../shared/datasets/cifar10 next to the repo; train/ and test/ class
# folders), OUT (default: runs/cifar_eval[_quick]), DEVICE (auto), WORKERS (-1 = one per core),
# PRETRAIN_EPOCHS (200), LINPROBE_EPOCHS (90), FINETUNE_EPOCHS (100). An existing $OUT resumes.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
QUICK=${QUICK:-0}
DATA=${DATA:-$REPO/../shared/datasets/cifar10}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:--1}
# the repo's own environment (made by scripts/quickstart.sh or scripts/test.sh) unless PYTHON names another:
# a bare `python` without torch ended in a ModuleNotFoundError traceback
if [[ -z "${PYTHON:-}" && -x "$REPO/.venv/bin/python" ]]; then PY=$REPO/.venv/bin/python; else PY=${PYTHON:-python}; fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "cifar_eval.sh: $PY cannot import torch: run scripts/quickstart.sh once (it makes .venv), or set PYTHON=" >&2
  exit 2
fi
if [[ "$QUICK" == 1 ]]; then
  OUT=${OUT:-$REPO/runs/cifar_eval_quick}
  PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-1}; LINPROBE_EPOCHS=${LINPROBE_EPOCHS:-1}; FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-1}
  QUICK_FLAGS=(--batch-size 128 --warmup-epochs 0)
else
  OUT=${OUT:-$REPO/runs/cifar_eval}
  PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-200}; LINPROBE_EPOCHS=${LINPROBE_EPOCHS:-90}; FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-100}
  QUICK_FLAGS=()
fi
mkdir -p "$OUT"
: > "$OUT/commands.txt"

if [[ "$QUICK" == 1 ]]; then  # a fixed subset, as symlinks (nothing is copied)
  "$PY" - "$DATA" "$OUT/data" <<'PYEOF'
import os, sys
src, dst = sys.argv[1:3]
for split, per_class in (("train", 100), ("test", 20)):
    for cls in sorted(os.listdir(os.path.join(src, split))):
        os.makedirs(os.path.join(dst, split, cls), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(src, split, cls)))[:per_class]:
            link = os.path.join(dst, split, cls, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(src, split, cls, name)), link)
PYEOF
  DATA="$OUT/data"
fi

run() {  # print, record and run one command
  echo "+ $*" | tee -a "$OUT/commands.txt"
  "$@"
}
COMMON=(--device "$DEVICE" --num-workers "$WORKERS")

run "$PY" -m maelab.cli pretrain --config pretrain_cifar10_tiny --data "$DATA/train" --out "$OUT/pretrain" \
  --epochs "$PRETRAIN_EPOCHS" --knn-every 10 --knn-data "$DATA/test" --knn-max 5000 "${COMMON[@]}" "${QUICK_FLAGS[@]}"
run "$PY" -m maelab.cli knn --init "$OUT/pretrain" --data "$DATA/train" --val-data "$DATA/test" \
  --out "$OUT/knn.json" --device "$DEVICE" --num-workers "$WORKERS"
run "$PY" -m maelab.cli linprobe --config linprobe_cifar_tiny --init "$OUT/pretrain" --data "$DATA/train" \
  --val-data "$DATA/test" --out "$OUT/linprobe" --epochs "$LINPROBE_EPOCHS" "${COMMON[@]}" "${QUICK_FLAGS[@]}"
run "$PY" -m maelab.cli finetune --config finetune_cifar_tiny --init "$OUT/pretrain" --data "$DATA/train" \
  --val-data "$DATA/test" --out "$OUT/finetune" --epochs "$FINETUNE_EPOCHS" "${COMMON[@]}" "${QUICK_FLAGS[@]}"
run "$PY" -m maelab.cli finetune --config finetune_cifar_tiny --init none --model mae_vit_tiny_patch4 \
  --data "$DATA/train" --val-data "$DATA/test" --out "$OUT/scratch" --epochs "$FINETUNE_EPOCHS" \
  "${COMMON[@]}" "${QUICK_FLAGS[@]}"

"$PY" - "$OUT" "$QUICK" <<'PYEOF'
import json, os, platform, subprocess, sys
import torch

out, quick = sys.argv[1], sys.argv[2] == "1"
def load(p):
    p = os.path.join(out, p)
    return json.load(open(p)) if os.path.isfile(p) else {}
try:
    cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
               if l.startswith("Model name"))
except Exception:
    cpu = platform.processor() or "unknown CPU"
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
knn, lp, ft, sc = load("knn.json"), load("linprobe/results.json"), load("finetune/results.json"), load("scratch/results.json")
rows = [
    ("kNN (k=20, T=0.07), MAE encoder", knn.get("knn_top1"), knn.get("knn_top5"), "-"),
    ("linear probe, MAE encoder (final epoch)", lp.get("val_top1"), lp.get("val_top5"), lp.get("final_epoch")),
    ("fine-tune, MAE encoder (final epoch)", ft.get("val_top1"), ft.get("val_top5"), ft.get("final_epoch")),
    ("fine-tune from scratch, --init none (final epoch)", sc.get("val_top1"), sc.get("val_top5"), sc.get("final_epoch")),
]
fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
lines = ["# CIFAR-10 evaluation" + (" -- QUICK smoke test (subset, 1 epoch): not a result" if quick else ""), "",
         f"machine: {cpu}, {cores} cores; GPU: {gpu}; torch {torch.__version__}", "",
         "| protocol | top-1 | top-5 | epochs |", "|---|---|---|---|"]
lines += [f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(e)} |" for name, a, b, e in rows]
lines += ["", "Best-epoch numbers (selected on the test split itself, optimistic) are in each results.json.",
          "", "commands:", "```", open(os.path.join(out, "commands.txt")).read().rstrip(), "```"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
