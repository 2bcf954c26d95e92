"""`make demo`: what AsymFlow is for, at toy scale on a CPU — the latent model's autoencoder blur, and the pixel-space
conversion that fine-tuning lifts past it, measured.

Stages: the 20 photos the bundled base was trained on (128×128 centre crops, captions = photo names) → shards →
cached latents/text → subspace fit (B, s) → Ray + DeepSpeed ZeRO-3 fine-tuning of the converted model with one
injected SIGTERM preemption → export of the EMA adapter → `compare.png` + `metrics.json` (orchestration.compare):
per photo the original, the latent model's sample decoded by its autoencoder, the converted pixel model at step 0
(checked to equal s·B·(latent sample)) and after fine-tuning, with PSNR/SSIM against the photos and the
autoencoder-reconstruction ceiling.

The base (`model: {kind: bundled}`, configs/demo.yaml) is the tiny FLUX.2-style latent generator in
assets/tiny_base/ (see its MODEL_CARD.md): it memorises these 20 photos, it is not a general image model.
Every stage runs the `asymflow` commands a user would type (as subprocesses), so the demo exercises the real CLI.
`--long` fine-tunes for longer (`make demo-long`, ~30–60 min on 2 cores).
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

from orchestration.processes import train_workers

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
LONG_STEPS, LONG_CHECKPOINT_EVERY = 5000, 500  # `--long`


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
            workers = [p.pid for p in train_workers(driver.pid)]
            if workers:
                os.kill(workers[-1], signal.SIGTERM)  # one worker only: the group must agree and checkpoint
                preempted = {"step": steps_logged(run_dir), "pid": workers[-1], "time": time.time()}
                print(f"demo: sent SIGTERM to training worker pid {workers[-1]} at step {preempted['step']}", flush=True)
        time.sleep(0.05)  # a short run (the tests use 8 steps) leaves ~2 s to land the SIGTERM mid-run
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
    ax.set_title("fine-tuning the converted bundled base")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return [by_step[s] for s in steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="everything goes here [demo-output, demo-long-output with --long]")
    parser.add_argument("--long", action="store_true",
                        help=f"longer fine-tuning: {LONG_STEPS} steps, checkpoint every {LONG_CHECKPOINT_EVERY}")
    parser.add_argument("--steps", type=int, default=None, help="training steps [configs/demo.yaml: 400; --long: "
                        f"{LONG_STEPS}]")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DeepSpeed ZeRO-3 ranks) [2]")
    parser.add_argument("--preempt-at", type=int, default=None, help="SIGTERM one worker after this step [steps/2]")
    parser.add_argument("--sample-steps", type=int, default=20, help="Euler steps for every compare.png column [20]")
    parser.add_argument("--seed", type=int, default=0, help="noise seed shared by every compare.png column [0]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override passed to `asymflow train` (repeatable)")
    parser.add_argument("--base-model", default=None,
                        help="a local FLUX.2 klein diffusers directory to convert instead of the bundled tiny base")
    args = parser.parse_args(argv)

    import yaml

    output = args.output or ("demo-long-output" if args.long else "demo-output")
    out = (REPO / output).resolve() if not Path(output).is_absolute() else Path(output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    corpus, data, storage, log = out / "corpus", out / "data", out / "runs", out / "demo.log"
    run_dir = storage / "demo"
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    steps = args.steps or (LONG_STEPS if args.long else int(doc["train"]["steps"]))
    overrides = list(args.set)
    if args.long:
        overrides.append(f"checkpoint.every={LONG_CHECKPOINT_EVERY}")
    config = str(DEMO_CONFIG)
    if args.base_model:  # same stages, the real model: a copy of the demo config with its `model:` section replaced
        doc["model"] = {"kind": "diffusers", "path": str(Path(args.base_model).resolve()),
                        "text_hidden_layers": [9, 18, 27], "max_sequence_length": 512, "dtype": "bfloat16"}
        config = str(out / "config.yaml")
        Path(config).write_text(yaml.safe_dump(doc, sort_keys=False))
    else:
        print("asymflow demo: the base is the BUNDLED TINY FLUX.2-style latent model (assets/tiny_base/, 6.4 M + 1.0 M "
              "parameters) trained on the 20 photos used here — a toy that memorises them, not a general image model.\n",
              flush=True)

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
        from data_prep.corpus import BASE_RESOLUTION, build_base_corpus

        files = build_base_corpus(corpus)
        print(f"{len(files)} photos from scikit-image's bundled data, {BASE_RESOLUTION}² centre crops, in {corpus}")
    with stage("prep_shards"):
        asymflow("prep", "shards", str(corpus), str(data), "--resolution", str(BASE_RESOLUTION),
                 "--shard-size", "4", "--no-progress")
    with stage("prep_cache"):
        asymflow("prep", "cache", str(data), "--config", config)
    with stage("prep_subspace"):
        asymflow("prep", "subspace", str(data), "--config", config)

    preempt_at = args.preempt_at if args.preempt_at is not None else max(1, steps // 2)
    with stage("train"):
        train_args = ["train", config, "--data", str(data), "--storage", str(storage), "--name", "demo",
                      "--steps", str(steps), "--workers", str(args.workers)]
        for item in overrides:
            train_args += ["--set", item]
        preemption = train_with_preemption(train_args, run_dir, preempt_at, log)
    with stage("export"):
        adapter = out / "adapter"
        asymflow("export", str(run_dir), "--out", str(adapter))
    with stage("compare"):
        import torch

        from orchestration.artifacts import resolve_checkpoint
        from orchestration.compare import compare_checkpoint, format_table

        torch.set_num_threads(1)  # small models: single-threaded is ~7× faster on a busy 2-core machine
        compared = compare_checkpoint(resolve_checkpoint(str(run_dir)), out, steps=args.sample_steps, seed=args.seed)
        print(format_table(compared))
    metrics = plot_loss(run_dir, out / "loss.png")
    state = json.loads((Path(sorted((run_dir / "checkpoints").glob("step-*"))[-1]) / "state.json").read_text())
    check = compared["step0_check"]
    summary = {
        "steps": state["step"],
        "steps_lost_to_preemption": state.get("steps_lost"),
        "preemptions": state.get("preemptions"),
        "preemption": preemption["preempted"],
        "first_loss": metrics[0]["loss"] if metrics else None,
        "last_loss": metrics[-1]["loss"] if metrics else None,
        "psnr_db": {k: v["mean"] for k, v in compared["psnr"].items()},
        "ssim": {k: v["mean"] for k, v in compared["ssim"].items()},
        "finetuned_exceeds_ae_ceiling_psnr": compared["finetuned_exceeds_ae_ceiling_psnr"],
        "step0_matches_sB_latent_sample": check["ok"],
        "wall_seconds": timings,
        "artifacts": {k: str(out / k) for k in ("compare.png", "metrics.json", "loss.png", "adapter", "runs/demo")},
        "command": "python -m orchestration.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== summary ==\n" + json.dumps(summary, indent=2))
    if not check["ok"]:
        raise SystemExit(f"demo: the step-0 column is not s·B·(latent sample) within tolerance: {check}")
    print(f"\nLook at the fine-tuned model in a browser: asymflow serve {run_dir} --compare-latent "
          "(pip install -e '.[serve]'), then open http://127.0.0.1:7860")
    return 0


if __name__ == "__main__":
    sys.exit(main())
