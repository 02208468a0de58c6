#!/usr/bin/env python3
"""Sums CubeCL's per-kernel profile log (CUBECL_DEBUG_OPTION=profile) by kernel family.

Usage: profile_summary.py LOG [TOP] [--full] [--skip-like LOG0] [--shapes SHAPES [SHAPES0]]

- `--full` groups by the whole kernel name (generic arguments included, cut at 140 characters)
  instead of the family.
- `--skip-like LOG0` drops as many kernel launches from the start of LOG as LOG0 holds: profile the
  same bench twice with fewer steps in LOG0 (e.g. 2 and 7) and what is left is the steady-state
  steps, without the first step's compilation and loading.
- `--shapes SHAPES [SHAPES0]` also lists matmul time by operand shapes: SHAPES is the file
  `VICINITY_MATMUL_LOG` wrote in the same run as LOG (one line per matmul, in launch order), and
  SHAPES0 the one of LOG0's run.

Lines look like `| 12.3µs     | burn_cubecl::kernel::...<...>`.
"""
import argparse
import re
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)$")


def family(name: str) -> str:
    base = name.split("<")[0].strip()
    parts = base.split("::")
    return "::".join(parts[-2:]) if len(parts) > 1 else base


def launches(path: str) -> list[tuple[str, float]]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line.strip())
            if m:
                out.append((m.group(3).strip(), float(m.group(1)) * UNITS[m.group(2)]))
    return out


def count_lines(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for _ in f)


def table(rows: dict, counts: dict, width: int, top: int) -> None:
    grand = sum(rows.values()) or 1.0
    print(f"{'kernel':<{width}} {'calls':>7} {'total ms':>10} {'share':>7}")
    for key, t in sorted(rows.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{key:<{width}} {counts[key]:>7} {t * 1e3:>10.2f} {100 * t / grand:>6.1f}%")
    print(f"{'all kernels':<{width}} {sum(counts.values()):>7} {grand * 1e3:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Sums a CubeCL kernel profile by kernel family.")
    ap.add_argument("log")
    ap.add_argument("top", nargs="?", type=int, default=25)
    ap.add_argument("--full", action="store_true", help="group by the whole kernel name")
    ap.add_argument("--skip-like", metavar="LOG0", help="drop as many launches as LOG0 holds")
    ap.add_argument("--shapes", nargs="+", metavar="SHAPES", help="SHAPES [SHAPES0] from VICINITY_MATMUL_LOG")
    args = ap.parse_args()
    width = 140 if args.full else 60

    kernels = launches(args.log)
    skipped = len(launches(args.skip_like)) if args.skip_like else 0
    total, count = defaultdict(float), defaultdict(int)
    for name, t in kernels[skipped:]:
        key = name[:width] if args.full else family(name)
        total[key] += t
        count[key] += 1
    if skipped:
        print(f"(first {skipped} launches skipped, like {args.skip_like})")
    table(total, count, width, args.top)

    if args.shapes:
        # Matmul kernels in launch order, matched one-to-one with the logged operand shapes.
        matmuls = [t for name, t in kernels if "matmul" in name.split("<")[0].lower()]
        with open(args.shapes[0], encoding="utf-8") as f:
            shape_lines = [line.strip() for line in f if line.strip()]
        if len(matmuls) != len(shape_lines):
            print(f"\n{len(matmuls)} matmul launches but {len(shape_lines)} logged shapes: not matched")
            return
        drop = count_lines(args.shapes[1]) if len(args.shapes) > 1 else 0
        by_shape, n = defaultdict(float), defaultdict(int)
        for t, shape in list(zip(matmuls, shape_lines))[drop:]:
            by_shape[shape] += t
            n[shape] += 1
        print(f"\nmatmuls by operand shapes (lhs rhs){' after the first %d' % drop if drop else ''}")
        table(by_shape, n, 60, args.top)


if __name__ == "__main__":
    main()
