#!/usr/bin/env bash
# The GPU benchmark runs recorded in BENCHMARKS.md ("GPU" sections): one script, so that a short
# device lease runs all of it.  Run from the repository root on a machine with jax[cuda], flax,
# optax and chex installed:
#
#   OUT=runs/gpu bash benchmarks/gpu.sh
#
# Steps, in order of priority, each with its own time limit and all within BUDGET seconds (default
# 540; a step starts only with at least 60 s left and ends by the deadline).  The exit status is
# the worst of the steps' (124: a step ran out of time).  STEPS picks and
# orders them (default "train_step multi layer_ops"):
#   train_step.txt    issue 3: ViT-B/16 train step (12 layers, batch 256, bfloat16): frozen floor,
#                     LoRA r=8, BOFT m=1/2/4 (b=8) in mode TRAIN_MODES (default "auto": the weight
#                     side at this size); first after the 2026-11-30 change (Cayley elimination
#                     unrolled on CUDA), which no whole step has measured yet
#   multi_adapter.txt issue 6: 32 images, K in 1/4/32 adapters, ViT-B (12 layers), float32
#   layer_ops.txt     issue 3: where a BOFT layer's time goes at ViT-B/16 batch 256 (50,432 tokens,
#                     bfloat16): chains of 4 layers, frozen / LoRA / BOFT (the library's path, and
#                     the Cayley elimination as a loop); on 2026-11-30 five variants left no time
#                     for the MLP chains' timings in 240 s, compilation being most of it
#   rotate.txt        issue 2: rotate vs dense x @ M vs the reference's construction, d 4096
# Compilation dominates on the GPU machine (34-52 s per 12-layer BOFT train step), hence short lists.
# If the installed flax/optax/chex cannot import boft_jax and a folder .whl of wheels exists, those
# wheels are installed into /tmp/site (no network needed) and used instead.
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${BUDGET:-540}))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

check() {
  $PY -c "import jax, flax, optax, chex, boft_jax; print('# jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'chex', chex.__version__, jax.devices())"
}
if ! check; then
  [ -d .whl ] || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  check || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

# step NAME LIMIT COMMAND...: runs COMMAND under min(LIMIT, time to the deadline - KILL_AFTER),
# logs to $OUT/NAME.txt.  SIGTERM first (train_step.py then times what has compiled), SIGKILL
# KILL_AFTER seconds later (a signal waits for a running XLA compilation).
KILL_AFTER=15
WORST=0
step() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS - KILL_AFTER))
  shift 2
  if [ "$left" -lt 60 ]; then echo "# $name: skipped, $left s left" | tee "$OUT/$name.txt"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "# $name: limit $limit s: $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS rc
  timeout -k "$KILL_AFTER" "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "# $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  [ "$rc" -gt "$WORST" ] && WORST=$rc
  return 0
}

for s in ${STEPS:-train_step multi layer_ops}; do
  case $s in
    multi) step multi_adapter "${T_MULTI:-240}" $PY benchmarks/multi_adapter.py --layers 12 --repeats 10 ;;
    layer_ops) step layer_ops "${T_LAYER:-240}" $PY benchmarks/layer_ops.py --dtype bfloat16 --repeats 5 --inner 5 \
      --variants loop ;;
    train_step) step train_step "${T_TRAIN:-420}" $PY benchmarks/train_step.py --layers 12 --batch 256 \
      --dtype bfloat16 --modes ${TRAIN_MODES:-auto} --peft-factors --only "frozen,lora r=8,boft" --repeats 10 ;;
    rotate) step rotate "${T_ROTATE:-60}" $PY benchmarks/rotate.py --d 4096 --m 1 2 4 --b 8 --repeats 10 ;;
    *) echo "unknown step $s (multi, layer_ops, train_step, rotate)"; exit 2 ;;
  esac
done
exit "$WORST"
