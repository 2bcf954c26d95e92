"""`asymflow train` and `asymflow export`: argument parsing, environment setup, and the export of a checkpoint."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Register `train` and `export` on the console script's subparsers."""
    train = sub.add_parser(
        "train",
        help="convert + fine-tune on a Ray cluster (local on 127.0.0.1 by default); resumes automatically",
        description="Run CONFIG on Ray Train + DeepSpeed ZeRO-3. The same command with the same run name and "
        "storage resumes from the latest complete checkpoint. Flags override the config's fields.",
    )
    train.add_argument("config", metavar="CONFIG", help="run config YAML (e.g. configs/tiny.yaml)")
    train.add_argument("--data", help="dataset directory or URL (data.path)")
    train.add_argument("--storage", help="storage root for run directories (run.storage)")
    train.add_argument("--name", help="run name (run.name); STORAGE/NAME is the run directory")
    train.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    train.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    train.add_argument("--address", help="Ray cluster (GCS) address HOST:PORT or 'auto' (run.ray_address), as "
                       "ray.init takes it — not the job server URL `submit --address` takes; default: a local Ray on "
                       "127.0.0.1")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. --set train.lr=1e-4 (repeatable)")
    train.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")
    train.add_argument("--resume-from", type=int, metavar="STEP",
                       help="resume from this complete checkpoint instead of the latest; later checkpoints are moved "
                       "to RUN_DIR/abandoned/ (kept, never restored)")
    train.add_argument("--verbose", action="store_true",
                       help="keep the libraries' own output in the log (deprecation warnings, Ray Train's report "
                       "dicts, wandb's tables), which is filtered by default")
    train.add_argument("--dry-run", action="store_true",
                       help="check everything as a real run would, print the resolved config, world size, batch "
                       "arithmetic, epoch and checkpoint schedule and the predicted memory per worker; start nothing")
    train.set_defaults(func=_run_train)

    export = sub.add_parser(
        "export",
        help="write the adapter directory (spec §12) of a run's checkpoint (EMA weights by default)",
        description="Export a run's checkpoint: the adapter directory (official layout + peft and diffusers LoRA "
        "files + model card), or with --merged a complete model directory. Written to a staging directory and "
        "renamed last, so an error never leaves a half-written export.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="STORAGE/NAME of a run")
    export.add_argument("--step", type=int, help="checkpoint step [latest complete]")
    export.add_argument("--out", help="output directory [RUN_DIR/export/step-N]")
    export.add_argument("--weights", choices=("ema", "trainable"), default="ema", help="[ema]")
    export.add_argument("--merged", action="store_true",
                        help="a complete diffusers model directory with the LoRA fused in (loads with "
                             "AsymFlux2Transformer2DModel.from_pretrained(DIR), no base) [RUN_DIR/export/step-N-merged]")
    export.add_argument("--pipeline", action="store_true",
                        help="with --merged: a whole pipeline directory (transformer, scheduler, text encoder, "
                             "tokenizer; other families: AsymFlowFamilyPipeline with the base's text encoders; "
                             "DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)) "
                             "[RUN_DIR/export/step-N-pipeline]")
    export.set_defaults(func=_run_export)


def set_process_environment() -> None:
    """Environment Ray, DeepSpeed and wandb read at import time: loopback-only Ray, no usage stats, offline wandb
    unless the user chose otherwise, and a repo-local cache for DeepSpeed's JIT-built ops."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))


FLAG_KEYS = {"data": "data.path", "storage": "run.storage", "name": "run.name", "steps": "train.steps",
             "workers": "train.workers", "address": "run.ray_address"}


def cli_flags(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The explicit flags as {dotted key: value taken as given} (applied after --set, so they win) and
    {dotted key: "--flag value"} for error messages."""
    values = {key: getattr(args, attr, None) for attr, key in FLAG_KEYS.items()}
    values = {k: v for k, v in values.items() if v is not None}
    names = {key: f"--{attr} {getattr(args, attr)}" for attr, key in FLAG_KEYS.items() if key in values}
    return values, names


def _run_train(args: argparse.Namespace) -> int:
    set_process_environment()
    from orchestration.config import load_config
    from orchestration.launcher import launch

    # A ConfigError (bad config, failed preflight) propagates to `orchestration.cli.main`: one line, exit 2.
    if args.resume_from is not None and args.overwrite:
        raise ValueError("--resume-from and --overwrite contradict each other (--overwrite deletes every checkpoint)")
    flags, names = cli_flags(args)
    cfg = load_config(args.config, args.overrides, flags, names)
    if args.dry_run:
        return _dry_run(cfg)
    result = launch(cfg, overwrite=args.overwrite, resume_from=args.resume_from, verbose=args.verbose)
    if result.error is not None:
        # Ray's error carries the workers' tracebacks, already in the log above: one line here.
        first = next((line for line in str(result.error).splitlines() if line.strip()), type(result.error).__name__)
        print(f"error: training failed: {first}", file=sys.stderr)
        return 1
    if result.stopped_at is not None:
        print(f"stopped: checkpoint at step {result.stopped_at} in {result.run_dir}; the same command resumes")
        return 0
    print(f"done: {result.run_dir}")
    return 0


def _dry_run(cfg) -> int:
    from orchestration.dry_run import dry_run_report
    from orchestration.launcher import check_run_dir
    from orchestration.preflight import check_inputs, resolve_local_paths

    cfg = resolve_local_paths(cfg)
    check_inputs(cfg)
    check_run_dir(cfg, overwrite=False)  # a run directory of another config is refused here too; nothing deleted
    print(dry_run_report(cfg))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    set_process_environment()
    from orchestration.artifacts import export_checkpoint

    if args.pipeline and not args.merged:
        print("error: --pipeline needs --merged (a pipeline directory holds the merged transformer)", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.run_dir, args.step, args.out, args.weights, merged=args.merged,
                                pipeline=args.pipeline)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    from orchestration import checkpoint as ckpt
    from orchestration.artifacts import resolve_checkpoint

    step = ckpt.read_state(resolve_checkpoint(args.run_dir, args.step))["step"]
    kind = "pipeline" if args.pipeline else "merged model" if args.merged else "adapter"
    files = sorted(p.name for p in Path(out).iterdir() if p.is_file())
    print(f"exported the {kind} of step {step} ({'EMA' if args.weights == 'ema' else 'raw trainable'} weights) to "
          f"{out}: {', '.join(files) or 'subdirectories only'}")
    return 0
