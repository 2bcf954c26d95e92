"""`make demo`: the whole mission on the embedded default — bundled photos → shards → cache → subspace →
Ray + DeepSpeed ZeRO-3 training with one injected SIGTERM preemption → export → samples, loss curve, summary.

Every stage runs the same `asymflow` commands a user would type (as subprocesses), so the demo exercises
the real CLI. The default models are tiny and randomly initialised: the images show the mechanics, not quality.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
WORKER_MARK = "RayTrainWorker"  # Ray's process title of a Ray Train worker actor


def asymflow(*args: str, log: Path | None = None, background: bool = False) -> subprocess.Popen | None:
    """Run `asymflow ARGS` with this interpreter; output goes to the terminal and (optionally) a log file."""
    cmd = [sys.executable, "-m", "orchestration.cli", *args]
    print("$ asymflow " + " ".join(args), flush=True)
    out = open(log, "ab") if log else None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None)
    if background:
        return proc
    if proc.wait() != 0:
        raise SystemExit(f"demo: `asymflow {' '.join(args)}` failed with exit code {proc.returncode}"
                         + (f"; see {log}" if log else ""))
    return None


def train_workers(driver_pid: int) -> list[int]:
    """PIDs of the Ray Train worker processes started under this driver (the local Ray is its child)."""
    import psutil

    pids = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if WORKER_MARK in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def steps_logged(run_dir: Path) -> int:
    """Highest step recorded in the run's per-step key log (written by rank 0 after each step)."""
    path = run_dir / "keys.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def train_with_preemption(args: list[str], run_dir: Path, preempt_at: int, log: Path) -> dict:
    """Start training, SIGTERM one worker once `preempt_at` steps are done, and let Ray Train recover."""
    driver = asymflow(*args, log=log, background=True)
    assert driver is not None
    preempted = None
    while driver.poll() is None:
        if preempted is None and steps_logged(run_dir) >= preempt_at:
            workers = train_workers(driver.pid)
            if workers:
                os.kill(workers[-1], signal.SIGTERM)  # one worker only: the group must agree and checkpoint
                preempted = {"step": steps_logged(run_dir), "pid": workers[-1], "time": time.time()}
                print(f"demo: sent SIGTERM to training worker pid {workers[-1]} at step {preempted['step']}", flush=True)
        time.sleep(0.5)
    if driver.returncode != 0:
        raise SystemExit(f"demo: training failed (exit {driver.returncode}); see {log}")
    return {"preempted": preempted}


def plot_loss(run_dir: Path, out: Path) -> list[dict]:
    """loss.png from the run's metrics log (one JSON line per step, rank 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows}  # a step replayed after a restart keeps its last record
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [by_step[s]["loss"] for s in steps], marker="o", ms=3, label="loss")
    if all("loss_mse" in by_step[s] for s in steps):
        ax.plot(steps, [by_step[s]["loss_mse"] for s in steps], alpha=0.6, label="mse part")
    ax.set_xlabel("step")
    ax.set_ylabel("AsymFlowVR loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("tiny demo run (random-init models)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return [by_step[s] for s in steps]


def render_samples(config: Path, adapter: Path, data: Path, out: Path, size: int, steps: int) -> None:
    """samples.png: per caption, the converted model at initialisation (left) and the exported EMA model (right)."""
    import numpy as np
    import torch
    from PIL import Image

    from asymflow.components import BaseModelConfig, load_base_components
    from asymflow.convert import convert_transformer
    from asymflow.export import load_adapter
    from asymflow.pipeline import AsymFlux2KleinPipeline
    from asymflow.scheduler import FlowAdapterScheduler
    from asymflow.subspace import SubspaceArtifact
    from data_prep.run_config import load_model_config

    cfg: BaseModelConfig = load_model_config(config)
    parts = load_base_components(cfg)
    artifact = SubspaceArtifact.load(data / "subspace.safetensors", patch_size=16)
    models = {
        "init": convert_transformer(parts.transformer, artifact.basis, artifact.scale),
        "trained": load_adapter(adapter, parts.transformer),
    }
    captions = [json.loads(line)["caption"] for line in (data / "demo_captions.jsonl").read_text().splitlines()][:4]
    columns = []
    for name, model in models.items():
        pipe = AsymFlux2KleinPipeline(model.eval(), FlowAdapterScheduler(), parts.text_encoder, parts.tokenizer,
                                      text_hidden_layers=cfg.text_hidden_layers,
                                      max_sequence_length=cfg.max_sequence_length)
        images = pipe(captions, height=size, width=size, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images
        columns.append(np.concatenate(list(images), axis=0))  # stack prompts vertically
    grid = (np.concatenate(columns, axis=1) * 255).round().clip(0, 255).astype("uint8")
    Image.fromarray(grid).save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo-output", help="everything goes here [demo-output]")
    parser.add_argument("--steps", type=int, default=24, help="training steps [24]")
    parser.add_argument("--resolution", type=int, default=128, help="bucket area ≈ N² for the shards [128]")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DeepSpeed ZeRO-3 ranks) [2]")
    parser.add_argument("--preempt-at", type=int, default=None, help="SIGTERM one worker after this step [steps/2]")
    parser.add_argument("--sample-steps", type=int, default=8, help="sampler steps for samples.png [8]")
    parser.add_argument("--base-model", default=None,
                        help="a local FLUX.2 klein diffusers directory to convert instead of the tiny in-code model")
    args = parser.parse_args(argv)

    out = (REPO / args.output).resolve() if not Path(args.output).is_absolute() else Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    corpus, data, storage, log = out / "corpus", out / "data", out / "runs", out / "demo.log"
    run_dir = storage / "demo"
    config = str(TINY_CONFIG)
    if args.base_model:  # same stages, the real model: a copy of the tiny config with its `model:` section replaced
        import yaml

        doc = yaml.safe_load(TINY_CONFIG.read_text())
        doc["model"] = {"kind": "diffusers", "path": str(Path(args.base_model).resolve()),
                        "text_hidden_layers": [9, 18, 27], "max_sequence_length": 512, "dtype": "bfloat16"}
        config = str(out / "config.yaml")
        Path(config).write_text(yaml.safe_dump(doc, sort_keys=False))
    print("asymflow demo: the default base model is a TINY, RANDOMLY INITIALISED FLUX.2-klein-shaped transformer "
          "(with a tiny VAE and text encoder) built in code — the images show the mechanics, not quality.\n", flush=True)

    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        start = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        try:
            yield
        finally:
            timings[name] = round(time.perf_counter() - start, 2)

    with stage("corpus"):
        from data_prep.corpus import build_clean_corpus

        files = build_clean_corpus(corpus)
        print(f"{len(files)} photos from scikit-image's bundled data in {corpus}")
    with stage("prep_shards"):
        asymflow("prep", "shards", str(corpus), str(data), "--resolution", str(args.resolution),
                 "--shard-size", "4", "--no-progress")
    with stage("prep_cache"):
        asymflow("prep", "cache", str(data), "--config", config)
    with stage("prep_subspace"):
        asymflow("prep", "subspace", str(data), "--config", config)
    captions = [{"caption": (corpus / Path(f).with_suffix(".txt")).read_text().strip()} for f in files]
    (data / "demo_captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))

    preempt_at = args.preempt_at if args.preempt_at is not None else max(1, args.steps // 2)
    with stage("train"):
        train_args = ["train", config, "--data", str(data), "--storage", str(storage), "--name", "demo",
                      "--steps", str(args.steps), "--workers", str(args.workers)]
        preemption = train_with_preemption(train_args, run_dir, preempt_at, log)
    with stage("export"):
        adapter = out / "adapter"
        asymflow("export", str(run_dir), "--out", str(adapter))
    with stage("samples"):
        render_samples(Path(config), adapter, data, out / "samples.png", size=args.resolution, steps=args.sample_steps)
    metrics = plot_loss(run_dir, out / "loss.png")
    state = json.loads((Path(sorted((run_dir / "checkpoints").glob("step-*"))[-1]) / "state.json").read_text())
    summary = {
        "steps": state["step"],
        "steps_lost_to_preemption": state.get("steps_lost"),
        "preemptions": state.get("preemptions"),
        "preemption": preemption["preempted"],
        "first_loss": metrics[0]["loss"] if metrics else None,
        "last_loss": metrics[-1]["loss"] if metrics else None,
        "wall_seconds": timings,
        "artifacts": {k: str(out / k) for k in ("samples.png", "loss.png", "adapter", "runs/demo")},
        "note": "tiny randomly initialised base model: images show the mechanics, not quality",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== summary ==\n" + json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
