#!/usr/bin/env python3
"""The PyTorch yardstick for segmentation: the authors' VVT backbone with mmseg's Semantic FPN / UPerNet heads.

Inference of the authors' VVT (vvt_tiny, vvt_small: their factory functions from --peers's vvt/vvt.py, random
weights, no classifier) under the reference heads of tests/fixtures/make_seg_fixtures.py (imported by path; plain
PyTorch restatements of mmsegmentation's definitions, GroupNorm with 32 groups):
  semfpn:  FPN neck (256 channels) + FPNHead (128 channels)                    (PVT's Semantic FPN)
  upernet: UPerHead (512 channels, pool scales 1,2,3,6) + FCN auxiliary head (256 channels; built, but not run
           in inference, as mmseg does)                                       (Swin's UPerNet)
150 classes; the output is upsampled (bilinear, align_corners False) to the input size, as mmseg's whole-image
inference does. Modes: eager, compile (torch.compile default), reduce-overhead (torch.compile CUDA graphs);
dtypes f32 (TF32 matmuls allowed, as peers.py) and bf16 (torch.autocast). Per row: a first call (compilation
included, `first_s`), warm-up calls, then the median of --iters timed calls (torch.cuda.synchronize around each)
per image, and the peak memory of the timed calls (torch.cuda.max_memory_allocated after
reset_peak_memory_stats, weights included: `peak_gib`; and max_memory_reserved: `reserved_gib`, the one that
counts the CUDA graphs' memory pool under reduce-overhead).

Training rows (unless --skip-train): Semantic FPN + vvt_tiny, batch 16, 512x512, bf16 autocast, AdamW,
cross-entropy (ignore_index 255, ~5 % of the labels 255) on the logits upsampled to 512x512; images/s from the
median step, eager and compile (the model and its loss compiled together).

One JSON line per measurement on stdout (also appended to --out), a short table at the end; a row that fails
(out of memory, compile error) is printed with its error and the script goes on.

    python3 scripts/seg_peers.py --peers /path/to/peers                        # everything (long: compiles)
    python3 scripts/seg_peers.py --peers P --models vvt_tiny --heads semfpn --modes eager --dtypes bf16 \\
        --sizes 512x2048,512x512 --batch 1 --skip-train --out /tmp/seg.jsonl

The authors' VVT takes any H x W divisible by 32 (its img_size argument only sets attributes that forward never
reads, and the positions are computed from the actual grid in every forward), so it is built with its defaults.
"""
import argparse, contextlib, gc, importlib, importlib.util, io, json, os, statistics, sys, time, warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES_SCRIPT = os.path.join(HERE, "..", "tests", "fixtures", "make_seg_fixtures.py")
EMBED_DIMS = [96, 160, 320, 512]  # vvt_tiny .. vvt_large
HEAD_CFG = {"semfpn": dict(kind="semfpn", neck_channels=256, channels=128),
            "upernet": dict(kind="upernet", channels=512, aux_channels=256)}
GN_GROUPS = 32
NUM_CLASSES = 150


def load_heads_module(path):
    spec = importlib.util.spec_from_file_location("make_seg_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # registered: torch.compile's backward pass imports the heads' module by name
    spec.loader.exec_module(mod)
    return mod


def quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()):  # the authors' constructors print their config
        return fn(*a, **k)


def build_segmentor(H, V, model_name, head):
    backbone = quiet(getattr(V, model_name), num_classes=0)  # num_classes 0: nn.Identity head
    hc = HEAD_CFG[head]
    heads = H.build_heads(hc["kind"], EMBED_DIMS, hc["channels"], NUM_CLASSES, GN_GROUPS,
                          neck_channels=hc.get("neck_channels"), aux_channels=hc.get("aux_channels"))
    return H.Segmentor(backbone, **heads)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def compiled(m, mode):
    if mode == "eager":
        return m
    return torch.compile(m, mode=None if mode == "compile" else mode)


def measure(f, dev, warmup, iters, mark_step):
    """first call (s), then warm-up, then per-call times (s) of `iters` calls and the peak memory (GiB) of those
    calls: (allocated, reserved). Under reduce-overhead the CUDA graphs' private pool is reserved, not allocated,
    during replay, so `peak_gib` leaves it out and `reserved_gib` is the footprint to compare."""
    t = time.perf_counter()
    if mark_step:
        torch.compiler.cudagraph_mark_step_begin()
    f()
    sync(dev)
    first = time.perf_counter() - t
    for _ in range(warmup):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        f()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(iters):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        sync(dev)
        t = time.perf_counter()
        f()
        sync(dev)
        ts.append(time.perf_counter() - t)
    if dev.type != "cuda":
        return first, ts, (None, None)
    return first, ts, (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)


def infer_row(H, V, dev, model_name, head, mode, dtype, size, batch, a):
    m = build_segmentor(H, V, model_name, head).to(dev).eval()
    cm = compiled(m, mode)
    x = torch.randn(batch, 3, *size, device=dev)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def f():
        with torch.no_grad(), ac:
            y = cm(x)
        assert y.shape == (batch, NUM_CLASSES, *size)
        return y

    first, ts, peak = measure(f, dev, a.warmup, a.iters, mode == "reduce-overhead")
    return dict(ms_per_image=round(1000 * statistics.median(ts) / batch, 3),
                ms_per_image_min=round(1000 * min(ts) / batch, 3), first_s=round(first, 1),
                **gib(peak))


class SegLoss(nn.Module):
    """The segmentor and its loss (mmseg's decode-head loss: logits resized to the label size, CE, ignore 255)."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, x, y):
        logits = self.seg(x)  # upsampled to the input (= label) size
        return F.cross_entropy(logits.float(), y, ignore_index=255)


def train_row(H, V, dev, model_name, head, mode, size, batch, a):
    seg = build_segmentor(H, V, model_name, head).to(dev).train()
    step_mod = compiled(SegLoss(seg), mode)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randn(batch, 3, *size, device=dev)
    y = torch.randint(0, NUM_CLASSES, (batch, *size), device=dev)
    y[torch.rand(y.shape, device=dev) < 0.05] = 255

    def f():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = step_mod(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    first, ts, peak = measure(f, dev, a.warmup, a.train_iters, False)
    return dict(img_s=round(batch / statistics.median(ts), 2), img_s_best=round(batch / min(ts), 2),
                first_s=round(first, 1), **gib(peak))


def gib(peak):
    alloc, reserved = peak
    return dict(peak_gib=None if alloc is None else round(alloc, 3),
                reserved_gib=None if reserved is None else round(reserved, 3))


def parse_size(s):
    h, w = (int(v) for v in s.lower().split("x"))
    assert h % 32 == 0 and w % 32 == 0, f"{s}: H and W must be divisible by 32"
    return h, w


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--peers", default=os.environ.get("PEERS"), help="folder holding vvt/vvt.py (or $PEERS)")
    ap.add_argument("--fixtures-script", default=FIXTURES_SCRIPT, help="make_seg_fixtures.py (the heads)")
    ap.add_argument("--models", default="vvt_tiny,vvt_small")
    ap.add_argument("--heads", default="semfpn,upernet")
    ap.add_argument("--modes", default="eager,compile,reduce-overhead")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--sizes", default="512x2048", help="HxW[,HxW...] for inference")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train-models", default="vvt_tiny")
    ap.add_argument("--train-heads", default="semfpn")
    ap.add_argument("--train-modes", default="eager,compile")
    ap.add_argument("--train-size", default="512x512")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-iters", type=int, default=10)
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (what it is for); cpu only for a smoke test")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "seg_peers.jsonl"),
                    help="JSON lines appended here")
    a = ap.parse_args()
    if not a.peers:
        ap.error("--peers DIR (holding vvt/vvt.py) is required")
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.join(os.path.abspath(a.peers), "vvt"))
    V = quiet(importlib.import_module, "vvt")
    H = load_heads_module(a.fixtures_script)

    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "cpu"
    print(f"torch {torch.__version__}, {gpu}", flush=True)
    split = lambda s: [v for v in s.split(",") if v]
    rows = []

    def emit(key, fn):
        row = dict(key)
        try:
            row.update(fn())
        except Exception as e:  # noqa: BLE001  (out of memory, compile errors, ...: report and go on)
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        row.update(torch=torch.__version__, gpu=gpu)
        print(json.dumps(row), flush=True)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(row)
        gc.collect()
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    if not a.skip_infer:
        for model_name in split(a.models):
            for head in split(a.heads):
                for size in map(parse_size, split(a.sizes)):
                    for mode in split(a.modes):
                        for dtype in split(a.dtypes):
                            key = dict(task="infer", model=model_name, head=head, mode=mode, dtype=dtype,
                                       size=f"{size[0]}x{size[1]}", batch=a.batch)
                            emit(key, lambda: infer_row(H, V, dev, model_name, head, mode, dtype, size, a.batch, a))
    if not a.skip_train:
        size = parse_size(a.train_size)
        for model_name in split(a.train_models):
            for head in split(a.train_heads):
                for mode in split(a.train_modes):
                    key = dict(task="train", model=model_name, head=head, mode=mode, dtype="bf16",
                               size=f"{size[0]}x{size[1]}", batch=a.train_batch)
                    emit(key, lambda: train_row(H, V, dev, model_name, head, mode, size, a.train_batch, a))

    # the table
    cols = ["task", "model", "head", "mode", "dtype", "size", "batch", "result", "peak_gib", "reserved_gib", "first_s"]
    lines = []
    for r in rows:
        if "error" in r:
            res = "ERROR " + r["error"][:60]
        elif r["task"] == "infer":
            res = f"{r['ms_per_image']:.2f} ms/img"
        else:
            res = f"{r['img_s']:.1f} img/s"
        lines.append([str(r.get(c, "")) if c != "result" else res for c in cols])
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for l in lines:
        print("  ".join(v.ljust(w) for v, w in zip(l, widths)))


if __name__ == "__main__":
    main()
