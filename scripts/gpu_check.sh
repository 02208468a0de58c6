#!/usr/bin/env bash
# GPU parity, kernel checks and benchmarks on a machine with an NVIDIA GPU, run from the repo root.
#
# Needs .carry/vicinity.gz: `cargo build --release --features cuda`, gzipped. Optional:
#   .carry/vicinity-old.gz  another build, for the paired A/B stage (e.g. the previous release);
#   .carry/peers/           the authors' model files and peers.py, for the peers stage;
#   .carry/cifar10-jpeg.tar.zst  CIFAR-10 as an ImageFolder archive, for the train stage.
#
# STAGES (default "parity kernels bench"), in this order:
#   cold     the first training and inference step of each ROWS model with an empty kernel cache
#            (one per process), as on a fresh machine: kernels compiled ahead, together
#   parity   `vicinity features` of every fixture on CUDA, compared with the authors' outputs
#   kernels  `vicinity check-kernels`: every fused kernel against its reference path, f32 and bf16
#   bench    the four rows of docs/PERFORMANCE.md: vvt_tiny 224² b64, lsagt_cifar_tiny 32² b128,
#            training and inference, bf16
#   profile  where the host's time goes in warm training steps of each ROWS model: `perf record` of the
#            process (needs perf and its libraries, with their loader, in .carry/perf or .carry/perf.tar.gz), the top
#            symbols as $OUT/profile-*.txt
#   ab       the same rows, new and old build alternating AB_REPEAT times (paired: machines differ)
#   peers    the authors' code (eager, torch.compile, reduce-overhead) and timm's pvt_v2_b1:
#            `python3 peers.py $PEERS` (default "eager timm lsagt-ro")
#   train    CIFAR-10, TRAIN_MODEL (vvt_tiny) with the cifar-fast recipe at 32², bf16, TRAIN_BUDGET (4m)
#   kinds    VVT-Tiny with each attention kind (KINDS), a training step at batch 16 in f32 at each of
#            KINDS_RES (224): images/s and peak memory (VVT paper Table VIII); one bench per model,
#            so that one running out of memory does not stop the others
#   ablate   `vicinity ablate` on CIFAR-10 at 32², bf16: ABLATE_MODELS (default the command's own, VVT
#            Tables VI–VII), ABLATE_SEEDS (0,1), ABLATE_ARGS (the recipe: "--epochs 8 --batch 512 --lr
#            3e-3 --drop-path 0 --eval-every 100"), at most ABLATE_SECONDS (420); the report, and every
#            run folder without its weights as $OUT/ablate-runs.tgz (unpacked next to the others,
#            `vicinity ablate` on the CPU with the same flags then writes one report of them all
#            without training). With .carry/peers first the Grad-CAM fixtures; when vvt_tiny seed 0
#            was among the runs, then `vicinity explain` of it and of an lsagt_cifar_tiny trained for
#            EXPLAIN_LSAGT (3m), as $OUT/explain.tgz
#   nccl     data-parallel training: vvt_tiny on CIFAR-10 at 32², NCCL_EPOCHS (3) epochs at a global batch
#            of 512, bf16: the plain path, then `vicinity launch --nproc N` for N = 1, 2, 4, 8 GPUs as the
#            machine has them (NCCL; the loss curves should agree, images/s scale); needs
#            .carry/cifar10-jpeg.tar.zst. Logs and metrics as $OUT/nccl-*.log
#   segtrain Semantic FPN on vvt_tiny (SEG_MODEL) trained for SEG_BUDGET (4m) on the composed Fashion-MNIST
#            dataset (`vicinity seg-data` from .carry/fashion-mnist, SEG_SIZE² canvases, 256), SEG_ARGS; then
#            seg-eval whole and sliding, and `vicinity segment` pictures, as $OUT/segtrain.tgz
#   segbench segmentation bench rows: SEG_TRAIN_ROWS (training, batch 16 at 512², bf16) and
#            SEG_INFER_ROWS (inference of one 512×2048 image, bf16 and f32)
#   segpeers the same heads in PyTorch on the authors' VVT (scripts/seg_peers.py, needs .carry/peers):
#            SEG_PEERS_ARGS
# Everything printed also lands in $OUT/log.txt; rows as JSON lines in $OUT/*.jsonl.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# cuBLAS: the toolkit's, else the one PyTorch's wheels bring.
CUBLAS_LIB=$(python3 -c 'import nvidia.cublas as c, os; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$CUBLAS_LIB" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$CUBLAS_LIB
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-parity kernels bench}
ITERS=${ITERS:---warmup 5 --iters 30}
AB_REPEAT=${AB_REPEAT:-2}
ROWS=${ROWS:-vvt_tiny:224:64 lsagt_cifar_tiny:32:128}
export VICINITY_CACHE=/tmp/vicinity-cache
mkdir -p "$OUT" "$VICINITY_CACHE"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# In the checkout, not /tmp: one fresh machine refused to execute from /tmp.
unpack() { gunzip -c "$1" > "$2" && chmod +x "$2"; }
BIN=$PWD/.carry/vicinity-bin
unpack .carry/vicinity.gz "$BIN" || exit 1
"$BIN" --version

has() { [[ " $STAGES " == *" $1 "* ]]; }

if has cold; then
  echo "== cold start: an empty kernel cache per row"
  for row in $ROWS; do
    IFS=: read -r model res batch <<< "$row"
    for mode in train infer; do
      VICINITY_CACHE=/tmp/cold-$model-$mode "$BIN" --backend cuda bench --model "$model" --mode $mode \
        --resolution "$res" --batch "$batch" --dtype bf16 --warmup 2 --iters 10 --json "$OUT/cold.jsonl" 2>&1 |
        grep -E 'first|ahead|one by one|error' | sed "s/^/cold /"
    done
  done
fi

if has parity; then
  echo "== parity: the fixtures on CUDA against the authors' outputs"
  for cfg in configs/vvt_mini.json configs/vvt_mini_sr.json configs/lsagt_cifar_mini.toml configs/lsagt_imagenet_mini.toml; do
    name=$(basename "${cfg%.*}")
    "$BIN" --backend cuda features --model "$cfg" --weights "tests/fixtures/$name.pth" \
      --input "tests/fixtures/${name}_io.safetensors" -o "/tmp/$name.safetensors" &&
      "$BIN" compare "/tmp/$name.safetensors" "tests/fixtures/${name}_io.safetensors" --tolerance 2e-6
  done
fi

if has kernels; then
  echo "== check-kernels"
  "$BIN" --backend cuda check-kernels
fi

bench_rows() { # BIN TAG JSON
  for row in $ROWS; do
    IFS=: read -r model res batch <<< "$row"
    "$1" --backend cuda bench --model "$model" --resolution "$res" --batch "$batch" --dtype bf16 $ITERS \
      --json "$3" 2>&1 | grep -E '^(model|vvt|lsagt)|error' | sed "s/^/$2 /"
  done
}

if has bench; then
  echo "== bench"
  bench_rows "$BIN" new "$OUT/bench.jsonl"
fi

if has profile; then
  echo "== host profile (perf, cpu-clock)"
  [ -d .carry/perf ] || tar xzf .carry/perf.tar.gz -C .carry || exit 1
  perf() { .carry/perf/lib/ld-linux-x86-64.so.2 --library-path .carry/perf/lib .carry/perf/perf "$@"; }
  for row in $ROWS; do
    IFS=: read -r model res batch <<< "$row"
    perf record -e cpu-clock -F 2000 -o /tmp/perf-$model.data -- "$BIN" --backend cuda bench --model "$model" \
      --mode train --resolution "$res" --batch "$batch" --dtype bf16 --warmup 5 --iters 200 2>&1 | grep -E '^(model|vvt|lsagt)|host'
    perf report -i /tmp/perf-$model.data --sort pid,dso --stdio 2>/dev/null | grep -v '^#' | head -25 > "$OUT/profile-$model.txt"
    for thread in vicinity-bin DSU-0-0 DSD-0-0; do
      echo "== $thread" >> "$OUT/profile-$model.txt"
      perf report -i /tmp/perf-$model.data --comms $thread --sort sym --stdio 2>/dev/null | grep -v '^#' |
        grep -v '^$' | head -60 >> "$OUT/profile-$model.txt"
    done
    head -30 "$OUT/profile-$model.txt"
  done
fi

if has ab; then
  echo "== A/B: new and old build alternating"
  OLD=$PWD/.carry/vicinity-old-bin
  unpack .carry/vicinity-old.gz "$OLD" || exit 1
  for i in $(seq "$AB_REPEAT"); do
    bench_rows "$BIN" new "$OUT/ab-new.jsonl"
    bench_rows "$OLD" old "$OUT/ab-old.jsonl"
  done
  python3 - "$OUT/ab-new.jsonl" "$OUT/ab-old.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for tag, path in zip(["new", "old"], sys.argv[1:]):
    for line in open(path):
        r = json.loads(line)
        rows.setdefault((r["model"], r["mode"]), {}).setdefault(tag, []).append(r["images_per_s"])
print(f"{'row':<28} {'new img/s':>22} {'old img/s':>22} {'new/old':>8}")
for (model, mode), t in sorted(rows.items()):
    new, old = t.get("new", []), t.get("old", [])
    fmt = lambda v: " / ".join(f"{x:,.0f}" for x in v)
    ratio = statistics.median(new) / statistics.median(old) if new and old else float("nan")
    print(f"{model + ' ' + mode:<28} {fmt(new):>22} {fmt(old):>22} {ratio:>8.3f}")
PY
fi

if has peers; then
  echo "== peers: ${PEERS:-eager timm lsagt-ro}"
  (cd .carry/peers && PYTHONUNBUFFERED=1 python3 peers.py ${PEERS:-eager timm lsagt-ro})
fi

if has train; then
  echo "== CIFAR-10, ${TRAIN_MODEL:-vvt_tiny}, ${TRAIN_BUDGET:-4m}"
  data=.carry/cifar10-jpeg.tar.zst
  "$BIN" --backend cuda train --model "${TRAIN_MODEL:-vvt_tiny}" --data "$data" --recipe cifar-fast \
    --resolution 32 --dtype bf16 --budget "${TRAIN_BUDGET:-4m}" --out /tmp/run ${TRAIN_ARGS:-} &&
    "$BIN" --backend cuda eval --weights /tmp/run/last/model.safetensors --data "$data" --split test \
      --tta-flip --out /tmp/eval-tta &&
    cp /tmp/run/metrics.csv /tmp/run/curves.png /tmp/run/config.json /tmp/eval-tta/summary.json "$OUT/"
fi

if has nccl; then
  # NCCL from PyTorch's wheel when the system has none on the library path.
  NCCL_LIB=$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null)
  [ -n "$NCCL_LIB" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$NCCL_LIB
  gpus=$(nvidia-smi -L | wc -l)
  echo "== nccl: ${NCCL_MODEL:=vvt_tiny} on CIFAR-10 at 32², plain, then through NCCL on 1..$gpus GPUs (same global batch)"
  data=.carry/cifar10-jpeg.tar.zst
  common="--model $NCCL_MODEL --data $data --recipe cifar-fast --resolution 32 --dtype bf16 --epochs ${NCCL_EPOCHS:-3}
    --lr 3e-3 --drop-path 0 --eval-every 1 --seed 0"
  "$BIN" --backend cuda train $common --batch 512 --out /tmp/nccl-plain > "$OUT/nccl-plain.log" 2>&1
  runs="/tmp/nccl-plain"
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || break
    "$BIN" --backend cuda launch --nproc $n train $common --batch $((512 / n)) --out /tmp/nccl-$n \
      > "$OUT/nccl-$n.log" 2>&1 || tail -5 "$OUT/nccl-$n.log"
    runs="$runs /tmp/nccl-$n"
  done
  for r in $runs; do
    echo "$r"; cut -d, -f1-5,12 "$r/metrics.csv" 2>/dev/null | tr ',' '\t'
  done
fi

if has kinds; then
  echo "== attention kinds in VVT-Tiny: training step, batch 16, f32, ${KINDS_RES:-224}"
  for model in ${KINDS:-vvt_tiny vvt_tiny_softmax vvt_tiny_pvt vvt_tiny_pvt_linear vvt_tiny_performer vvt_tiny_linformer vvt_tiny_cosformer vvt_tiny_gcnet}; do
    "$BIN" --backend cuda bench --model "$model" --mode train --batch 16 --sweep-res "$(echo ${KINDS_RES:-224} | tr ' ' ',')" \
      --warmup 2 --iters 10 --json "$OUT/kinds.jsonl" 2>&1 | grep -E '^(model|vvt)|error' || echo "$model: failed"
  done
fi

if has ablate; then
  if [ -d .carry/peers ]; then
    echo "== Grad-CAM fixtures of the authors' models (tests/fixtures/make_gradcam_fixtures.py)"
    python3 tests/fixtures/make_gradcam_fixtures.py --peers .carry/peers --fixtures tests/fixtures \
      --out /tmp/gradcam-fixtures 2>&1 | tail -6
    tar czf "$OUT/gradcam-fixtures.tgz" -C /tmp gradcam-fixtures
  fi
  echo "== ablate: CIFAR-10, ${ABLATE_MODELS:-default models}, seeds ${ABLATE_SEEDS:-0,1}"
  models=()
  [ -n "${ABLATE_MODELS:-}" ] && models=(--models "$ABLATE_MODELS")
  # SIGINT pauses the run in flight with its checkpoint (ABLATE_SECONDS): the call returns its rows.
  timeout -s INT -k 30 "${ABLATE_SECONDS:-420}" "$BIN" --backend cuda ablate "${models[@]}" --seeds "${ABLATE_SEEDS:-0,1}" --data .carry/cifar10-jpeg.tar.zst \
    --recipe cifar-fast --resolution 32 --dtype bf16 \
    ${ABLATE_ARGS:---epochs 8 --batch 512 --lr 3e-3 --drop-path 0 --eval-every 100} --out /tmp/ablate
  cp /tmp/ablate/ablation.md /tmp/ablate/ablation.csv /tmp/ablate/ablation.png "$OUT/" 2>/dev/null
  [ -d /tmp/ablate ] && tar czf "$OUT/ablate-runs.tgz" --exclude='*.safetensors' -C /tmp/ablate .
  # Explanation pictures of the ablation's VVT-Tiny, and of an LSAGT trained for EXPLAIN_LSAGT (3m).
  vvt=/tmp/ablate/vvt_tiny-seed0/last/model.safetensors
  if [ -f "$vvt" ] && "$BIN" explain --help > /dev/null 2>&1; then
    echo "== explain: vvt_tiny of the ablation, lsagt_cifar_tiny trained for ${EXPLAIN_LSAGT:-3m}"
    mkdir -p /tmp/explain
    for method in gradcam locality; do
      "$BIN" --backend cuda explain --data .carry/cifar10-jpeg.tar.zst --limit 10 --weights "$vvt" \
        --method $method -o /tmp/explain/vvt_tiny 2>&1 | tail -2
    done
    "$BIN" --backend cuda train --model lsagt_cifar_tiny --data .carry/cifar10-jpeg.tar.zst --recipe cifar-fast \
      --resolution 32 --dtype bf16 --budget "${EXPLAIN_LSAGT:-3m}" --batch 256 --drop-path 0 --eval-every 100 \
      --crop resize --out /tmp/lsagt 2>&1 | tail -3
    for method in variants gradcam; do
      "$BIN" --backend cuda explain --data .carry/cifar10-jpeg.tar.zst --limit 10 \
        --weights /tmp/lsagt/last/model.safetensors --method $method -o /tmp/explain/lsagt_cifar_tiny 2>&1 | tail -2
    done
    cp /tmp/lsagt/metrics.csv /tmp/explain/lsagt_cifar_tiny/ 2>/dev/null
    tar czf "$OUT/explain.tgz" -C /tmp explain
  fi
fi

if has segtrain; then
  echo "== segtrain: ${SEG_MODEL:=semfpn_vvt_tiny} on composed Fashion-MNIST canvases for ${SEG_BUDGET:=4m}"
  size=${SEG_SIZE:-256}
  "$BIN" seg-data --fashion-mnist .carry/fashion-mnist --out /tmp/fm-seg --size "$size" --train 4000 --val 500
  # The whole training log (progress lines included) goes to $OUT/segtrain.log as it is written.
  "$BIN" --backend cuda seg-train --model "$SEG_MODEL" --data /tmp/fm-seg --out /tmp/segrun --dtype bf16 \
    --budget "$SEG_BUDGET" --crop "$size" --scale "$((size * 4))x$size" --eval-scale "$((size * 4))x$size" \
    ${SEG_ARGS:---batch 16 --lr 4e-4 --warmup 200 --iters 100000 --eval-every 100000} > "$OUT/segtrain.log" 2>&1
  tr '\r' '\n' < "$OUT/segtrain.log" | grep -v "^step [0-9]*/" | tail -8
  for mode in whole slide; do
    "$BIN" --backend cuda seg-eval --weights /tmp/segrun --data /tmp/fm-seg --eval-mode $mode \
      --eval-scale "$((size * 4))x$size" --eval-crop "$((size / 2))" --eval-stride "$((size / 3))" \
      -o "/tmp/segrun/eval-$mode" 2>&1 | tr '\r' '\n' | grep -v "^evaluating" | tail -3
  done
  "$BIN" --backend cuda segment --weights /tmp/segrun --eval-scale "$((size * 4))x$size" -o /tmp/segrun/pictures \
    /tmp/fm-seg/val/images/00000[0-7].png | tail -3
  tar czf "$OUT/segtrain.tgz" --exclude='*.safetensors' -C /tmp segrun
fi

if has segbench; then
  echo "== segbench: segmentation training at 512² and inference at 512x2048"
  for row in ${SEG_TRAIN_ROWS:-semfpn_vvt_tiny:512x512:16:bf16 upernet_vvt_tiny:512x512:16:bf16}; do
    IFS=: read -r model size batch dtype <<< "$row"
    "$BIN" --backend cuda bench --model "$model" --size "$size" --batch "$batch" --dtype "$dtype" --mode train \
      --warmup 3 --iters 10 --json "$OUT/segbench.jsonl" 2>&1 | grep -v "^model "
  done
  for row in ${SEG_INFER_ROWS:-semfpn_vvt_tiny semfpn_vvt_small upernet_vvt_tiny upernet_vvt_small}; do
    for dtype in bf16 f32; do
      "$BIN" --backend cuda bench --model "$row" --size 512x2048 --batch 1 --dtype $dtype --mode infer \
        --warmup 3 --iters 20 --json "$OUT/segbench.jsonl" 2>&1 | grep -v "^model "
    done
  done
  "$BIN" bench --from "$OUT/segbench.jsonl"
fi

if has segpeers; then
  echo "== segpeers: the authors' VVT with the same heads in PyTorch"
  python3 scripts/seg_peers.py --peers .carry/peers --out "$OUT/segpeers.jsonl" \
    ${SEG_PEERS_ARGS:---models vvt_tiny,vvt_small --heads semfpn,upernet --sizes 512x2048 --batch 1}
fi
