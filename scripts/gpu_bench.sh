#!/usr/bin/env bash
# One device session's checks and figures, in priority order; each part has its own time limit so a
# slow or failing part cannot starve the next. Logs go to $OUT (the device tool's folder) or bench_out/.
#
#   bash scripts/gpu_bench.sh                 # on a GPU machine, from the repo root
#   PARTS="kernels step" bash scripts/gpu_bench.sh
#
# Wheels the GPU image lacks (gguf, llguidance, and this repo's flax pin) are installed from .whl/ when
# present; see docs/benchmarks.md for how to fetch them.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PARTS=${PARTS:-"sync kernels"}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"

part() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v "^\s*$" "$OUT/$name.txt" | grep -E "^\||^#|rror|BASELINE|compile|GB/s|ms" | tail -60
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"
}

# issue 10: the fused sampler (lax.cond: a host sync each) against the split one, at the batches where the
# engine ran 3.9-7 ms per step over the bare device step; a profiler trace of each (the device timeline)
part sync "${SYNC_LIMIT:-540}" bash -c 'rc=0; for m in fused split; do python3 scripts/bench_step.py \
  --model-path scripts/configs/llama-3.1-8b --load-format dummy --batches 1,32,128 --sglang-prompts 0 \
  --short-prompts 256 --sampler-mode $m --trace "'"$OUT"'/trace-$m" --json "'"$OUT"'/step-$m.json" || rc=1; done; exit $rc'
part step "${STEP_LIMIT:-300}" python3 scripts/bench_step.py --model-path scripts/configs/llama-3.1-8b \
  --load-format dummy --sglang-prompts "${SGLANG_PROMPTS:-150}"
# the Triton kernel (the sm_80+ path) is timed next to the Mosaic kernel, its max|err| against the gathered path
part kernels "${KERNELS_LIMIT:-200}" python3 scripts/bench_kernels.py --parts decode,extend --contexts 1024 2048 8192 \
  --variants v2
# not in the default PARTS: the engine on the A100/L4 path (Triton kernel) against the gathered path it replaces,
# on this GPU as a stand-in: the gathered step's while loops wait for the host; the trace shows the idle share
part triton "${TRITON_LIMIT:-420}" bash -c 'rc=0; for a in triton gathered; do python3 scripts/bench_step.py \
  --model-path scripts/configs/llama-3.1-8b --load-format dummy --batches 1,32 --sglang-prompts 0 \
  --short-prompts 0 --attention-backend $a --trace "'"$OUT"'/trace-$a" --json "'"$OUT"'/step-$a.json" || rc=1; done; exit $rc'
part sampler "${SAMPLER_LIMIT:-45}" python3 scripts/bench_sampler.py --iters 5
part baseline "${BASELINE_LIMIT:-70}" python3 .baseline/b1.py
# quantized weights (issue 14): where the step dequantizes (exit 1: a dequantized weight copy), ms per step
part quant "${QUANT_LIMIT:-420}" bash -c 'rc=0; for q in none int8 fp8; do python3 scripts/quant_hlo.py \
  --model-path scripts/configs/llama-3.1-8b --load-format dummy --quantization $q --tokens 1 8 256 --time 20 || rc=1; \
  done; exit $rc'
# decode step per batch, decode bucket (1 vs 8 rows) and quantization (issues 10, 14)
part decode "${DECODE_LIMIT:-150}" python3 scripts/bench_decode.py --model-path scripts/configs/llama-3.1-8b \
  --load-format dummy --batches 1,8,64 --context 512 --configs "${DECODE_CONFIGS:-none/auto,int8/auto,none/fp8_e4m3}"
# the kernels on quantized pages, and standalone vs chained calls (issues 14, 11)
part kvkernels "${KVKERNELS_LIMIT:-90}" python3 scripts/bench_kernels.py --parts decode --batches 32 \
  --contexts 2048 8192 --page-sizes 64 --variants v2 --no-gathered --no-triton --kv-dtype bfloat16 fp8_e4m3 int8 --layers 16
# the measured activation headroom of the default pool sizing (issue 14)
part memory "${MEMORY_LIMIT:-100}" python3 scripts/memory_report.py --model-path scripts/configs/llama-3.1-8b \
  --load-format dummy --kv-cache-dtypes auto
