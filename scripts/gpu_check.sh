#!/usr/bin/env bash
# GPU checks and benchmarks, run on the device machine from the repo root. Stages (STAGES, in order):
#   kernels    `vicinity check-kernels`: every fused kernel against its reference path, f32
#   fixtures   `vicinity features` on the fixtures with --backend cuda, compared with the fixture outputs
#   bench      training and inference of vvt_tiny 224² (batch 64) and lsagt_cifar_tiny 32² (batch 128),
#              f32 and bf16 (BENCH_DTYPES)
#   memory     vvt_tiny batch 16 f32 training at 224/384/512/768 (speed and memory, CSV + PNG)
#   attention  one attention layer of each kind against the token grid side
#   profile    per-kernel GPU time of 5 steady training steps (PROFILE_MODELS), by kernel family and matmul shape
#   ncu        GPU time of every kernel (cuBLAS's included) in 2 steady steps per NCU_MODELS entry
#              `model:res:batch[:mode]`, by Nsight Compute, against the unprofiled step time: tells
#              how much of a step the GPU is busy
#   hostprof   where the host's time goes in steady steps, per HOSTPROF_MODELS entry `model:res:batch[:mode]`
#              (needs a build with `--features cuda,host-profile` and symbols; stacks come back gzipped)
#   ab         A/B of environment switches: each AB_CONFIGS entry (`VAR=value+VAR=value`, `+` between the
#              variables since values such as VICINITY_FUSED lists hold commas; `-` for none;
#              e.g. VICINITY_REDUCE=unit, VICINITY_MATMUL=<kernel>, VICINITY_CONV_SPLIT=1) on each AB_MODELS
#              entry `model:res:batch[:mode]`, bf16; a table of img/s last
#   trainab    training speed of the real loop per TRAINAB_CONFIGS entry (flags and env), a few epochs each
#   train      CIFAR-10 from .carry/cifar10-jpeg.tar.zst: TRAIN_MODEL (vvt_tiny) with the cifar-fast recipe
#              at 32², bf16, TRAIN_BUDGET (4m); TRAIN_ARGS adds flags (not --out); metrics and curves come back;
#              then the last checkpoint is evaluated again with --tta-flip; TRAIN_WARM=1 compiles first;
#              TRAIN_TAG names the files that come back (default: the model), for several runs in one call
#   long       a run longer than one call: compiles its kernels (20 throw-away steps), then starts
#              `train --model TRAIN_MODEL --budget TRAIN_BUDGET LONG_ARGS` (CIFAR-10, bf16) in its own
#              process session, so it outlives the call (until the machine goes back, 30 minutes after
#              its start); its run directory is runs/long, kept on the warm machine between calls
#   watch      follows runs/long for up to WATCH_S seconds (540) or until it ends; once ended, evaluates
#              the last and best checkpoints (and EMA weights) with --tta-flip; metrics come back each time
# Needs .carry/vicinity.gz (gzip of `cargo build --release --features cuda`, gzipped to fit the 64 MiB
# transfer limit) and .carry/fixtures (a copy of ../shared/fixtures). The CubeCL kernel cache travels as
# .carry/cache.tar (in) and $OUT/cache.tar (out). Everything printed also lands in $OUT/log.txt; the
# machine returns at most 8 files from $OUT, so scratch files stay in /tmp.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# cuBLAS (the matmuls, src/kernels/cublas.rs): the toolkit's, else the one PyTorch's wheels bring.
CUBLAS_LIB=$(python3 -c 'import nvidia.cublas as c, os; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$CUBLAS_LIB" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$CUBLAS_LIB
# In the checkout, not /tmp: one fresh machine refused to execute from /tmp (session 8 run 7).
BIN=${BIN:-$PWD/.carry/vicinity-bin}
# Always unpack: a warm machine keeps the previous call's binary. Through a rename, since a run
# started by `long` may still be executing the old file.
gunzip -c .carry/vicinity.gz > "$BIN.new" && chmod +x "$BIN.new" && mv -f "$BIN.new" "$BIN"
FIX=${FIX:-.carry/fixtures}
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-fixtures bench}
FIXTURES=${FIXTURES:-"vvt_mini:vvt_mini.json vvt_mini_sr:vvt_mini_sr.json lsagt_cifar_mini:lsagt_cifar_mini.toml lsagt_imagenet_mini:lsagt_imagenet_mini.toml"}
BENCH_DTYPES=${BENCH_DTYPES:-bf16 f32}
ITERS=${ITERS:---warmup 3 --iters 10}
export VICINITY_CACHE=/tmp/vicinity-cache VICINITY_KERNEL_LOG=/tmp/kernels.log
SCRATCH=/tmp/scratch
mkdir -p "$OUT" "$VICINITY_CACHE" "$SCRATCH"
exec > >(tee -a "$OUT/log.txt") 2>&1
[ -f .carry/cache.tar ] && tar -xf .carry/cache.tar -C "$VICINITY_CACHE"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# Runs a command with a time limit, then prints its wall time and how many kernels it compiled.
timed() {
  local label=$1 limit=$2; shift 2
  local before start rc
  before=$(wc -l < "$VICINITY_KERNEL_LOG" 2>/dev/null || echo 0)
  start=$(date +%s%N)
  timeout "$limit" "$@"; rc=$?
  printf 'TIME %-40s %6d ms  rc=%s  kernels compiled=%s\n' "$label" "$(( ($(date +%s%N) - start) / 1000000 ))" \
    "$rc" "$(( $(wc -l < "$VICINITY_KERNEL_LOG" 2>/dev/null || echo 0) - before ))"
}

for stage in $STAGES; do
  echo "== stage $stage"
  case $stage in
  kernels)
    timed "check-kernels" 300 "$BIN" --backend cuda check-kernels ;;
  fixtures)
    for pair in $FIXTURES; do
      name=${pair%%:*}; cfg=${pair#*:}
      timed "features $name" 300 "$BIN" --backend cuda features --model "configs/$cfg" --weights "$FIX/$name.pth" \
        --input "$FIX/${name}_io.safetensors" -o "$SCRATCH/${name}_cuda.safetensors" | tail -1
      "$BIN" compare "$SCRATCH/${name}_cuda.safetensors" "$FIX/${name}_io.safetensors" --tolerance 1e-3 | sed "s/^/PARITY $name /"
    done ;;
  bench)
    for dtype in $BENCH_DTYPES; do
      timed "bench vvt_tiny 224 b64 $dtype" ${VVT_LIMIT:-200} "$BIN" --backend cuda bench --model vvt_tiny \
        --resolution 224 --batch 64 --dtype "$dtype" $ITERS --json "$OUT/bench.jsonl"
      timed "bench lsagt_cifar_tiny 32 b128 $dtype" ${LSAGT_LIMIT:-200} "$BIN" --backend cuda bench \
        --model lsagt_cifar_tiny --resolution 32 --batch 128 --dtype "$dtype" $ITERS --json "$OUT/bench.jsonl"
    done ;;
  memory)
    timed "memory sweep vvt_tiny b16 f32" ${MEM_LIMIT:-300} "$BIN" --backend cuda bench --model vvt_tiny --batch 16 \
      --mode train --sweep-res ${MEM_RES:-224,384,512,768} --warmup 2 --iters 5 --report "$SCRATCH/memory" \
      --json "$OUT/bench.jsonl"
    cp "$SCRATCH/memory/bench.csv" "$OUT/memory.csv"; cp "$SCRATCH/memory/bench.png" "$OUT/memory.png" ;;
  attention)
    timed "attention sweep" ${ATTN_LIMIT:-300} "$BIN" --backend cuda bench --attention vicinity lsagt-local lsagt-global \
      --batch 16 --sweep-res ${ATTN_SIDES:-14,28,56,112} --warmup 2 --iters 5 --report "$SCRATCH/attention" \
      --json "$OUT/bench.jsonl"
    cp "$SCRATCH/attention/bench.csv" "$OUT/attention.csv"; cp "$SCRATCH/attention/bench.png" "$OUT/attention.png" ;;
  profile)
    # Two runs of the same bench (2 and 7 training steps); the summary skips the shorter run's launches,
    # which leaves 5 steady-state steps, and matches matmul launches with their logged shapes.
    for spec in ${PROFILE_MODELS:-vvt_tiny:224:64 lsagt_cifar_tiny:32:128}; do
      IFS=: read -r model res batch <<< "$spec"
      for steps in 1 6; do
        rm -f "/tmp/prof$steps.log" "/tmp/shapes$steps.log"
        CUBECL_DEBUG_LOG=/tmp/prof$steps.log CUBECL_DEBUG_OPTION=profile VICINITY_MATMUL_LOG=/tmp/shapes$steps.log \
          timed "profile $model ($steps+1 steps)" 150 "$BIN" --backend cuda bench --model "$model" --resolution "$res" \
          --batch "$batch" --dtype bf16 --mode train --warmup 0 --iters $steps > /dev/null
      done
      echo "-- profile $model ${res}² batch $batch bf16, 5 steady training steps"
      python3 scripts/profile_summary.py /tmp/prof6.log 22 --skip-like /tmp/prof1.log \
        --shapes /tmp/shapes6.log /tmp/shapes1.log
      [ -n "${PROFILE_FULL:-}" ] && python3 scripts/profile_summary.py /tmp/prof6.log 30 --full --skip-like /tmp/prof1.log
    done ;;
  hostprof)
    for spec in ${HOSTPROF_MODELS:-vvt_tiny:224:64 lsagt_cifar_tiny:32:128}; do
      IFS=: read -r model res batch mode <<< "$spec"
      tag="$model-${mode:-train}"
      VICINITY_HOST_PROFILE="$SCRATCH/host-$tag.txt" timed "host profile $spec" 200 "$BIN" --backend cuda bench \
        --model "$model" --resolution "$res" --batch "$batch" --dtype bf16 --mode "${mode:-train}" \
        --warmup 5 --iters 20 | tail -1
      python3 scripts/host_profile_summary.py "$SCRATCH/host-$tag.txt" --top 30 ${HOSTPROF_MATCH:-}
      gzip -c "$SCRATCH/host-$tag.txt" > "$OUT/host-$tag.txt.gz"
    done ;;
  ncu)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for spec in ${NCU_MODELS:-vvt_tiny:224:64 lsagt_cifar_tiny:32:128}; do
      IFS=: read -r model res batch mode <<< "$spec"
      args=(--backend cuda bench --model "$model" --resolution "$res" --batch "$batch" --dtype bf16 --mode "${mode:-train}")
      timed "unprofiled $spec" 150 "$BIN" "${args[@]}" --warmup 3 --iters 10 --json "$SCRATCH/ncu-wall.jsonl" | tail -1
      for steps in 1 3; do
        timed "ncu $spec ($steps+1 steps)" ${NCU_LIMIT:-200} "$NCU" --clock-control none --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size \
          --csv --print-units base --log-file "/tmp/ncu$steps.csv" "$BIN" "${args[@]}" --warmup 0 --iters $steps > /dev/null
      done
      python3 scripts/ncu_summary.py /tmp/ncu3.csv --skip-like /tmp/ncu1.csv --steps 2 --top 25 \
        --wall "$SCRATCH/ncu-wall.jsonl" --sequence "$OUT/seq-$model-${mode:-train}.tsv" | tee "$OUT/ncu-$model-${mode:-train}.txt"
      rm -f "$SCRATCH/ncu-wall.jsonl"
    done ;;
  ab)
    for spec in ${AB_MODELS:-lsagt_cifar_tiny:32:128 vvt_tiny:224:64}; do
      IFS=: read -r model res batch mode <<< "$spec"
      for cfg in ${AB_CONFIGS:-VICINITY_REDUCE=unit -}; do
        envs=(); [ "$cfg" != - ] && IFS=+ read -ra envs <<< "$cfg"
        ( [ ${#envs[@]} -gt 0 ] && export "${envs[@]}"
          timed "ab $model $cfg" ${AB_LIMIT:-150} "$BIN" --backend cuda bench --model "$model" --resolution "$res" \
            --batch "$batch" --dtype bf16 --mode "${mode:-train}" --warmup ${AB_WARMUP:-5} --iters ${AB_ITERS:-6} \
            --json "$SCRATCH/ab-$model-$cfg.jsonl" | tail -2 )
      done
    done
    echo "-- A/B (img/s, bf16)"
    for f in "$SCRATCH"/ab-*.jsonl; do
      python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print("AB %-40s %-6s %9.1f img/s  first %.1f s" % (sys.argv[1].split("/ab-")[1][:-6], r["mode"], r["images_per_s"], r["first_step_s"]))' "$f"
    done
    cat "$SCRATCH"/ab-*.jsonl >> "$OUT/bench.jsonl" ;;
  train)
    model=${TRAIN_MODEL:-vvt_tiny}
    # TRAIN_WARM=1: compile the run's kernels first (30 steps, thrown away), so that a cold kernel
    # cache does not eat into the budget.
    [ -n "${TRAIN_WARM:-}" ] && timed "warm-up $model" 200 "$BIN" --backend cuda train --model "$model" \
      --data .carry/cifar10-jpeg.tar.zst --recipe cifar-fast --resolution 32 --epochs 1 --stop-at-step 30 \
      --dtype bf16 --log-every 50 --out "$SCRATCH/warm-$model-$$" ${TRAIN_ARGS:-} > /dev/null
    timed "train $model ${TRAIN_BUDGET:-4m}" ${TRAIN_LIMIT:-560} "$BIN" --backend cuda train --model "$model" \
      --data .carry/cifar10-jpeg.tar.zst --recipe cifar-fast --resolution 32 --budget "${TRAIN_BUDGET:-4m}" \
      --dtype bf16 --log-every 50 --out "$SCRATCH/run-$model-$$" ${TRAIN_ARGS:-}
    for f in metrics.csv curves.png; do cp "$SCRATCH/run-$model-$$/$f" "$OUT/${TRAIN_TAG:-$model}-$f" 2>/dev/null; done
    # The last checkpoint again, with the mirror-image test-time augmentation.
    timed "eval $model --tta-flip" 120 "$BIN" --backend cuda eval --weights "$SCRATCH/run-$model-$$/last/model.safetensors" \
      --data .carry/cifar10-jpeg.tar.zst --split test --tta-flip --out "$SCRATCH/eval-$model-$$" | head -1 ;;
  long)
    model=${TRAIN_MODEL:-vvt_tiny}; dir=$PWD/runs/long
    pgrep -f -- "--out $dir" > /dev/null && { echo "a long run is already going in $dir"; continue; }
    rm -rf "$dir" "$dir.log"; mkdir -p runs
    timed "warm-up $model" 300 "$BIN" --backend cuda train --model "$model" --data .carry/cifar10-jpeg.tar.zst \
      --epochs 1 --stop-at-step 20 --dtype bf16 --log-every 10 --out "$SCRATCH/warm-long-$$" ${LONG_ARGS:-} > /dev/null
    echo "long run: $BIN --backend cuda train --model $model --data cifar10-jpeg.tar.zst --dtype bf16" \
      "--budget ${TRAIN_BUDGET:-20m} --log-every 50 ${LONG_ARGS:-} --out $dir"
    setsid nohup "$BIN" --backend cuda train --model "$model" --data .carry/cifar10-jpeg.tar.zst --dtype bf16 \
      --budget "${TRAIN_BUDGET:-20m}" --log-every 50 ${LONG_ARGS:-} --out "$dir" > "$dir.log" 2>&1 < /dev/null &
    sleep ${WATCH_S:-90}
    tr '\r' '\n' < "$dir.log" | grep -v '^ *$' | tail -8 ;;
  watch)
    dir=$PWD/runs/long
    [ -f "$dir.log" ] || { echo "no long run on this machine (it went back?)"; continue; }
    deadline=$(( $(date +%s) + ${WATCH_S:-540} ))
    while [ "$(date +%s)" -lt $deadline ] && pgrep -f -- "--out $dir" > /dev/null; do sleep 5; done
    tr '\r' '\n' < "$dir.log" | grep -v '^ *$' | tail -12
    cp "$dir.log" "$OUT/long-train.log"
    for f in metrics.csv curves.png config.json; do cp "$dir/$f" "$OUT/long-$f" 2>/dev/null; done
    if pgrep -f -- "--out $dir" > /dev/null; then echo "long run still going"; else
      echo "long run ended"
      for ck in last/model best/model last/ema; do
        [ -f "$dir/$ck.safetensors" ] || continue
        name=eval-${ck//\//-}
        timed "eval $ck --tta-flip" 120 "$BIN" --backend cuda eval --weights "$dir/$ck.safetensors" \
          --data .carry/cifar10-jpeg.tar.zst --split test --tta-flip --out "$SCRATCH/$name" | head -2
        cp "$SCRATCH/$name/summary.json" "$OUT/$name-summary.json" 2>/dev/null
      done
    fi ;;
  trainab)
    # Training speed of the real loop (data, optimizer with master weights and clipping, checkpoints):
    # each TRAINAB_CONFIGS entry is `+`-joined `--flag=value` and `VAR=value` items (`-`: none),
    # trained TRAINAB_EPOCHS epochs of TRAIN_MODEL on CIFAR-10 at 32² with the cifar-fast recipe.
    model=${TRAIN_MODEL:-vvt_tiny}
    for cfg in ${TRAINAB_CONFIGS:--}; do
      envs=(); flags=()
      if [ "$cfg" != - ]; then
        IFS=+ read -ra items <<< "$cfg"
        for it in "${items[@]}"; do case $it in --*) flags+=("$it") ;; *) envs+=("$it") ;; esac; done
      fi
      dir="$SCRATCH/trainab-$model-$RANDOM"
      ( [ ${#envs[@]} -gt 0 ] && export "${envs[@]}"
        timed "trainab $model $cfg" ${TRAINAB_LIMIT:-200} "$BIN" --backend cuda train --model "$model" \
          --data .carry/cifar10-jpeg.tar.zst --recipe cifar-fast --resolution 32 --epochs ${TRAINAB_EPOCHS:-3} \
          --eval-every 1000 --dtype bf16 --log-every 50 --out "$dir" ${TRAIN_ARGS:-} "${flags[@]}" | tail -3 )
      python3 -c 'import csv,sys
rows=list(csv.DictReader(open(sys.argv[1]+"/metrics.csv")))
print("TRAINAB %-50s epochs img/s: %s" % (sys.argv[2], " ".join("%.0f" % float(r["img_per_s"]) for r in rows)))' \
        "$dir" "$cfg" 2>/dev/null | tee -a "$SCRATCH/trainab.txt"
    done
    echo "-- train A/B ($model, epoch img/s)"; cat "$SCRATCH/trainab.txt" ;;
  *) echo "unknown stage $stage" ;;
  esac
done

# Only a cache under the 16 MiB return limit comes back; a bigger one is dropped rather than truncated.
# xz packs the PTX cache 2.5x smaller than gzip; `tar -xf` reads either.
if command -v xz > /dev/null; then pack="xz -T0 -6"; else pack="gzip"; fi
# Only the newest kernel folder travels (each build's kernels live in kernels-<hash of their sources>).
newest=$(cd "$VICINITY_CACHE" && ls -td kernels-* 2>/dev/null | head -1)
# (A run without autotuning writes no `autotune` folder: tar must not be asked for it.)
tar -cf - -C "$VICINITY_CACHE" $(cd "$VICINITY_CACHE" && ls -d autotune 2>/dev/null) $newest | $pack > /tmp/cache.tar && [ "$(stat -c %s /tmp/cache.tar)" -lt 16000000 ] \
  && cp /tmp/cache.tar "$OUT/cache.tar"
echo "== kernels compiled, by name"; sed 's/^.*\[Compiling kernel\] *//' /tmp/kernels.log 2>/dev/null | cut -c1-60 | sort | uniq -c | sort -rn | head -25
echo "== bench rows"; cat "$OUT/bench.jsonl" 2>/dev/null
