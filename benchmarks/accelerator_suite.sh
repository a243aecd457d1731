#!/usr/bin/env bash
# The GPU/TPU benchmark run, in one go (README "Speed"): what is installed, the attention kernels against each other,
# then latency and throughput vs batch size of MAGNeT (steps 20,10,10,10), MAGNeT with one step per higher codebook
# (20,1,1,1) and MusicGen with its KV cache, for 10 s and 30 s, in bfloat16. Writes JSON + PNG under $OUT.
#
#   bash benchmarks/accelerator_suite.sh                        # from the repository root
#   SIZE=small BATCHES=1,4,16,64 REPEATS=3 DURATIONS="10 30" bash benchmarks/accelerator_suite.sh
#   ALLOW_CPU=1 SIZE=256x4 BATCHES=1 REPEATS=1 DURATIONS=2 bash benchmarks/accelerator_suite.sh   # dry run on a CPU
#
# Needs a Python with jax (CUDA or TPU backend), flax, absl, matplotlib ($PYTHON, default python3); no network.
# Every step is bounded by $STEP_TIMEOUT seconds; a failed step is reported and the others still run; the exit
# status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/accelerator}
SIZE=${SIZE:-small}
BATCHES=${BATCHES:-1,4,16,64}
REPEATS=${REPEATS:-3}
DTYPE=${DTYPE:-bfloat16}
DURATIONS=${DURATIONS:-10 30}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
ALLOW_CPU=${ALLOW_CPU:-0}  # 1: run on a CPU-only JAX too (a dry run of this script, tiny SIZE / DURATIONS)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$OUT"
failures=0

step() {  # step <name> <command...>: runs it under the timeout, logs to $OUT/<name>.log
  local name=$1
  shift
  echo "== $name: $*"
  if timeout "$STEP_TIMEOUT" "$@" > >(tee "$OUT/$name.log") 2>&1; then
    echo "== $name: ok"
  else
    echo "== $name: FAILED (status $?, log $OUT/$name.log)"
    failures=$((failures + 1))
  fi
}

# 1. What is installed (written to $OUT/environment.json); stop if JAX sees no accelerator.
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) \
  >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"
cat "$OUT/nvidia-smi.txt"
if ! timeout 300 "$PYTHON" - "$OUT/environment.json" <<'EOF'
import importlib, json, sys
versions = {}
for name in ("jax", "jaxlib", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "flax", "optax", "absl",
             "matplotlib", "numpy", "torch", "audiocraft"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as e:  # absent or broken: recorded
        versions[name] = f"missing ({type(e).__name__})"
import jax
devices = jax.devices()
env = {"versions": versions, "backend": jax.default_backend(),
       "devices": [f"{d.platform}: {d.device_kind}" for d in devices]}
print(json.dumps(env, indent=2))
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
sys.exit(0 if jax.default_backend() in ("gpu", "tpu") else 3)
EOF
then
  [ "$ALLOW_CPU" = 1 ] || {
    echo "accelerator_suite: JAX has no GPU/TPU backend here (see $OUT/environment.json); nothing run" >&2
    exit 2
  }
fi

# 2. Attention kernels: cuDNN (the GPU default for 16-bit compute) against XLA; fall back to XLA if it fails.
ATTENTION=auto
step attention_kernels "$PYTHON" benchmarks/attention_kernels.py --size="$SIZE" --dtype="$DTYPE" \
  --kernels=xla,cudnn --out="$OUT/attention_kernels" || true
if grep -q '"error"' "$OUT/attention_kernels.log" 2>/dev/null || ! grep -q '"kernel": "cudnn", "ms"' \
  "$OUT/attention_kernels.log" 2>/dev/null; then
  ATTENTION=xla
fi
echo "attention kernel for the runs: $ATTENTION"

# 3. Latency / throughput vs batch: 10 s and 30 s.
for duration in $DURATIONS; do
  common=(--size="$SIZE" --duration="$duration" --dtype="$DTYPE" --batch_sizes="$BATCHES" --repeats="$REPEATS"
    --attention="$ATTENTION")
  step "nar_vs_ar_${duration}s" "$PYTHON" benchmarks/nar_vs_ar.py "${common[@]}" --methods=magnet,musicgen \
    --out="$OUT/nar_vs_ar_${duration}s"
  step "magnet_1step_${duration}s" "$PYTHON" benchmarks/nar_vs_ar.py "${common[@]}" --methods=magnet \
    --steps=20,1,1,1 --out="$OUT/magnet_1step_${duration}s"
done

# 4. Summary: batch-1 latencies and the MAGNeT / MusicGen ratio (the paper: about x7 lower latency).
"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {}
for path in sorted(out.glob("*_[0-9]*s.json")):
    rows = json.loads(path.read_text())["results"]
    summary[path.stem] = {r["method"]: r["latency_s"] for r in rows if r.get("batch") == 1}
for name, lat in summary.items():
    ratio = lat["musicgen"] / lat["magnet"] if {"magnet", "musicgen"} <= set(lat) else None
    print(f"{name}: batch-1 latency {lat}" + (f", MusicGen / MAGNeT {ratio:.1f}x" if ratio else ""))
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
EOF
echo "accelerator_suite: $failures failed step(s); results in $OUT"
exit "$failures"
