#!/usr/bin/env python3
"""Sums an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum --csv --print-units base`) by
kernel family, per step, and sets it against the step's wall time.

Usage: ncu_summary.py CSV --skip-like CSV0 --steps N [--top K] [--wall BENCH_JSONL] [--sequence FILE]

- `--skip-like CSV0` drops as many launches from the start of CSV as CSV0 holds (the same bench
  run with fewer steps), which leaves the N steady steps.
- `--wall` reads the unprofiled bench row (images/s, batch) and prints how much of a step the GPU
  was busy: the rest is time the GPU waited for the host.
- `--sequence FILE` writes the last steady step launch by launch (family, µs, threads when the CSV
  has `launch__grid_size` and `launch__block_size`): the matrix products and the thread counts
  (which follow the tensor sizes) tell which layer each element-wise kernel belongs to.

Unlike CubeCL's own profile (`profile_summary.py`), this counts every kernel on the GPU, cuBLAS's
included, and each kernel's time is measured alone (ncu serialises launches).
"""
import argparse
import csv
import json
from collections import defaultdict


def launches(path: str, threads: dict | None = None) -> list[tuple[str, float]]:
    """(kernel name, seconds) per launch, in launch order; `threads` (if given) gets each launch's
    grid × block size by its position."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]
    out, sizes = {}, defaultdict(dict)
    for row in csv.DictReader(lines):
        metric = row.get("Metric Name")
        value = float(row["Metric Value"].replace(",", "") or 0)
        if metric in ("launch__grid_size", "launch__block_size"):
            sizes[int(row["ID"])][metric] = value
        if metric != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "ns")
        scale = {"ns": 1e-9, "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}.get(unit, 1e-9)
        out[int(row["ID"])] = (row["Kernel Name"], value * scale)
    ids = sorted(out)
    if threads is not None:
        for i, k in enumerate(ids):
            s = sizes.get(k, {})
            threads[i] = int(s.get("launch__grid_size", 0) * s.get("launch__block_size", 0))
    return [out[k] for k in ids]


def family(name: str) -> str:
    if any(s in name for s in ("gemm", "xmma", "cutlass", "sm90_", "sm80_", "Kernel2")):
        return "cuBLAS " + name.split("_")[0][:40]
    return name.split("<")[0].split("(")[0][:60]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--skip-like", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--wall")
    ap.add_argument("--sequence")
    a = ap.parse_args()
    skip = len(launches(a.skip_like))
    threads: dict = {}
    every = launches(a.csv, threads)
    steady = every[skip:]
    if a.sequence:
        per_step = len(steady) // a.steps
        first = len(every) - per_step
        with open(a.sequence, "w", encoding="utf-8") as f:
            f.write("launch\tfamily\tus\tthreads\n")
            for i in range(first, len(every)):
                name, t = every[i]
                f.write(f"{i - first}\t{family(name)}\t{t * 1e6:.1f}\t{threads.get(i, 0)}\n")
    by, calls = defaultdict(float), defaultdict(int)
    for name, t in steady:
        by[family(name)] += t
        calls[family(name)] += 1
    total = sum(by.values()) or 1e-12
    per = 1e3 / a.steps
    print(f"{'kernel family':<62} {'calls/step':>10} {'ms/step':>9} {'share':>6}")
    for key, t in sorted(by.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{key:<62} {calls[key] / a.steps:>10.1f} {t * per:>9.2f} {100 * t / total:>5.1f}%")
    print(f"{'all kernels':<62} {len(steady) / a.steps:>10.1f} {total * per:>9.2f}")
    if a.wall:
        rows = [json.loads(l) for l in open(a.wall)]
        if rows:
            r = rows[-1]
            wall_ms = 1e3 * r["batch"] / r["images_per_s"]
            print(
                f"GPU busy {total * per:.1f} ms of the {wall_ms:.1f} ms unprofiled step "
                f"({100 * total * per / wall_ms:.0f} %); {len(steady) / a.steps:.0f} launches per step"
            )


if __name__ == "__main__":
    main()
