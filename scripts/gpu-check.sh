#!/usr/bin/env bash
# Prepares pskv-gpu's CUDA tests and benchmarks for a GPU machine in one call.
#
# A GPU machine here has the NVIDIA driver and NVRTC but no Rust toolchain and
# no package registry, so everything is built on this machine and copied:
#
#   scripts/gpu-check.sh                 # builds into .device-bin/
#   # then, on the GPU machine, from the project root:
#   bash .device-bin/run.sh              # logs to $OUT/gpu-check.log (or ./gpu-check.log)
#
# run.sh sets PSKV_REQUIRE_GPU=1 and PSKV_REQUIRE_NVRTC=1, so a GPU test that
# cannot find its GPU fails instead of skipping.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
grep -qxF '/.device-bin/' .git/info/exclude 2>/dev/null || echo '/.device-bin/' >> .git/info/exclude
rm -rf .device-bin && mkdir -p .device-bin

executables() { # cargo's JSON messages in, "kind path" out for each test/bench executable
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = "bench" if "bench" in m["target"]["kind"] else "test"
        print(kind, m["executable"])
'
}

{ cargo test --release -p pskv-gpu --features cuda --no-run --message-format=json-render-diagnostics
  cargo bench -p pskv-gpu --features cuda --no-run --message-format=json-render-diagnostics
} | executables | sort -r -u > .device-bin/list
# The kvstore with its tensors on the CUDA device (PSKV_GPU=cuda there): its
# device tests and benches/device.rs.
{ cargo test --release -p pskv-kvstore --features cuda --test device --no-run \
    --message-format=json-render-diagnostics
  cargo bench -p pskv-kvstore --features cuda --bench device --no-run \
    --message-format=json-render-diagnostics
} | executables | sort -r -u > .device-bin/kvlist

cat > .device-bin/run.sh <<'RUN'
set -u -o pipefail
export RUST_BACKTRACE=1 PSKV_REQUIRE_GPU=1 PSKV_REQUIRE_NVRTC=1
log=${OUT:-.}/gpu-check.log
: > "$log"
nvidia-smi >> "$log" 2>&1 || echo "nvidia-smi failed" >> "$log"
# cudarc opens libcuda and libnvrtc at run time: make them findable.
for d in /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu \
         $(dirname "$(find /usr/local /usr/lib /opt -name 'libnvrtc.so*' -print -quit 2>/dev/null)" 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >> "$log"
status=0
RUN
while read -r kind exe; do
  name="$kind-$(basename "$exe")"
  cp "$exe" ".device-bin/$name"
  strip ".device-bin/$name" 2>/dev/null || true
  if [ "$kind" = bench ]; then
    # CUDA groups only: the CPU figures belong to this machine, not that one.
    echo "echo '== $name' | tee -a \"\$log\"; ./.device-bin/$name --bench cuda_ 2>&1 | tee -a \"\$log\" || status=1" >> .device-bin/run.sh
  else
    echo "echo '== $name' | tee -a \"\$log\"; ./.device-bin/$name --include-ignored 2>&1 | tee -a \"\$log\" || status=1" >> .device-bin/run.sh
  fi
done < .device-bin/list
while read -r kind exe; do
  name="kvstore-$(basename "$exe")"
  cp "$exe" ".device-bin/$name"
  strip ".device-bin/$name" 2>/dev/null || true
  bench=""; [ "$kind" = bench ] && bench="--bench"
  echo "echo '== $name (PSKV_GPU=cuda)' | tee -a \"\$log\"; PSKV_GPU=cuda ./.device-bin/$name $bench 2>&1 | tee -a \"\$log\" || status=1" >> .device-bin/run.sh
done < .device-bin/kvlist
echo 'echo "== exit status $status" | tee -a "$log"; exit $status' >> .device-bin/run.sh
du -sh .device-bin
echo "Ready: run with carry [\".device-bin\"] and command: bash .device-bin/run.sh"
