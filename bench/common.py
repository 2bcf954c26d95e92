"""Shared helpers of the bench/ scripts: the JSON-record writer, machine and load facts, the bench dataset, a local
loopback Ray, `asymflow train` runs with a process poller, and the bare DeepSpeed ZeRO-3 loop used as a baseline.

Every benchmark appends one JSON line per figure to bench/results.jsonl (`record`); BENCHMARKS.md is rendered from
that file by bench/report.py. Benchmarks are scripts, never pytest tests (DESIGN §4 habit 13).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS", REPO / "bench" / "results.jsonl"))  # BENCH_RESULTS: trial runs elsewhere
CACHE = REPO / ".cache" / "bench"  # ignored by git: datasets and run directories of the benchmarks
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestration.processes import train_workers  # noqa: E402,F401  (bench modules call common.train_workers)


# ----------------------------------------------------------------------------------------------- environment


def set_bench_environment() -> None:
    """What `asymflow train` sets before importing Ray/DeepSpeed (loopback-only Ray, no usage stats, offline
    wandb, repo-local JIT cache), plus bench/ and the repo on PYTHONPATH so Ray workers can import this module
    (the bare loop below is pickled by reference)."""
    from orchestration.train_cli import set_process_environment

    os.chdir(REPO)
    set_process_environment()
    paths = [str(REPO / "bench"), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return (f"{model}, {len(os.sched_getaffinity(0))} cores usable, {mem / 2**20:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()} (shared with other jobs)")


def load() -> str:
    """`uptime`'s load averages (1, 5, 15 min): the machine is shared, so every figure carries it."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def record(benchmark: str, metric: str, value: float, baseline_value: float | None, ratio: float | None, unit: str,
           *, config: dict[str, Any] | None = None, note: str | None = None, results: Path = RESULTS,
           **extra: Any) -> dict[str, Any]:
    """Append one figure to results.jsonl and print it; `ratio` is ours/baseline unless the unit says otherwise."""
    rec: dict[str, Any] = {
        "benchmark": benchmark, "metric": metric, "value": value, "baseline_value": baseline_value, "ratio": ratio,
        "unit": unit, "machine": machine(), "date": now(), "command": command(), "load": load(),
    }
    if config:
        rec["config"] = config
    if note:
        rec["note"] = note
    rec.update(extra)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    base = "" if baseline_value is None else f" (baseline {_fmt(baseline_value)}"
    base += "" if baseline_value is None else (f", ratio {ratio:.3f})" if ratio is not None else ")")
    print(f"[{benchmark}] {metric} = {_fmt(value)} {unit}{base}  [load {rec['load']}]", flush=True)
    return rec


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------------------------- dataset


def ensure_dataset(resolution: int = 128) -> str:
    """The demo's dataset (bundled photos → shards at ~resolution² buckets → tiny-model cache → subspace), built
    once under .cache/bench/ by the same data_prep functions `asymflow prep` runs."""
    from asymflow.components import BaseModelConfig
    from data_prep.cache import build_cache
    from data_prep.corpus import build_clean_corpus
    from data_prep.images import ImageSpec, make_buckets
    from data_prep.shards import BuildConfig, build_shards
    from data_prep.subspace_job import fit_subspace

    root = CACHE / f"data-{resolution}"
    data = root / "data"
    if (data / "subspace.safetensors").exists():
        return str(data)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    build_clean_corpus(corpus)
    report = build_shards(BuildConfig(str(corpus), str(data), ImageSpec(buckets=make_buckets(resolution)), 4),
                          workers=1, show_progress=False, log=lambda _: None)
    assert report.exit_code == 0, report.message
    model = BaseModelConfig(kind="tiny", seed=0)
    build_cache(str(data), model, batch_size=4, progress=False)
    fit_subspace(str(data), model, num_images=16, progress=False)
    return str(data)


# ----------------------------------------------------------------------------------------------- runs


def init_ray(num_cpus: int = 2) -> None:
    """One local Ray for all runs of a benchmark, bound to 127.0.0.1 (call set_bench_environment first)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


def tiny_config(data: str, storage: Path, name: str, overrides: Iterable[str] = ()):
    """configs/tiny.yaml with the CLI flags' overrides, as `asymflow train configs/tiny.yaml --data ...` builds it."""
    from orchestration.config import load_config

    return load_config(str(TINY_CONFIG), [f"data.path={data}", f"run.storage={storage}", f"run.name={name}",
                                          *overrides])


def prepare_runs(name: str, resolution: int = 128) -> tuple[str, Path]:
    """What a training benchmark does first: the bench environment, the demo dataset, an emptied run storage
    `.cache/bench/NAME` and the loopback Ray. Returns (dataset directory, storage)."""
    import shutil

    set_bench_environment()
    data = ensure_dataset(resolution)
    storage = CACHE / name
    shutil.rmtree(storage, ignore_errors=True)
    init_ray()
    return data, storage


def start_trainer(cfg):
    """Inside a Ray Train worker: the real `orchestration.worker.Trainer` built as `train_loop` builds it (process
    group, models, ZeRO-3 engine, fresh EMA, loader), ready for `train_step(0)`; a probe then drives it."""
    import ray.train

    from orchestration.worker import Trainer

    ctx = ray.train.get_context()
    t = Trainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank())
    t.apply_distributed()
    t.find_restore()
    t.build_models()
    t.build_engine(load_universal=False)
    _, data_state = t.restore(None)
    t.loader = t.build_loader(data_state)
    t.wandb_id = "bench"
    return t


class RSSPoller(threading.Thread):
    """Peak RSS of every Ray Train worker process seen while it runs (sampled every `interval` s)."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.peak, self.stop = interval, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for p in train_workers():
                try:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(self.interval)


def launch_train(cfg) -> tuple[float, Any]:
    """Run `asymflow train` in-process: `orchestration.launcher.launch` is what the CLI calls after parsing. Ray is
    already up (init_ray), so its start-up is not in the figures. Returns (wall seconds, LaunchResult)."""
    from orchestration.launcher import launch

    t0 = time.perf_counter()
    result = launch(cfg)
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"asymflow train failed: {result.error}")
    return wall, result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return out


# ----------------------------------------------------------------------------------------------- bare ZeRO-3 loop


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def zero3_accounting(engine, teacher) -> dict[str, int]:
    """What ZeRO-3 holds on this rank, in elements and bytes, read from DeepSpeed's own structures."""
    module = engine.module
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    fp32_master = sum(t.numel() * t.element_size() for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    adam = 0
    for state in opt.optimizer.state.values():
        adam += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel") and v.ndim > 0)
    grads = getattr(opt, "grad_partitions_flat_buffer", None)
    return {
        "full_numel": sum(p.ds_numel for p in params),
        "rank_numel": sum(p.ds_tensor.numel() for p in params),
        "trainable_full_numel": sum(p.ds_numel for p in trainable),
        "trainable_rank_numel": sum(p.ds_tensor.numel() for p in trainable),
        "param_partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
        "fp32_master_bytes": fp32_master,
        "grad_partition_bytes": 0 if grads is None else grads.numel() * grads.element_size(),
        "adam_state_bytes": adam,
        "teacher_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        # whole (unpartitioned) bytes of the fully trained modules: what a tied teacher must copy, nothing more
        "full_modules_bytes": sum(p.ds_numel * p.element_size() for name, p in module.named_parameters()
                                  if name.split(".")[0] in ("x_embedder", "proj_out", "norm_out")),
    }


def bare_zero3_loop(payload: dict[str, Any]) -> None:
    """Ray Train worker: the minimal DeepSpeed ZeRO-3 training loop on the model `asymflow train` builds.

    Same construction as orchestration.worker.Trainer (tiny latent transformer → convert_transformer → frozen
    teacher → apply_trainable → AdamW param groups → deepspeed.initialize with build_deepspeed_config), same loss
    (asymflow_vr_step with the perceptual stand-in), same micro-batch / accumulation / world size, and the same
    batches (the first `steps` global batches of the run's data plan, read into memory before timing). What it
    leaves out is exactly the trainer's per-step machinery: streaming loader, LR warmup bookkeeping, EMA,
    keys gather, metrics, checkpoints, preemption polls. Writes `{out}/rank{r}.json` with per-step seconds
    and ZeRO-3 memory accounting.
    payload: config (resolved RunConfig dict), steps, out, transformer (optional overrides of the tiny config),
    count_gathers (optional: bytes all-gathered per step, frozen vs trainable; `orchestration.frozen_params`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rss_start = current_rss_bytes()
    import deepspeed
    import ray.train
    import torch

    import diffusers  # noqa: F401  (ZeRO-3 hooks need diffusers and dynamo imported first, as in the worker)
    import torch._dynamo  # noqa: F401
    from asymflow.convert import convert_transformer
    from asymflow.objective import asymflow_vr_step
    from asymflow.perceptual import build_image_distance
    from asymflow.subspace import SubspaceArtifact
    from asymflow.tiny import build_tiny_transformer
    from asymflow.teacher import make_teacher
    from asymflow.trainable import apply_trainable, param_groups
    from data_prep.reader import DatasetIndex
    from orchestration.config import RunConfig
    from orchestration.deepspeed_config import build_deepspeed_config
    from orchestration.frozen_params import apply_frozen_params, counting_gathers
    from orchestration.loader import RankLoader
    from orchestration.worker import derive_seed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.model_validate(payload["config"])
    t = cfg.train
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as the worker does on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    rss_imports = current_rss_bytes()

    artifact = SubspaceArtifact.load(cfg.subspace_path, patch_size=cfg.objective.patch_size, rank=cfg.subspace.rank)
    latent = build_tiny_transformer(cfg.model.seed, **payload.get("transformer", {}))
    student = convert_transformer(latent, artifact.basis, artifact.scale)
    del latent
    teacher = make_teacher(student, cfg.trainable.teacher_kind(), cfg.trainable.full_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(t.seed, 0xC0FFEE))
        apply_trainable(student, cfg.trainable.mode, cfg.trainable.lora, cfg.trainable.full_modules)
    student.train()
    if t.activation_checkpointing:
        student.enable_gradient_checkpointing()
    perceptual = build_image_distance(cfg.perceptual.kind, cfg.perceptual.weights_path, cfg.perceptual.seed)
    rss_model = current_rss_bytes()
    groups = param_groups(student, t.lr, t.lr_multipliers, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay)
    ds_config = build_deepspeed_config(t, world, False)
    replicated_bytes = apply_frozen_params(student, cfg.trainable.frozen_params)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    accum = ds_config["gradient_accumulation_steps"]
    rss_engine = current_rss_bytes()

    steps = int(payload["steps"])
    loader = RankLoader(DatasetIndex.open(cfg.data.path), cfg.data, rank=rank, world_size=world,
                        micro_batch=t.micro_batch, grad_accum=accum, global_batch=t.global_batch)
    batches = [[{k: v for k, v in m.items() if isinstance(v, torch.Tensor)} for m in next(loader)] for _ in range(steps)]
    loader.close()

    step_s: list[float] = []
    gathers: list[dict[str, int]] = []
    for step, micro_batches in enumerate(batches):
        t0 = time.perf_counter()
        # gather counting wraps DeepSpeed's per-parameter gather functions: only when asked (not in timing baselines)
        with counting_gathers(engine.module) if payload.get("count_gathers") else contextlib.nullcontext() as count:
            for micro, batch in enumerate(micro_batches):
                generator = torch.Generator().manual_seed(derive_seed(t.seed, step, rank, micro))
                loss, _ = asymflow_vr_step(engine, teacher, batch, generator, cfg.objective, perceptual)
                engine.backward(loss)
                engine.step()
        step_s.append(time.perf_counter() - t0)
        if count is not None:
            gathers.append(count.snapshot())
    out = {"rank": rank, "world_size": world, "step_s": step_s, "accum": accum, "mode": cfg.trainable.mode,
           "frozen_params": cfg.trainable.frozen_params, "gathers": gathers, "replicated_bytes": replicated_bytes,
           "last_loss": loss.item(),
           "rss_start": rss_start, "rss_after_imports": rss_imports, "rss_after_model": rss_model,
           "rss_after_engine": rss_engine, "rss_end": current_rss_bytes(), "peak_rss": peak_rss_bytes(),
           "torch_threads": torch.get_num_threads(), **zero3_accounting(engine, teacher)}
    Path(payload["out"]).mkdir(parents=True, exist_ok=True)
    (Path(payload["out"]) / f"rank{rank}.json").write_text(json.dumps(out))


def run_bare(cfg, steps: int, out: Path, transformer: dict[str, Any] | None = None, name: str = "bare",
             count_gathers: bool = False) -> tuple[float, list[dict]]:
    """Launch `bare_zero3_loop` the way `asymflow train` launches its workers: Ray Train's TorchTrainer with
    `train.workers` CPU workers (so process group, gloo and per-worker thread settings are the same)."""
    import shutil

    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if out.exists():
        shutil.rmtree(out)
    storage = out.parent / "ray"
    trainer = TorchTrainer(
        bare_zero3_loop,
        train_loop_config={"config": cfg.to_dict(), "steps": steps, "out": str(out), "transformer": transformer or {},
                           "count_gathers": count_gathers},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=False),
        run_config=RayRunConfig(name=f"{name}-{time.time_ns()}", storage_path=str(storage)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"bare ZeRO-3 loop failed: {result.error}")
    return wall, [json.loads((out / f"rank{r}.json").read_text()) for r in range(cfg.train.workers)]
