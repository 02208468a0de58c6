#!/usr/bin/env bash
# GPU check for the core models (run on the device machine from the repo root):
#   1. `vicinity features` on the fixtures with --backend cuda, compared with the fixture outputs;
#   2. training steps (forward + backward + AdamW) and inference of vvt_tiny 224² and lsagt_cifar_tiny 32².
# Needs .carry/vicinity.gz (gzip of the release build with --features cuda; gzipped to fit the 64 MiB
# transfer limit) and .carry/fixtures (copy of ../shared/fixtures).
# The CubeCL kernel/autotune cache travels as .carry/cache.tar (in) and $OUT/cache.tar (out).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=${BIN:-/tmp/vicinity}
[ -x "$BIN" ] || { gunzip -c .carry/vicinity.gz > "$BIN" && chmod +x "$BIN"; }
FIX=${FIX:-.carry/fixtures}
OUT=${OUT:-/tmp/out}
FIXTURES=${FIXTURES:-"vvt_mini:vvt_mini.json vvt_mini_sr:vvt_mini_sr.json lsagt_cifar_mini:lsagt_cifar_mini.toml lsagt_imagenet_mini:lsagt_imagenet_mini.toml"}
export VICINITY_CACHE=/tmp/vicinity-cache
mkdir -p "$OUT" "$VICINITY_CACHE"
[ -f .carry/cache.tar ] && tar -xzf .carry/cache.tar -C "$VICINITY_CACHE"
# Only a cache under the 16 MiB return limit comes back; a bigger one is dropped rather than truncated.
snapshot() { tar -czf /tmp/cache.tar -C "$VICINITY_CACHE" . 2>/dev/null && [ "$(stat -c %s /tmp/cache.tar)" -lt 16000000 ] && cp /tmp/cache.tar "$OUT/cache.tar"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for pair in ${FIXTURES}; do
  [ "$pair" = none ] && continue
  name=${pair%%:*}; cfg=${pair#*:}
  start=$(date +%s)
  timeout 300 "$BIN" --backend cuda features --model "configs/$cfg" --weights "$FIX/$name.pth" \
    --input "$FIX/${name}_io.safetensors" -o "$OUT/${name}_cuda.safetensors" 2>"$OUT/${name}.err" | tail -1
  echo "$name features: $(( $(date +%s) - start )) s"
  "$BIN" compare "$OUT/${name}_cuda.safetensors" "$FIX/${name}_io.safetensors" --tolerance 1e-3 | sed "s/^/PARITY $name /"
done
timeout ${VVT_LIMIT:-240} "$BIN" --backend cuda bench --model vvt_tiny --resolution 224 --batch 64 ${BENCH_ARGS:---warmup 3 --iters 10} --json "$OUT/bench.jsonl" ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench_vvt.log" | grep -v "^\s*$" | tail -4
timeout ${LSAGT_LIMIT:-240} "$BIN" --backend cuda bench --model lsagt_cifar_tiny --resolution 32 --batch 128 ${BENCH_ARGS:---warmup 3 --iters 10} --json "$OUT/bench.jsonl" ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench_lsagt.log" | grep -v "^\s*$" | tail -4
snapshot
echo "== bench rows"; cat "$OUT/bench.jsonl" 2>/dev/null
for f in "$OUT"/*.err; do [ -s "$f" ] && { echo "== $f"; head -c 1500 "$f"; }; done
