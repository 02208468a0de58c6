set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
L=$(python3 -c 'import nvidia.cublas as c, os; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null); [ -n "$L" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$L
N=$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null); [ -n "$N" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$N
export VICINITY_CACHE=/tmp/vc
BIN=$PWD/.carry/vicinity-bin; gunzip -c .carry/vicinity.gz > $BIN; chmod +x $BIN
c="--model vvt_tiny --data .carry/cifar10-jpeg.tar.zst --recipe cifar-fast --resolution 32 --epochs 2 --lr 3e-3 --drop-path 0 --eval-every 1 --seed 0 --batch 512"
$BIN --backend cuda launch --nproc 1 train $c --dtype bf16 --out /tmp/n1b > $OUT/n1b.log 2>&1
$BIN --backend cuda train $c --dtype f32 --out /tmp/pf > $OUT/pf.log 2>&1
$BIN --backend cuda launch --nproc 1 train $c --dtype f32 --out /tmp/n1f > $OUT/n1f.log 2>&1
for r in n1b pf n1f; do echo $r; cut -d, -f1-5,12 /tmp/$r/metrics.csv; done
