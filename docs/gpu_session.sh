#!/usr/bin/env bash
# A lent-GPU session, run by the device tool in one call of under 10 minutes. STAGES picks from:
#   bench: the benchmark table (float32 and bfloat16 compute) and a tile-size check of inference;
#   data: the patch generator's rate with threads and with worker processes;
#   rate: the training step's rate at the batch the runs below use, fed by worker processes;
#   train: training runs side by side, their length fitted to the time left (issue 7), each exported
#     (--best) into $OUT/models.tgz with its metrics and log. Session 1 (2026-11-26) ran three
#     (compact DCSCN RGB fine-tuned from the shipped model, compact on Y, ESPCN-SU) with 5 threads
#     each and STAGES="bench rate train upscale"; session 2 runs the two below on the paper's
#     protocol (bicubic downscaling only, Y for the compact model) with worker processes;
#   upscale: the upscale command on the GPU;
#   convs: the matmul and Winograd convolutions (CPU routes, also selectable there) against XLA's
#     on the GPU, values and gradients (session 3 ran STAGES="convs bench", session 4 "bench");
#   tests: the model, convolution and inference tests on the GPU, at 'highest' matmul precision
#     (needs .gpu/pylib: pytest and its pure-Python dependencies copied from .venv; the test that
#     asks for 4 devices is left out). Session 5 ran STAGES="convs tests bench upscale", session 6
#     STAGES="bench upscale" (BENCH_KINDS: which of `bench train infer`, one process each).
# Needs .gpu/whl (the pure-Python wheels of requirements.txt's flax, optax, orbax-checkpoint and
# ml_collections; the machine has jax), .gpu/train (../shared/data/train as lossless WebP, to fit
# the 64 MiB transfer) and .gpu/init (models to fine-tune). Env: PY, TESTS, TESTS_TIMEOUT,
# DEADLINE_S (seconds after start by which training ends), BATCH, WORKERS (per run), MIN_STEPS,
# BENCH_ARGS, RATE_ARGS, TRAIN_ARGS (appended to every run; a dry run on a CPU shrinks them).
# Preparing .gpu here:
#   echo /.gpu/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps -d .gpu/whl flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 \
#     ml_collections==1.1.0
#   .venv/bin/python -c "import pathlib; from PIL import Image
#   for p in pathlib.Path('../shared/data/train').rglob('*.png'):
#     o = pathlib.Path('.gpu/train', p.parent.name, p.stem + '.webp'); o.parent.mkdir(parents=True, exist_ok=True)
#     Image.open(p).save(o, lossless=True, quality=100, method=4)"
# A dry run on this CPU: STAGES="data rate train" PY=.venv/bin/python NO_WHEELS=1 OUT=/tmp/o WORKERS=1
#   BATCH=4 MIN_STEPS=20 TRAIN_ARGS="--config.data.patch_size=16" bash docs/gpu_session.sh
set -u
START=$SECONDS
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
RUNS=${RUNS_DIR:-/tmp/gpu_runs}
DEADLINE_S=${DEADLINE_S:-500}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-7}
STAGES=" ${STAGES:-bench data rate train upscale} "
stage() { [[ "$STAGES" == *" $1 "* ]]; }
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  # Should the machine's other packages not suit these versions, keep its own (ml_collections added).
  $PY -c 'import flax, optax, orbax.checkpoint, ml_collections' 2>/dev/null || {
    echo "carried flax/optax/orbax do not import here: using the machine's"
    mkdir -p /tmp/site_mlc && cp -r /tmp/site/ml_collections* /tmp/site_mlc/ && export PYTHONPATH=/tmp/site_mlc; }
fi
log() { echo "[$((SECONDS - START)) s] $*"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import jax, flax, optax, orbax.checkpoint, ml_collections; print('jax', jax.__version__, 'flax',
flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, jax.devices())
from w2x_jax import conv
if ' bench ' in '$STAGES': print('float32 matmul 8192: %.0f GFLOP/s at default precision, %.0f at highest; bfloat16 %.0f' % (
    conv.measure_matmul_gflops(8192), conv.measure_matmul_gflops(8192, precision='highest'),
    conv.measure_matmul_gflops(8192, dtype='bfloat16')))" 2>&1; } | tee "$OUT/env.txt"

if stage convs; then
log 'convolutions against XLA on the GPU'
timeout 120 $PY - <<'EOF' 2>&1 | grep -v -e '^WARNING' -e '^I[0-9]'
import jax, jax.numpy as jnp, numpy as np
from w2x_jax import conv
jax.config.update('jax_default_matmul_precision', 'highest')  # not TF32: compare the maths
print('auto on', jax.default_backend(), 'is', conv.get_conv_fn('auto').__name__)
rng = np.random.default_rng(0)
for shape, k in (((3, 13, 17, 32), 3), ((2, 48, 48, 64), 3), ((2, 9, 7, 5), 1), ((1, 6, 5, 3), 3)):
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, shape[-1], 24)) * 0.1, jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape[:-1] + (24,)), jnp.float32)
  def grads(fn):
    y, vjp = jax.vjp(jax.jit(fn), x, w)
    return (y,) + vjp(dy)
  ref = grads(conv.conv2d_xla)
  for name in ('matmul', 'winograd'):
    got = grads(conv.get_conv_fn(name))
    err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(got, ref))
    print(f'{name:8s} {shape} k{k}: max relative difference (y, dx, dkernel) {err:.1e}',
          'ok' if err < 1e-4 else 'MISMATCH')
EOF
fi

if stage tests; then
log 'tests on the GPU'
JAX_PLATFORMS=cuda XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest \
  PYTHONPATH="${PYTHONPATH:-}:.gpu/pylib" \
  timeout ${TESTS_TIMEOUT:-150} $PY -m pytest -q -p no:cacheprovider -rf \
  ${TESTS:-tests/conv_test.py tests/models_test.py tests/inference_test.py} \
  --deselect tests/inference_test.py::test_four_devices_equal_one_and_pmap > "$OUT/tests.log" 2>&1
grep -v -e '^WARNING' -e '^I[0-9]' "$OUT/tests.log" | tail -15
fi

if stage bench; then
log bench
# One process per kind: the train rows alone take ~220 s on an H100 (compilation, mostly).
for kind in ${BENCH_KINDS:-train infer}; do
  timeout 230 $PY -m w2x_jax.bench $kind --dtypes float32 bfloat16 --seconds 0.5 --data-dir '' \
    --threads 8 ${BENCH_ARGS:-} --json "$OUT/bench_gpu_$kind.json" > "$OUT/bench_$kind.log" 2>&1 \
    || log "bench $kind failed: rc $?"
  grep -v -e '^WARNING' -e '^I[0-9]' -e 'cuda_timer' "$OUT/bench_$kind.log" | tail -10
done

log 'tile-size check'
timeout 60 $PY - <<'EOF' 2>&1 | tail -3
import time, numpy as np
from w2x_jax import inference, upscale
model, params, config = upscale.load_model('scale2x_noisenone')
image = np.random.default_rng(0).uniform(0, 1, (300, 200, 3)).astype(np.float32)
outs = {}
for tile in (64, 128, 256):
  outs[tile] = inference.Upscaler(params, config.model, model=model, tile_size=tile)(image)
print('tile-size check: max |difference| between tile sizes 64/128/256:',
      max(float(np.abs(outs[t] - outs[256]).max()) for t in outs))
EOF
fi

if stage data; then
log data
for how in "--threads 14" "--workers 14"; do
  timeout 60 $PY -m w2x_jax.bench data --scales 2 --seconds 4 --data-dir .gpu/train $how 2>&1 \
    | grep -e PatchGenerator -e make_batch
done
fi

if stage rate; then
log rate
timeout 120 $PY -m w2x_jax.bench train --presets dcscn_compact espcn_su --train-batch "$BATCH" \
  --workers "$WORKERS" --seconds 1 --data-dir .gpu/train ${RATE_ARGS:-} --json "$OUT/rate.json" \
  > "$OUT/rate.log" 2>&1 || log "rate bench failed: rc $?"
grep -v -e '^WARNING' -e '^I[0-9]' "$OUT/rate.log" | tail -4
fi

# Steps that fit: the rate alone, discounted for three runs sharing the machine, compile and checks.
BUDGET=$((DEADLINE_S - (SECONDS - START) - 45))
(( BUDGET < 30 )) && BUDGET=30
steps() {  # model -> steps, a multiple of 100 (at least MIN_STEPS)
  $PY -c "import json, sys
rows = {r['model']: r for r in json.load(open('$OUT/rate.json'))['rows']}
s = rows['$1']['s_per_step_fed'] if '$1' in rows else 1.0
print(max(${MIN_STEPS:-500}, int(0.5 * $BUDGET / s) // 100 * 100))" 2>/dev/null || echo "${MIN_STEPS:-500}"
}
COMPACT_STEPS=$(steps dcscn_compact)
ESPCN_STEPS=$(steps espcn_su)

if stage train; then
log "training budget ${BUDGET} s: compact ${COMPACT_STEPS} steps, espcn_su ${ESPCN_STEPS} steps (batch $BATCH)"
train() {  # name steps config args...
  local name=$1 steps=$2
  shift 2
  local every=$(( steps / 4 > 0 ? steps / 4 : 1 ))
  timeout -s TERM $((BUDGET + 40)) $PY main.py --workdir="$RUNS/$name" "$@" \
    --config.data.train_dir=.gpu/train --config.data.num_workers="$WORKERS" \
    --config.train.batch_size="$BATCH" --config.train.num_steps="$steps" \
    --config.train.eval_every=$every --config.train.checkpoint_every=$every \
    --config.train.log_every=$(( every / 5 > 0 ? every / 5 : 1 )) ${TRAIN_ARGS:-} > "$RUNS/$name.log" 2>&1
  echo "$name rc $?" >> "$RUNS/$name.log"
  $PY -m w2x_jax.checkpoint export "$RUNS/$name" "$RUNS/models/$name" --best >> "$RUNS/$name.log" 2>&1
}
# The benchmarks' LR images are MATLAB bicubic: train on bicubic downscaling alone (Pillow's
# antialiased bicubic), as the paper does, instead of the shipped models' mix of four filters.
BICUBIC_ONLY="--config.data.filter_weights.box=0 --config.data.filter_weights.bilinear=0
  --config.data.filter_weights.lanczos=0"
train paper_compact_y "$COMPACT_STEPS" --config=configs/dcscn_compact.py:noise=-1 $BICUBIC_ONLY \
  --config.train.init_from=.gpu/init/compact_y --config.train.learning_rate=1e-3 \
  --config.train.warmup_steps=200 &
# Session 1's 1e-3 diverged at step ~800 (loss spike, then the residual stuck at zero): 3e-4.
train paper_espcn_su "$ESPCN_STEPS" --config=configs/espcn_su.py:noise=-1 $BICUBIC_ONLY \
  --config.model.skip_interpolation=bicubic --config.train.learning_rate=3e-4 \
  --config.train.warmup_steps=500 &
wait
for name in paper_compact_y paper_espcn_su; do
  log "$name: $(grep -E 'Done|Stopped|rc ' "$RUNS/$name.log" | tail -2 | tr '\n' ' ')"
done
tar -C "$RUNS" -czf "$OUT/models.tgz" models $(cd "$RUNS" && ls -d */metrics.jsonl */config.json *.log 2>/dev/null)
fi

if stage upscale; then
log 'upscale command on the GPU'
# A training image where .gpu/train came along, else a random 481x321 one.
$PY -c "import numpy as np; from PIL import Image
try: Image.open('.gpu/train/bsd200/100075.webp').save('/tmp/in.png')
except OSError: Image.fromarray(np.random.default_rng(0).integers(0, 256, (321, 481, 3), np.uint8)).save('/tmp/in.png')"
UP_START=$SECONDS
timeout 60 $PY -m w2x_jax.upscale -i /tmp/in.png -o /tmp/out.png 2>&1 | tail -3
log "upscale: $((SECONDS - UP_START)) s in all"
fi
log done
