"""ZeRO-3 memory: per-rank partition sizes and peak RSS at 1 and 2 workers, LoRA vs full fine-tune.

    .venv/bin/python bench/zero3_memory.py [--steps 3]

Runs `common.bare_zero3_loop` (the trainer's exact model construction: convert_transformer → frozen teacher →
apply_trainable → deepspeed.initialize with build_deepspeed_config, ZeRO-3 over gloo) through Ray Train's
TorchTrainer for {1, 2} workers × {lora, full}, a few steps each, on a mid-size FLUX.2-shaped transformer
(8 heads × 64 = 512 wide, 4 double + 4 single blocks, ~40 M parameters) so that partitioning is visible above the
~0.3 GB of imports every worker carries; LoRA rank 32 keeps the recipe's rank/width ratio (256 / 4096).
Per rank it reads from DeepSpeed itself: elements of every parameter partition (ds_tensor), the fp32 master
partition, gradient partition and Adam state bytes, the frozen teacher's (unpartitioned) bytes, and peak RSS
(getrusage) minus the RSS after imports. Baseline for each ZeRO figure: the same quantity at 1 worker (no
partitioning possible), so ratio ≈ 0.5 means the state is split evenly across 2 ranks.
"""
from __future__ import annotations

import argparse
import shutil

import common

MID_TRANSFORMER = dict(num_attention_heads=8, attention_head_dim=64, num_layers=4, num_single_layers=4,
                       axes_dims_rope=(16, 16, 16, 16))
MB = 2**20
STAGES = ("rss_after_imports", "rss_after_model", "rss_after_engine", "rss_end", "peak_rss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    common.set_bench_environment()
    data = common.ensure_dataset(128)
    storage = common.CACHE / "runs-memory"
    shutil.rmtree(storage, ignore_errors=True)
    common.init_ray()
    results: dict[tuple[str, int], list[dict]] = {}
    for mode in ("lora", "full"):
        for workers in (1, 2):
            cfg = common.tiny_config(data, storage, f"mem-{mode}-{workers}", [
                f"train.workers={workers}", f"trainable.mode={mode}", "trainable.lora.rank=32",
                "trainable.lora.alpha=32.0", f"train.steps={args.steps}"])
            _, ranks = common.run_bare(cfg, args.steps, storage / f"out-{mode}-{workers}", MID_TRANSFORMER)
            results[(mode, workers)] = ranks
            r0 = ranks[0]
            print(f"  {mode:4s} × {workers}: rank0 params {r0['rank_numel'] / 1e6:.2f}M of {r0['full_numel'] / 1e6:.2f}M, "
                  f"trainable {r0['trainable_rank_numel'] / 1e6:.2f}M of {r0['trainable_full_numel'] / 1e6:.2f}M, "
                  f"peak RSS {max(r['peak_rss'] for r in ranks) / MB:.0f} MB  [load {common.load()}]", flush=True)

    config = {"transformer": MID_TRANSFORMER, "lora_rank": 32, "steps": args.steps, "precision": "fp32 (CPU)",
              "launch": "Ray Train TorchTrainer, gloo, DeepSpeed ZeRO-3"}
    for mode in ("lora", "full"):
        one, two = results[(mode, 1)][0], results[(mode, 2)]
        for key, unit in (("rank_numel", "elements"), ("trainable_rank_numel", "elements"),
                          ("param_partition_bytes", "bytes"), ("fp32_master_bytes", "bytes"),
                          ("grad_partition_bytes", "bytes"), ("adam_state_bytes", "bytes")):
            v = max(r[key] for r in two)
            b = one[key]
            common.record("zero3_memory", f"{mode}_{key}_per_rank_2workers", v, b, v / b if b else None,
                          f"{unit} per rank (baseline: 1 worker; ratio 0.5 = even split)", config=config,
                          full_model=one["full_numel"], trainable_full=one["trainable_full_numel"])
        peak2 = max(r["peak_rss"] - r["rss_after_imports"] for r in two)
        peak1 = one["peak_rss"] - one["rss_after_imports"]
        common.record("zero3_memory", f"{mode}_peak_rss_above_imports_per_rank_2workers", peak2 / MB, peak1 / MB,
                      peak2 / peak1, "MiB per rank, peak RSS − RSS after imports (baseline: 1 worker)", config=config,
                      peak_rss_total_MiB={"1": one["peak_rss"] / MB, "2": [r["peak_rss"] / MB for r in two]},
                      teacher_MiB=one["teacher_bytes"] / MB, imports_MiB=one["rss_after_imports"] / MB,
                      rss_stages_MiB={str(w): [{k: round(r[k] / MB) for k in STAGES} for r in results[(mode, w)]]
                                      for w in (1, 2)})
        # All model weights a rank holds: its ZeRO-3 partition of the student + the teacher (tied for LoRA: only its
        # copies of the fully trained modules; a whole copy for full fine-tuning).
        weights2 = max(r["param_partition_bytes"] + r["teacher_bytes"] for r in two)
        weights1 = one["param_partition_bytes"] + one["teacher_bytes"]
        common.record("zero3_memory", f"{mode}_model_weight_bytes_per_rank_2workers", weights2, weights1,
                      weights2 / weights1, "bytes per rank: student partition + teacher (baseline: 1 worker; "
                      "goal for LoRA ≤ 0.55)", config=config, teacher_bytes=one["teacher_bytes"])
        common.record("zero3_memory", f"{mode}_teacher_bytes_over_full_modules", one["teacher_bytes"],
                      one["full_modules_bytes"], one["teacher_bytes"] / one["full_modules_bytes"],
                      "bytes (teacher's own / the fully trained modules'; goal for LoRA ≤ 1.05)", config=config)
    lora, full = results[("lora", 2)], results[("full", 2)]
    lp = max(r["peak_rss"] - r["rss_after_imports"] for r in lora)
    fp = max(r["peak_rss"] - r["rss_after_imports"] for r in full)
    common.record("zero3_memory", "lora_vs_full_peak_rss_above_imports_2workers", lp / MB, fp / MB, lp / fp,
                  "MiB per rank (ratio = LoRA / full fine-tune)", config=config)


if __name__ == "__main__":
    main()
