"""`make bench`: the CPU suite in one go (each benchmark a subprocess, appending to bench/results.jsonl), then
BENCHMARKS.md from the results. The GPU suite (bench/gpu_step.py) runs last and skips itself without CUDA.

    .venv/bin/python bench/run_all.py [--only loader,checkpoint] [--no-report]

Sized to finish in ~15 min on a 2-core machine; every script takes its own flags for longer runs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SUITE: list[tuple[str, list[str]]] = [
    ("shard_build", ["--count", "16", "--reps", "2"]),
    ("trainer_overhead", ["--reps", "3", "--steps", "12"]),
    ("loader", ["--reps", "3"]),  # reads the data-wait fraction of the run trainer_overhead just made
    ("zero3_memory", []),
    ("checkpoint", ["--reps", "5"]),
    ("checkpoint_bytes", []),
    ("asymflow_overhead", ["--reps", "7", "--vae-reps", "1"]),
    ("sampler", []),  # single-threaded; 262 s measured at a load of 4–5 on the shared 2-core box
    ("text_cache", []),  # ~40 s: serialises klein-shaped text members, builds one projected demo cache
    ("gpu_step", []),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    failed = []
    t_suite = time.perf_counter()
    for name, flags in SUITE:
        if only and name not in only:
            continue
        print(f"\n=== bench/{name}.py {' '.join(flags)} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *flags], cwd=BENCH.parent).returncode
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s ===", flush=True)
        if rc:
            failed.append(name)
    if not args.no_report:
        subprocess.run([sys.executable, str(BENCH / "report.py")], cwd=BENCH.parent, check=True)
    print(f"\nsuite done in {time.perf_counter() - t_suite:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
