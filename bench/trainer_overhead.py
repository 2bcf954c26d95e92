"""Trainer overhead: step time of `asymflow train` vs a bare DeepSpeed ZeRO-3 loop on the same converted tiny model,
batch, world size and launch path, interleaved in one run.

    .venv/bin/python bench/trainer_overhead.py [--reps 3] [--steps 16] [--skip 3]

Ours: configs/tiny.yaml (2 workers, micro-batch 1, global batch 4 → 2 accumulation steps, ZeRO-3 over gloo, LoRA,
~128² buckets of the demo photos) run through `orchestration.launcher.launch` — the function `asymflow train` calls —
with `sample.every=0` (in-training sampling is an optional Ray task competing for the same 2 cores) and checkpoints
every 4 steps. Figure: median `step_time_s` of metrics.jsonl over steps > --skip (start-up and the first
steps' allocations excluded), i.e. loader wait + loss + backward + ZeRO step + EMA + keys gather; plus the wall
clock between consecutive metrics lines (adds checkpoints, logging, Ray reports, preemption polls).

Baseline: `common.bare_zero3_loop` — the same model construction, loss and batches, nothing else — launched the same
way (Ray Train TorchTrainer, same workers). Launching through TorchTrainer rather than bare `torch.distributed`
processes keeps the process group (gloo), the per-worker thread count Ray sets (OMP_NUM_THREADS = 1 CPU per
worker) and the process placement identical, so the difference is the trainer's own per-step work. Ray is
started once and shared by every run so its start-up is in neither figure.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import common


def ours_once(data: str, storage: Path, steps: int, skip: int) -> dict[str, float]:
    name = f"overhead-{time.time_ns()}"
    cfg = common.tiny_config(data, storage, name, [f"train.steps={steps}", "sample.every=0", "checkpoint.every=4",
                                                   "log.every=1"])
    wall, result = common.launch_train(cfg)
    rows = {r["step"]: r for r in common.read_jsonl(Path(result.run_dir) / "metrics.jsonl")}
    steps_kept = [s for s in sorted(rows) if s > skip]
    times = [rows[s]["time"] for s in sorted(rows)]
    deltas = [b - a for a, b in zip(times[skip - 1:], times[skip:])] if skip >= 1 else []
    return {
        "step_time_s": common.median(rows[s]["step_time_s"] for s in steps_kept),
        "wall_per_step_median_s": common.median(deltas),
        "wall_per_step_mean_s": sum(deltas) / len(deltas),
        "data_wait_frac": common.median(rows[s]["data_wait_frac"] for s in steps_kept),
        "run_wall_s": wall,
        "run_dir": result.run_dir,
    }


def bare_once(cfg, steps: int, skip: int, out: Path) -> dict[str, float]:
    wall, ranks = common.run_bare(cfg, steps, out)
    per_step = [max(r["step_s"][i] for r in ranks) for i in range(steps)]  # a step ends when the slowest rank ends
    return {"step_time_s": common.median(per_step[skip:]), "run_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip", type=int, default=3, help="first steps excluded (allocations, warm-up)")
    args = ap.parse_args()

    common.set_bench_environment()
    data = common.ensure_dataset(128)
    storage = common.CACHE / "runs-overhead"
    shutil.rmtree(storage, ignore_errors=True)
    common.init_ray()
    base_cfg = common.tiny_config(data, storage, "bare", [f"train.steps={args.steps}"])
    ours, bare = [], []
    for rep in range(args.reps):
        ours.append(ours_once(data, storage, args.steps, args.skip))
        print(f"  rep {rep + 1}: asymflow train step {ours[-1]['step_time_s'] * 1e3:.0f} ms "
              f"(wall/step {ours[-1]['wall_per_step_median_s'] * 1e3:.0f} ms)  [load {common.load()}]", flush=True)
        bare.append(bare_once(base_cfg, args.steps, args.skip, storage / "bare-out"))
        print(f"  rep {rep + 1}: bare ZeRO-3 loop step {bare[-1]['step_time_s'] * 1e3:.0f} ms  [load {common.load()}]",
              flush=True)

    config = {"config": "configs/tiny.yaml", "workers": base_cfg.train.workers, "micro_batch": base_cfg.train.micro_batch,
              "global_batch": base_cfg.train.global_batch, "steps": args.steps, "skip": args.skip, "reps": args.reps,
              "overrides": ["sample.every=0", "checkpoint.every=4", "log.every=1"],
              "launch": "both via Ray Train TorchTrainer on one local Ray (127.0.0.1)"}
    o = common.median(r["step_time_s"] for r in ours)
    b = common.median(r["step_time_s"] for r in bare)
    common.record("trainer_overhead", "step_time_s", o, b, o / b, "s/step (lower is better; ratio = ours/bare)",
                  config=config, per_rep_ours=[r["step_time_s"] for r in ours], per_rep_bare=[r["step_time_s"] for r in bare],
                  overhead_pct=100 * (o / b - 1), target="overhead <= 10 %")
    w = common.median(r["wall_per_step_median_s"] for r in ours)
    common.record("trainer_overhead", "wall_per_step_s_median", w, b, w / b,
                  "s/step between metrics lines (median: steps without a checkpoint; ratio = ours/bare)", config=config)
    wm = common.median(r["wall_per_step_mean_s"] for r in ours)
    common.record("trainer_overhead", "wall_per_step_s_mean_incl_checkpoints", wm, b, wm / b,
                  "s/step between metrics lines (mean: checkpoint every 4 steps amortised; ratio = ours/bare)",
                  config=config)
    # The real run's directory is kept for bench/loader.py's data-wait figure.
    (common.CACHE / "last_overhead_run.txt").write_text(ours[-1]["run_dir"])


if __name__ == "__main__":
    main()
