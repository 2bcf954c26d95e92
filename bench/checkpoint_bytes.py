"""Checkpoint bytes against the trainable state, and the cost of a resume at another world size.

    .venv/bin/python bench/checkpoint_bytes.py [--modes lora,full] [--workers 1,2] [--reps 3]

For {lora, full} × {1, 2} workers a Ray Train worker drives the real `orchestration.worker.Trainer` on a mid-size
FLUX.2-shaped model (bench/zero3_memory.py's MID_TRANSFORMER: 512 wide, 4 double + 4 single blocks, ~47 M
parameters; LoRA rank 32): one training step, then `Trainer.save_checkpoint`. Its files are summed by kind (engine
optimizer states, engine model states, trainable.safetensors, ema.safetensors, other). Denominator, from the
trainable parameter count n: n × (4 fp32 weights + 8 Adam m and v + 4 EMA) bytes — the state a resume needs; the
ratio is the checkpoint's bytes over it (goal ≤ 1.15, issue 12).

Universal conversion (what a resume at another world size runs, `orchestration.worker.engine_to_universal`): timed
on the 2-worker checkpoint's engine files, against the baseline of the same engine saved with its frozen parameters
(`exclude_frozen_parameters=False`, what checkpoints held before issue 12), interleaved, medians. Reported: seconds
(each a fresh process; `import_s`: what importing DeepSpeed's converter alone takes), bytes of the engine files it
reads, and the parameters in its output (trainable only; no frozen name).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import common
from zero3_memory import MID_TRANSFORMER

MB = 2**20


def bytes_probe(payload: dict) -> None:
    """Ray Train worker: one step of the real trainer on the mid-size model, its checkpoint, and (baseline) the same
    engine saved with frozen parameters into a scratch directory."""
    import torch.distributed as dist

    import asymflow.tiny as tiny
    from orchestration.config import RunConfig

    build = tiny.build_tiny_transformer
    tiny.build_tiny_transformer = lambda seed=0, **o: build(seed, **{**payload["transformer"], **o})
    t = common.start_trainer(RunConfig.model_validate(payload["config"]))
    t.train_step(0)
    t.save_checkpoint(1)
    dist.barrier()
    t.engine.save_checkpoint(payload["with_frozen"], tag="engine", save_latest=False, exclude_frozen_parameters=False)
    dist.barrier()
    t.loader.close()
    if t.rank == 0:
        params = dict(t.engine.module.named_parameters())
        trainable = [n for n, p in params.items() if p.requires_grad]
        Path(payload["facts"]).write_text(json.dumps({
            "trainable_numel": sum(params[n].ds_numel for n in trainable),
            "full_numel": sum(p.ds_numel for p in params.values()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in t.buffers.values()),
            "trainable": trainable, "frozen": [n for n in params if n not in trainable]}))


def file_kind(relative: str) -> str:
    name = relative.rsplit("/", 1)[-1]
    if relative.startswith("engine/") and name.endswith("optim_states.pt"):
        return "engine_optim_states"
    if relative.startswith("engine/") and name.endswith("model_states.pt"):
        return "engine_model_states"
    return {"trainable.safetensors": "trainable", "ema.safetensors": "ema"}.get(relative, "other")


def bytes_by_kind(root: Path) -> dict[str, int]:
    out = {k: 0 for k in ("engine_optim_states", "engine_model_states", "trainable", "ema", "other")}
    for f in root.rglob("*"):
        if f.is_file():
            out[file_kind(f.relative_to(root).as_posix())] += f.stat().st_size
    return out


def dir_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def time_universal(engine_dir: Path, out: Path) -> tuple[float, list[str]]:
    """Seconds of the conversion a resume at another world size runs, and the parameter names it wrote."""
    from orchestration.worker import engine_to_universal

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    engine_to_universal(str(engine_dir), str(out))
    seconds = time.perf_counter() - t0
    return seconds, sorted(p.name for p in (out / "zero").iterdir() if p.is_dir())


def import_seconds() -> float:
    """What every conversion pays before reading a byte: a Python process importing DeepSpeed's converter."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import deepspeed.checkpoint.ds_to_universal"], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def run(data: str, storage: Path, mode: str, workers: int) -> tuple[Path, Path, dict]:
    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"bytes-{mode}-{workers}"
    cfg = common.tiny_config(data, storage, name, [
        f"train.workers={workers}", f"trainable.mode={mode}", "trainable.lora.rank=32", "trainable.lora.alpha=32.0",
        "train.steps=1000", "sample.every=0", "log.wandb_mode=disabled"])
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    with_frozen, facts = storage / f"{name}-with-frozen", storage / f"{name}.json"
    result = TorchTrainer(
        bytes_probe, train_loop_config={"config": cfg.to_dict(), "transformer": MID_TRANSFORMER,
                                        "with_frozen": str(with_frozen), "facts": str(facts)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RayRunConfig(name=f"{name}-{time.time_ns()}", storage_path=str(storage / "ray")),
    ).fit()
    if result.error is not None:
        raise RuntimeError(f"checkpoint-bytes probe failed: {result.error}")
    return Path(cfg.run_dir) / "checkpoints" / "step-00000001", with_frozen / "engine", json.loads(facts.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each universal conversion [3]")
    args = ap.parse_args()

    data, storage = common.prepare_runs("runs-checkpoint-bytes")
    config = {"transformer": MID_TRANSFORMER, "lora_rank": 32, "precision": "fp32 (CPU)", "steps_before_save": 1,
              "launch": "Ray Train TorchTrainer, gloo, DeepSpeed ZeRO-3"}
    for mode in args.modes.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            step_dir, with_frozen, facts = run(data, storage, mode, workers)
            kinds = bytes_by_kind(step_dir)
            total = sum(kinds.values())
            n = facts["trainable_numel"]
            denominator = 16 * n
            cfg = {**config, "mode": mode, "workers": workers}
            print(f"  {mode} × {workers}: trainable {n / 1e6:.2f} M of {facts['full_numel'] / 1e6:.2f} M; "
                  + ", ".join(f"{k} {v / MB:.1f} MiB" for k, v in kinds.items()), flush=True)
            common.record("checkpoint_bytes", f"{mode}_{workers}w_bytes_over_trainable_state", total, denominator,
                          total / denominator, "bytes of one checkpoint (baseline: trainable numel × (4 weights + 8 "
                          "Adam + 4 EMA) B; goal ratio ≤ 1.15)", config=cfg, bytes_by_kind=kinds,
                          trainable_numel=n, full_numel=facts["full_numel"], buffer_bytes=facts["buffer_bytes"],
                          engine_bytes_with_frozen=dir_bytes(with_frozen))
            if workers < 2:
                continue
            ours, base, imports = [], [], []
            for _ in range(args.reps):  # interleaved: the shared machine's load moves between repetitions
                ours_s, ours_names = time_universal(step_dir / "engine", storage / f"universal-{mode}")
                base_s, base_names = time_universal(with_frozen, storage / f"universal-{mode}-with-frozen")
                ours.append(ours_s)
                base.append(base_s)
                imports.append(import_seconds())
            ours_s, base_s = common.median(ours), common.median(base)
            assert set(ours_names) == set(facts["trainable"]), "the conversion wrote other than the trainable set"
            assert not set(ours_names) & set(facts["frozen"])
            common.record("checkpoint_bytes", f"{mode}_universal_conversion_s", ours_s, base_s, ours_s / base_s,
                          "s of ds_to_universal on the 2-worker checkpoint (baseline: the same engine saved with "
                          "its frozen parameters; medians of interleaved repetitions)", config=cfg,
                          per_rep=ours, per_rep_baseline=base, import_s=common.median(imports),
                          bytes_read=dir_bytes(step_dir / "engine"), bytes_read_baseline=dir_bytes(with_frozen),
                          params_converted=len(ours_names), params_converted_baseline=len(base_names),
                          trainable_params=len(facts["trainable"]), frozen_params=len(facts["frozen"]))
            common.record("checkpoint_bytes", f"{mode}_universal_bytes_read", dir_bytes(step_dir / "engine"),
                          dir_bytes(with_frozen), dir_bytes(step_dir / "engine") / dir_bytes(with_frozen),
                          "bytes of engine files the conversion reads (baseline: with frozen parameters)",
                          config=cfg)


if __name__ == "__main__":
    main()
