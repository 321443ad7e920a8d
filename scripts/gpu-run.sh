#!/usr/bin/env bash
# Runs Arbor's CUDA checks from the kit `scripts/gpu-kit.sh` built (.gpu/), on a machine with an
# NVIDIA GPU and no Rust toolchain; logs and JSON go to $OUT (default ./gpu-out).
#
#   bash scripts/gpu-run.sh [quick]       # quick: the tests only, no benchmarks
#
# Steps, logged one after another to $OUT/steps.log and summed up in $OUT/summary.txt (a failed
# step does not stop the later ones; with machine.txt and the two benchmarks' JSON, five files:
# the device tool brings back at most eight):
#   1. the CubeCL kernels on CUDA against the CPU references (`arbor-kernels`' `on_cuda` tests);
#   2. the model on CUDA against the CPU backend on tiny random models (`arbor-tests`' `cuda`);
#   3. the kit's model header filled with random valid Q4_K/Q6_K blocks (`gguf-hollow.py`), its
#      CUDA logits against the CPU's f32 logits (the ignored test, through a tree and a commit);
#   4. `arbor bench --device cuda` on that model: plain decode and prefill, and the verify
#      cost by tree size (random weights: speed only, no acceptance figures).
# Not run on a GPU yet; expected to take a few minutes (each kernel's first launch compiles
# through NVRTC; step 3's CPU reference holds the 1.5B's weights as f32, ~7 GB). With the
# device tool: run `bash scripts/gpu-run.sh` with carry [".gpu"] and a timeout of ~480 s.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu}
OUT=${OUT:-$PWD/gpu-out}
BIN=${BIN:-/tmp/arbor-gpu}
mkdir -p "$OUT" "$BIN"
rm -f "$OUT/steps.log"
status=()
step() { # name, command...: runs it, appends its output to $OUT/steps.log, records pass/fail
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  "$@" >"$OUT/step.tmp" 2>&1
  local rc=$?
  cat "$OUT/step.tmp" >>"$OUT/steps.log"
  tail -n 25 "$OUT/step.tmp"
  rm -f "$OUT/step.tmp"
  status+=("$name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s")
}

for b in arbor kernels-tests cuda-tests; do
  [ -f "$KIT/$b.xz" ] || { echo "gpu-run: $KIT/$b.xz missing: run scripts/gpu-kit.sh first and carry $KIT" >&2; exit 2; }
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$KIT/$b.xz" "$BIN/$b"
  chmod +x "$BIN/$b"
done

# CubeCL compiles its kernels with NVRTC against the toolkit's headers (CUDA_PATH, else
# /usr/local/cuda, /opt/cuda or /usr), and cudarc loads the driver and NVRTC at run time.
if [ -z "${CUDA_PATH:-}" ]; then
  for d in /usr/local/cuda /opt/cuda; do
    [ -d "$d/include" ] && export CUDA_PATH=$d && break
  done
fi
if [ -z "${CUDA_PATH:-}" ] && command -v nvcc >/dev/null; then
  CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_PATH
fi
if ! ldconfig -p | grep -q 'libcuda\.so\.1'; then
  driver=$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/local -name 'libcuda.so.1' 2>/dev/null | head -n 1)
  [ -n "$driver" ] && export LD_LIBRARY_PATH="$(dirname "$driver")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ! ldconfig -p | grep -q 'libnvrtc\.so'; then
  nvrtc=$(find ${CUDA_PATH:+"$CUDA_PATH"/} /usr/local /opt /usr/lib -name 'libnvrtc.so*' 2>/dev/null | head -n 1)
  [ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
{
  nvidia-smi || true
  nvcc --version || true
  echo "CUDA_PATH=${CUDA_PATH:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  ldconfig -p | grep -E 'libcuda\.so|libnvrtc' || true
} >"$OUT/machine.txt" 2>&1
head -n 20 "$OUT/machine.txt"

export RUST_BACKTRACE=1
step kernels "$BIN/kernels-tests" on_cuda --test-threads 1
step model "$BIN/cuda-tests" --test-threads 1
if [ "${1:-}" != quick ]; then
  model=$BIN/model.gguf
  step fill python3 scripts/gguf-hollow.py fill "$KIT/model.hollow" "$model"
  step model-full-size env ARBOR_CUDA_GGUF="$model" "$BIN/cuda-tests" --ignored --test-threads 1
  step bench-plain "$BIN/arbor" bench --device cuda --model "$model" --plain \
    --prompt-tokens 128 --gen-tokens 64 --repeats 3 --json "$OUT/bench-plain.json"
  step verify-curve "$BIN/arbor" bench --device cuda --model "$model" --verify-curve \
    --repeats 10 --json "$OUT/verify-curve.json"
fi
echo "== summary"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
! grep -q FAILED "$OUT/summary.txt"
