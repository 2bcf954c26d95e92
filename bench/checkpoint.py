"""Checkpointing: save time, resume time (restart to first step) and steps lost per preemption (SIGTERM, SIGKILL).

    .venv/bin/python bench/checkpoint.py [--reps 5]

1. Save / load (in-process probe, 2 workers, configs/tiny.yaml): a Ray Train worker drives the real
   `orchestration.worker.Trainer` (build → restore → train_step) and, interleaved --reps times, times
   `Trainer.save_checkpoint` (DeepSpeed engine files without frozen parameters + consolidated EMA safetensors +
   state.json + atomic commit, keep-last-k) against the baseline DeepSpeed `engine.save_checkpoint` alone (frozen
   parameters included, DeepSpeed's default) into a scratch directory; then `Trainer.restore` of the latest
   checkpoint (engine + optimizer + EMA + data state) against a bare `engine.load_checkpoint`. ratio = ours /
   DeepSpeed alone.
2. Preemption (real `asymflow train` runs, checkpoint every 4 of 10 steps): one worker is sent SIGTERM, or SIGKILL,
   once 6 steps are in keys.jsonl — the same way tests/orchestration/test_train_integration.py kills workers. Resume
   time = kill → first step trained by the restarted worker group (new RayTrainWorker processes; wall clock, includes
   Ray Train's failure detection, group restart, model build and restore). Baseline: the same run's cold start
   (launch → first step), so ratio = resume / cold start. Steps lost = steps trained twice (keys.jsonl) and the
   trainer's own `steps_lost` counter in the final state.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import common


def save_probe(payload: dict) -> None:
    """Ray Train worker: time the trainer's checkpoint save/restore against DeepSpeed's own save/load."""
    import torch.distributed as dist

    from orchestration import checkpoint as ckpt
    from orchestration.config import RunConfig

    t = common.start_trainer(RunConfig.model_validate(payload["config"]))
    step = 0
    scratch = Path(payload["scratch"])
    ours, bare = [], []
    for rep in range(int(payload["reps"])):
        t.train_step(step)
        step += 1
        dist.barrier()
        t0 = time.perf_counter()
        t.save_checkpoint(step)
        ours.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        t.engine.save_checkpoint(str(scratch / f"bare-{rep}"), tag="engine", save_latest=False)
        dist.barrier()
        bare.append(time.perf_counter() - t0)
    loads_ours, loads_bare = [], []
    for _ in range(int(payload["reps"])):
        dist.barrier()
        t0 = time.perf_counter()
        t.restore(ckpt.find_restore_point(t.run_dir))
        dist.barrier()
        loads_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        t.engine.load_checkpoint(str(scratch / "bare-0"), tag="engine", load_module_strict=False,
                                 load_optimizer_states=True, load_lr_scheduler_states=False)
        dist.barrier()
        loads_bare.append(time.perf_counter() - t0)
    t.loader.close()
    if t.rank == 0:
        size = sum(f.stat().st_size for f in (scratch / "bare-0").rglob("*") if f.is_file())
        ours_dir = Path(ckpt.checkpoint_dir(t.run_dir, step))
        size_ours = sum(f.stat().st_size for f in ours_dir.rglob("*") if f.is_file())
        (scratch / "probe.json").write_text(json.dumps({"save_ours": ours, "save_bare": bare, "load_ours": loads_ours,
                                                        "load_bare": loads_bare, "bytes_bare": size,
                                                        "bytes_ours": size_ours}))


def run_probe(data: str, storage: Path, reps: int) -> dict:
    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = common.tiny_config(data, storage, "probe", ["train.steps=1000", "checkpoint.keep=2"])
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)  # launch() creates it when it saves config.yaml
    scratch = storage / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    result = TorchTrainer(
        save_probe, train_loop_config={"config": cfg.to_dict(), "reps": reps, "scratch": str(scratch)},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=False),
        run_config=RayRunConfig(name=f"probe-{time.time_ns()}", storage_path=str(storage / "ray")),
    ).fit()
    if result.error is not None:
        raise RuntimeError(f"checkpoint probe failed: {result.error}")
    return json.loads((scratch / "probe.json").read_text())


class Preempter(threading.Thread):
    """Watches keys.jsonl; after `after_steps` lines sends `sig` to one training worker, then timestamps the first
    step of the restarted group (a keys line written after new RayTrainWorker processes appeared)."""

    def __init__(self, run_dir: Path, after_steps: int, sig: int):
        super().__init__(daemon=True)
        self.run_dir, self.after_steps, self.sig = run_dir, after_steps, sig
        self.t_first_step = self.t_kill = self.t_new_workers = self.t_resumed = None
        self.stop = threading.Event()

    def lines(self) -> int:
        keys = self.run_dir / "keys.jsonl"
        return len(keys.read_text().splitlines()) if keys.exists() else 0

    def run(self) -> None:
        old: set[int] = set()
        lines_at_restart = None
        while not self.stop.is_set():
            n = self.lines()
            now = time.perf_counter()
            if n and self.t_first_step is None:
                self.t_first_step = now
            if self.t_kill is None and n >= self.after_steps:
                workers = common.train_workers()
                if workers:
                    old = {p.pid for p in workers}
                    self.t_kill = time.perf_counter()
                    os.kill(workers[-1].pid, self.sig)
            elif self.t_kill is not None and self.t_new_workers is None:
                if any(p.pid not in old for p in common.train_workers()):
                    self.t_new_workers, lines_at_restart = now, n
            elif self.t_new_workers is not None and n > lines_at_restart:
                self.t_resumed = now
                return
            time.sleep(0.02)


def preempted_run(data: str, storage: Path, sig: int) -> dict:
    name = f"preempt-{signal.Signals(sig).name.lower()}-{time.time_ns()}"
    cfg = common.tiny_config(data, storage, name, ["train.steps=10", "checkpoint.every=4", "sample.every=0",
                                                   "run.max_failures=3"])
    watcher = Preempter(Path(cfg.run_dir), after_steps=6, sig=sig)
    watcher.start()
    t0 = time.perf_counter()
    try:
        common.launch_train(cfg)
    finally:
        watcher.stop.set()
    keys = [r["step"] for r in common.read_jsonl(Path(cfg.run_dir) / "keys.jsonl")]
    state = json.loads((Path(cfg.run_dir) / "checkpoints" / f"step-{10:08d}" / "state.json").read_text())
    assert watcher.t_kill and watcher.t_resumed, "the preempter never saw a restart"
    return {"resume_s": watcher.t_resumed - watcher.t_kill, "detect_and_restart_s": watcher.t_new_workers - watcher.t_kill,
            "cold_start_s": watcher.t_first_step - t0, "steps_trained_twice": len(keys) - len(set(keys)),
            "state_steps_lost": state["steps_lost"], "preemptions": state["preemptions"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    data, storage = common.prepare_runs("runs-checkpoint")
    config = {"config": "configs/tiny.yaml", "workers": 2, "reps": args.reps, "trainable": "LoRA rank 4 (tiny)"}

    probe = run_probe(data, storage, args.reps)
    for what in ("save", "load"):
        o, b = common.median(probe[f"{what}_ours"]), common.median(probe[f"{what}_bare"])
        common.record("checkpoint", f"{what}_time_s", o, b, o / b,
                      f"s (ours: Trainer.{'save_checkpoint' if what == 'save' else 'restore'}; baseline: DeepSpeed "
                      f"engine.{what}_checkpoint alone; ratio = ours/baseline)", config=config,
                      per_rep_ours=probe[f"{what}_ours"], per_rep_bare=probe[f"{what}_bare"],
                      bytes_ours=probe["bytes_ours"], bytes_bare=probe["bytes_bare"])

    for sig in (signal.SIGTERM, signal.SIGKILL):
        r = preempted_run(data, storage, sig)
        name = signal.Signals(sig).name
        cfg = {**config, "steps": 10, "checkpoint_every": 4, "killed_after_steps": 6,
               "detect_and_restart_s": r["detect_and_restart_s"]}
        common.record("checkpoint", f"resume_time_s_{name}", r["resume_s"], r["cold_start_s"],
                      r["resume_s"] / r["cold_start_s"],
                      "s from the kill to the restarted group's first step (baseline: cold start to first step)",
                      config=cfg)
        common.record("checkpoint", f"steps_lost_{name}", r["steps_trained_twice"], None, None,
                      "steps trained twice (keys.jsonl) for one preemption", config=cfg,
                      state_steps_lost=r["state_steps_lost"], preemptions=r["preemptions"],
                      expected="SIGTERM: 0 (checkpoint on signal); SIGKILL: steps since the last checkpoint")


if __name__ == "__main__":
    main()
