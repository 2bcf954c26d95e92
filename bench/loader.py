"""Streaming loader: samples/s that `orchestration.loader.RankLoader` decodes and batches vs what the training step
consumes, and the data-wait fraction of a real `asymflow train` run.

    .venv/bin/python bench/loader.py [--run-dir RUN] [--steps 48] [--reps 3]

Supply: one rank's RankLoader (rank 0 of 2, tiny.yaml's data section: micro-batch 1, global batch 4, 2 accumulation
steps) iterated with no compute in between, for 0 (synchronous), 1 (tiny.yaml) and 2 reader threads, interleaved,
median of --reps. Every step reads its samples by byte range from the tar shards, decodes the PNG, reads the cached
latents / text embeddings and stacks micro-batches — the whole per-step data path of a worker.
Consumption: per-rank samples/s the training step takes, global_batch / world / step_time_s, from the real run's
metrics.jsonl (the trainer_overhead run by default; a short run is made when none exists). ratio = supply /
consumption (> 1: the loader keeps ahead; read-ahead then hides it entirely).
Data-wait fraction: `data_wait_frac` of that run's metrics.jsonl (time in `next(loader)` / step time), median over
the steps after the first --skip (the first step has no read-ahead to hide behind). Target ≤ 5 %.
The dataset is the demo's (~128² buckets); at 1024² a PNG decode costs ~64× more per sample while the step costs far
more too — see BENCHMARKS.md for the extrapolation.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import common


def supply(data: str, threads: int, steps: int) -> float:
    """Samples/s one rank's loader delivers (decoded, collated) with nothing else running in the process."""
    from data_prep.reader import DatasetIndex
    from orchestration.data_plan import DataSection

    from orchestration.loader import RankLoader

    section = DataSection(path=data, seed=0, window_shards=2, loader_workers=threads, prefetch_batches=1)
    index = DatasetIndex.open(data)
    with RankLoader(index, section, rank=0, world_size=2, micro_batch=1, grad_accum=2, global_batch=4) as loader:
        next(loader)  # thread start-up and first reads are not throughput
        t0 = time.perf_counter()
        n = sum(len(m["keys"]) for _ in range(steps) for m in next(loader))
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a real run's directory [the last trainer_overhead run]")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", type=int, default=3)
    args = ap.parse_args()

    common.set_bench_environment()
    import torch

    torch.set_num_threads(1)  # as in a Ray Train worker (OMP_NUM_THREADS=1)
    data = common.ensure_dataset(128)
    marker = common.CACHE / "last_overhead_run.txt"
    run_dir = Path(args.run_dir) if args.run_dir else (Path(marker.read_text()) if marker.exists() else None)
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        common.init_ray()
        cfg = common.tiny_config(data, common.CACHE / "runs-loader", f"loader-{time.time_ns()}",
                                 ["train.steps=12", "sample.every=0", "checkpoint.every=4", "log.every=1"])
        run_dir = Path(common.launch_train(cfg)[1].run_dir)

    rates: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for rep in range(args.reps):
        for threads in rates:
            rates[threads].append(supply(data, threads, args.steps))
        print(f"  rep {rep + 1}: " + ", ".join(f"{t} threads {r[-1]:.0f} samples/s" for t, r in rates.items()), flush=True)

    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = {r["step"]: r for r in common.read_jsonl(run_dir / "metrics.jsonl")}
    kept = [rows[s] for s in sorted(rows) if s > args.skip]
    world, global_batch = cfg["train"]["workers"], cfg["train"]["global_batch"]
    step_time = common.median(r["step_time_s"] for r in kept)
    consumed = global_batch / world / step_time
    config = {"dataset": "demo photos, ~128² buckets, PNG shards + tiny-model cache", "rank": "0 of 2",
              "micro_batch": 1, "grad_accum": 2, "steps": args.steps, "reps": args.reps, "run_dir": str(run_dir),
              "torch_threads": 1}
    for threads, r in rates.items():
        s = common.median(r)
        common.record("loader", f"samples_per_s_per_rank_{threads}_reader_threads", s, consumed, s / consumed,
                      "samples/s per rank (ratio = loader supply / training consumption)", config=config)
    wait = common.median(r["data_wait_frac"] for r in kept)
    common.record("loader", "data_wait_frac_real_run", wait, 0.05, wait / 0.05,
                  "fraction of step time waiting for data (median of steps > skip; baseline = the 5 % target)",
                  config={**config, "step_time_s": step_time, "steps_used": len(kept),
                          "mean": sum(r["data_wait_frac"] for r in kept) / len(kept),
                          "max": max(r["data_wait_frac"] for r in kept)}, target="data-wait <= 5 %")


if __name__ == "__main__":
    main()
