#!/usr/bin/env python3
"""Summarises a host profile (collapsed stacks from `VICINITY_HOST_PROFILE=FILE vicinity bench`).

Per thread: its share of the samples, then the functions with the most samples inside them
(inclusive, each function counted once per stack) and the most samples in themselves (self).
Names are shortened: generic arguments and hashes dropped.

    python3 scripts/host_profile_summary.py FILE [--top N] [--thread NAME] [--match TEXT]

`--match TEXT` lists, for the stacks through a function whose name contains TEXT, the callees
one level below it (where that function's time goes).
"""
import argparse
import collections
import re


def short(name):
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    # Drop generic arguments, innermost first.
    prev = None
    while prev != name:
        prev = name
        name = re.sub(r"<[^<>]*>", "", name)
    return name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--thread", default=None)
    ap.add_argument("--match", action="append", default=[])
    args = ap.parse_args()

    stacks = []
    for line in open(args.file):
        line = line.rstrip("\n")
        if not line:
            continue
        path, _, count = line.rpartition(" ")
        frames = path.split(";")
        stacks.append((frames[0], [short(f) for f in frames[1:]], int(count)))

    threads = collections.Counter()
    for thread, _, n in stacks:
        threads[re.sub(r"\d+$", "#", thread)] += n
    total = sum(threads.values())
    print(f"{total} samples (1 kHz)")
    for t, n in threads.most_common():
        print(f"  {n:7d} {100 * n / total:5.1f} %  thread {t}")

    for thread, n in threads.most_common(3):
        if args.thread and args.thread not in thread:
            continue
        incl, self_ = collections.Counter(), collections.Counter()
        for t, frames, c in stacks:
            if re.sub(r"\d+$", "#", t) != thread:
                continue
            for f in set(frames):
                incl[f] += c
            if frames:
                self_[frames[-1]] += c
        print(f"\n== thread {thread}: {n} samples; inclusive")
        for f, c in incl.most_common(args.top):
            print(f"  {c:7d} {100 * c / n:5.1f} %  {f[:150]}")
        print(f"-- self")
        for f, c in self_.most_common(args.top):
            print(f"  {c:7d} {100 * c / n:5.1f} %  {f[:150]}")

    for m in args.match:
        below = collections.Counter()
        inside = 0
        for _, frames, c in stacks:
            idx = [i for i, f in enumerate(frames) if m in f]
            if not idx:
                continue
            i = idx[0]
            inside += c
            below[frames[i + 1] if i + 1 < len(frames) else "(self)"] += c
        print(f"\n== below the first frame matching {m!r}: {inside} samples")
        for f, c in below.most_common(args.top):
            print(f"  {c:7d} {100 * c / max(inside, 1):5.1f} %  {f[:150]}")


if __name__ == "__main__":
    main()
