#!/usr/bin/env bash
# The GPU benchmark run recorded in BENCHMARKS.md ("GPU" sections): one script, so that a short
# device lease runs all of it.  Run from the repository root on a machine with jax[cuda], flax,
# optax and chex installed:
#
#   OUT=runs/gpu bash benchmarks/gpu.sh
#
# Writes one log per benchmark to $OUT, in order of priority (each has its own time limit):
#   train_step.txt    issue 3: ViT-B/16 train step (12 layers, batch 256, bfloat16): frozen floor,
#                     LoRA r=8 (plain and tuned), BOFT m=1/2/4 (b=8, mode auto: the weight side at
#                     256 x 197 tokens); with --matmul-forms (set MATMUL_FORMS= to leave it out) each
#                     BOFT candidate again with batched matmuls for every block size ("... mm")
#   rotate.txt        issue 2: rotate vs dense x @ M vs the reference's construction, d 4096
#   multi_adapter.txt issue 6 (only with MULTI=1): 32 images, K in 1/4/32 adapters, 12 layers
# Compilation dominates on the GPU machine (a first try with 14 train-step candidates and the
# 12-layer multi-adapter run did not finish compiling within 270 s and 120 s), hence the short list.
# If the installed flax/optax/chex cannot import boft_jax and a folder .whl of wheels exists, those
# wheels are installed into /tmp/site (no network needed) and used instead.
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
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

timeout "${T_TRAIN:-420}" $PY benchmarks/train_step.py --layers 12 --batch 256 --dtype bfloat16 \
  --modes auto --peft-factors --only "frozen,lora,boft" ${MATMUL_FORMS---matmul-forms} --repeats 10 2>&1 \
  | tee "$OUT/train_step.txt"
timeout "${T_ROTATE:-60}" $PY benchmarks/rotate.py --d 4096 --m 1 2 4 --b 8 --repeats 10 2>&1 | tee "$OUT/rotate.txt"
[ -n "${MULTI:-}" ] && timeout "${T_MULTI:-300}" $PY benchmarks/multi_adapter.py --layers 12 --repeats 10 2>&1 \
  | tee "$OUT/multi_adapter.txt"
exit 0
