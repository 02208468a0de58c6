#!/usr/bin/env python3
"""Sums CubeCL's per-kernel profile log (CUBECL_DEBUG_OPTION=profile) by kernel family.

Usage: profile_summary.py LOG [TOP] [--full]. `--full` groups by the whole kernel name (generic
arguments included, cut at 140 characters) instead of the family. Lines look like `| 12.3µs     | burn_cubecl::kernel::...<...>`.
"""
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)$")


def family(name: str) -> str:
    base = name.split("<")[0].strip()
    parts = base.split("::")
    return "::".join(parts[-2:]) if len(parts) > 1 else base


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--full"]
    full = "--full" in sys.argv
    path = args[0]
    top = int(args[1]) if len(args) > 1 else 25
    width = 140 if full else 60
    total = defaultdict(float)
    count = defaultdict(int)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line.strip())
            if m:
                key = m.group(3).strip()[:width] if full else family(m.group(3))
                total[key] += float(m.group(1)) * UNITS[m.group(2)]
                count[key] += 1
    grand = sum(total.values()) or 1.0
    print(f"{'kernel':<{width}} {'calls':>7} {'total ms':>10} {'share':>7}")
    for key, t in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{key:<{width}} {count[key]:>7} {t * 1e3:>10.2f} {100 * t / grand:>6.1f}%")
    print(f"{'all kernels':<{width}} {sum(count.values()):>7} {grand * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
