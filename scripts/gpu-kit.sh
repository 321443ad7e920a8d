#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU machine needs to run Arbor's CUDA checks
# with no Rust toolchain and no network there: `scripts/gpu-run.sh` runs it.
#
#   scripts/gpu-kit.sh            # → .gpu/ (about 25 MB; ignored by git)
#
# What goes in:
# - the CUDA builds (stripped, xz-compressed) of `arbor` and of two test binaries:
#   `arbor-kernels`' unit tests (the CubeCL kernels against the CPU references, the `on_cuda`
#   module) and `arbor-tests`' `cuda` test (the model on CUDA against the CPU backend);
# - the Qwen2.5-Coder 1.5B (Q4_K_M) file's header and tensor table without its weights
#   (`scripts/gguf-hollow.py`: 6 MB), which `gpu-run.sh` fills with random valid blocks — a
#   model of the real shapes and formats for timing and for the CUDA-vs-CPU comparison.
#
# The CUDA bindings are built for the toolkit the GPU machines run (CUDA 13.0 with driver 580
# here; set CUDARC_CUDA_VERSION=12080 and the like for another). Nothing here needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
MODEL=${MODEL:-qwen2.5-coder-1.5b}
mkdir -p "$KIT"
rm -f "$KIT"/*.xz "$KIT"/*.hollow

echo "== building the CUDA test binaries (CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION)"
cargo test --release -p arbor-kernels -p arbor-tests \
  --features arbor-kernels/cuda,arbor-tests/cuda --lib --test cuda --no-run \
  --message-format=json-render-diagnostics >"$KIT/build.json"
python3 - "$KIT/build.json" "$KIT" <<'EOF'
import json, shutil, sys
want = {("arbor_kernels", "lib"): "kernels-tests", ("cuda", "test"): "cuda-tests"}
found = {}
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        name = want.get((t["name"], t["kind"][0]))
        if name:
            found[name] = m["executable"]
missing = sorted(set(want.values()) - set(found))
if missing:
    sys.exit(f"gpu-kit: no test binary for {missing}")
for name, path in found.items():
    shutil.copy(path, f"{sys.argv[2]}/{name}")
EOF
rm "$KIT/build.json"

echo "== building arbor with --features cuda"
cargo build --release -p arbor-server --features arbor-server/cuda
cp target/release/arbor "$KIT/arbor"

for b in arbor kernels-tests cuda-tests; do
  strip "$KIT/$b"
  xz -T0 -6 -f "$KIT/$b"
done

echo "== the model's header ($MODEL)"
gguf=$(target/release/arbor fetch "$MODEL" | tail -1)
python3 scripts/gguf-hollow.py hollow "$gguf" "$KIT/model.hollow"

ls -la "$KIT"
# The device tool carries at most 64 MiB per call, the repository's own files (~3 MB) included.
bytes=$(du -sb "$KIT" | cut -f1)
[ "$bytes" -lt $((56 << 20)) ] || echo "gpu-kit: WARNING: $KIT holds $bytes bytes: too much to carry with the repository" >&2
echo "== next, with a GPU lent: the device tool's run with carry [\"$KIT\"] and command"
echo "   bash scripts/gpu-run.sh"
