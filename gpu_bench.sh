#!/usr/bin/env bash
# The GPU measurements of the --compile work, in one script for a GPU session (each command well under
# ten minutes on one H200; rerun the script to continue: bases and Retrain models resume, finished
# steps are skipped through their marks in $OUT/done/).
#
#   bash gpu_bench.sh                 # on the GPU machine; DATA holds cifar10-jpeg/ (default: data)
#   DRY=1 bash gpu_bench.sh           # the same commands at toy sizes on the CPU: checks the script
#
# It prints, and keeps under $OUT (default results/gpu): the step bench eager and compiled for
# ResNet-18 (width 64) and ResNet-50 at batch 128 and at batch 1024, the fewest epochs to the targets
# (1 2 3 5) for ResNet-18, and the whole --method all comparison with --compile, timed end to end.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data}
OUT=${OUT:-results/gpu}
PY=${PY:-python}
if [ "${DRY:-0}" = 1 ]; then  # toy sizes (200 images, one epoch, a narrow ResNet, a few steps), each form once
  SIZE=(--train-limit 200 --width 8) STEPS=3 EPOCHS=1 BATCHES=(128) ARCHS=(resnet18) UNLEARN_EPOCHS=(1 2) DEVICE=cpu
  OUT=${OUT}-dry
else
  SIZE=() STEPS=50 EPOCHS=30 BATCHES=(128 1024) ARCHS=(resnet18 resnet50) UNLEARN_EPOCHS=(1 2 3 5) DEVICE=cuda
fi
DATASET=(--dataset "folder:$DATA/cifar10-jpeg" --data-dir "$DATA" --device "$DEVICE")
mkdir -p "$OUT/done"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step() {  # step NAME COMMAND...: run once, its output kept in $OUT/NAME.log, a mark when it ends well
  local name=$1; shift
  if [ -e "$OUT/done/$name" ]; then echo "== $name: done earlier ($OUT/$name.log)"; return; fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: $((SECONDS - start)) s wall" | tee -a "$OUT/$name.log"
  touch "$OUT/done/$name"
}

# the ResNet-18 base (compiled: its compile time is logged apart) and a one-epoch ResNet-50 to bench on
resume=(); [ -e checkpoints/gpu-resnet18.pt ] && resume=(--resume)  # a base cut by the ten-minute limit continues
step base-resnet18 "$PY" train.py "${DATASET[@]}" --arch resnet18 "${SIZE[@]}" --epochs "$EPOCHS" --compile \
  "${resume[@]}" --out checkpoints/gpu-resnet18.pt
step base-resnet50 "$PY" train.py "${DATASET[@]}" --arch resnet50 "${SIZE[@]}" --epochs 1 --compile \
  --out checkpoints/gpu-resnet50-1epoch.pt

for arch in "${ARCHS[@]}"; do
  base=checkpoints/gpu-resnet18.pt
  [ "$arch" = resnet50 ] && base=checkpoints/gpu-resnet50-1epoch.pt
  for batch in "${BATCHES[@]}"; do
    step "bench-$arch-b$batch" "$PY" unlearn.py "${DATASET[@]}" --arch "$arch" --base "$base" --forget-class 3 \
      --bench-steps "$STEPS" --batch-size "$batch" --compile
  done
done

step fewest-epochs "$PY" unlearn.py "${DATASET[@]}" --arch resnet18 --base checkpoints/gpu-resnet18.pt \
  --forget-class 3 --method retrain,prunelora,lora,finetune,prune-finetune --epochs "${UNLEARN_EPOCHS[@]}" \
  --compile --out-dir "$OUT"
# the whole comparison from nothing, base and Retrain included: the time a user waits
step all-compiled "$PY" unlearn.py "${DATASET[@]}" --arch resnet18 "${SIZE[@]}" --base-epochs "$EPOCHS" \
  --forget-class 3 --method all --compile --seed 1 --out-dir "$OUT"
echo "all steps done; logs in $OUT"
