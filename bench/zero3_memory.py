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

Frozen-parameter policy (`trainable.frozen_params`, LoRA): the 2-worker LoRA run is repeated with the frozen base
replicated, both counting the bytes ZeRO-3 all-gathers per optimizer step for frozen vs trainable parameters
(`orchestration.frozen_params.counting_gathers`: our own count of every parameter in DeepSpeed's all-gather calls,
ds_numel × element size, split by requires_grad at the start of the step). Both sides of the trade are recorded
against the partitioned run of the same invocation: weight bytes and peak RSS per rank (memory) vs frozen bytes
gathered and step time (traffic), plus whether the losses were identical.
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
    runs = [("lora", 1), ("lora", 2), ("lora-replicated", 2), ("full", 1), ("full", 2)]
    for mode, workers in runs:
        policy = "replicated" if mode == "lora-replicated" else "partitioned"
        cfg = common.tiny_config(data, storage, f"mem-{mode}-{workers}", [
            f"train.workers={workers}", f"trainable.mode={mode.split('-')[0]}", "trainable.lora.rank=32",
            "trainable.lora.alpha=32.0", f"train.steps={args.steps}", f"trainable.frozen_params={policy}"])
        _, ranks = common.run_bare(cfg, args.steps, storage / f"out-{mode}-{workers}", MID_TRANSFORMER,
                                   count_gathers=mode.startswith("lora") and workers == 2)
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
        weights2 = max(weight_bytes(r) for r in two)
        weights1 = weight_bytes(one)
        common.record("zero3_memory", f"{mode}_model_weight_bytes_per_rank_2workers", weights2, weights1,
                      weights2 / weights1, "bytes per rank: student partition + teacher (baseline: 1 worker; "
                      "goal for LoRA ≤ 0.55)", config=config, teacher_bytes=one["teacher_bytes"])
        common.record("zero3_memory", f"{mode}_teacher_bytes_over_full_modules", one["teacher_bytes"],
                      one["full_modules_bytes"], one["teacher_bytes"] / one["full_modules_bytes"],
                      "bytes (teacher's own / the fully trained modules'; goal for LoRA ≤ 1.05)", config=config)
    record_frozen_policy(results[("lora", 2)], results[("lora-replicated", 2)], results[("lora", 1)][0], config)
    lora, full = results[("lora", 2)], results[("full", 2)]
    lp = max(r["peak_rss"] - r["rss_after_imports"] for r in lora)
    fp = max(r["peak_rss"] - r["rss_after_imports"] for r in full)
    common.record("zero3_memory", "lora_vs_full_peak_rss_above_imports_2workers", lp / MB, fp / MB, lp / fp,
                  "MiB per rank (ratio = LoRA / full fine-tune)", config=config)


def weight_bytes(rank: dict) -> int:
    """All model weights a rank holds: its ZeRO-3 partition + the teacher's own + frozen parameters kept whole."""
    return rank["param_partition_bytes"] + rank["teacher_bytes"] + rank["replicated_bytes"]


def record_frozen_policy(part: list[dict], rep: list[dict], one: dict, config: dict) -> None:
    """Both sides of trainable.frozen_params at 2 workers, replicated vs partitioned (the baseline, same run).

    Traffic per optimizer step from step 2 on (step 1 records DeepSpeed's trace); time: median step from step 2."""
    def per_step(ranks: list[dict], key: str) -> float:
        return max(common.median(g[key] for g in r["gathers"][1:]) for r in ranks)

    def step_s(ranks: list[dict]) -> float:
        return max(common.median(r["step_s"][1:]) for r in ranks)

    def peak(ranks: list[dict]) -> float:
        return max(r["peak_rss"] - r["rss_after_imports"] for r in ranks) / MB

    same_loss = [r["last_loss"] for r in part] == [r["last_loss"] for r in rep]
    frozen_whole = one["full_numel"] * 4 - one["trainable_full_numel"] * 4  # fp32 bytes of the frozen base
    extra = dict(config=config, accum=part[0]["accum"], frozen_base_bytes=frozen_whole, identical_last_loss=same_loss,
                 policy="replicated vs partitioned (baseline), LoRA, 2 workers")
    w_rep, w_part = max(weight_bytes(r) for r in rep), max(weight_bytes(r) for r in part)
    common.record("zero3_memory", "frozen_replicated_weight_bytes_per_rank", w_rep, w_part, w_rep / w_part,
                  "bytes per rank, all model weights (memory side of the trade)", **extra,
                  weight_bytes_1worker=weight_bytes(one))
    common.record("zero3_memory", "frozen_replicated_peak_rss_above_imports", peak(rep), peak(part),
                  peak(rep) / peak(part), "MiB per rank, peak RSS − RSS after imports (memory side)", **extra)
    f_rep, f_part = per_step(rep, "frozen_bytes"), per_step(part, "frozen_bytes")
    common.record("zero3_memory", "frozen_replicated_frozen_bytes_gathered_per_step", f_rep, f_part,
                  f_rep / f_part if f_part else None,
                  "bytes all-gathered per rank per optimizer step for frozen parameters (traffic side; "
                  "partitioned = baseline)", **extra, frozen_gathers_per_step={
                      "partitioned": per_step(part, "frozen_gathers"), "replicated": per_step(rep, "frozen_gathers")},
                  passes_over_frozen_base_per_micro_batch=f_part / frozen_whole / part[0]["accum"])
    t_rep, t_part = per_step(rep, "trainable_bytes"), per_step(part, "trainable_bytes")
    common.record("zero3_memory", "frozen_replicated_trainable_bytes_gathered_per_step", t_rep, t_part,
                  t_rep / t_part if t_part else None,
                  "bytes all-gathered per rank per optimizer step for trainable parameters (unchanged by the policy)",
                  **extra)
    s_rep, s_part = step_s(rep), step_s(part)
    common.record("zero3_memory", "frozen_replicated_step_seconds", s_rep, s_part, s_rep / s_part,
                  "s per optimizer step, median from step 2 (traffic side, CPU gloo on one host)", **extra)


if __name__ == "__main__":
    main()
