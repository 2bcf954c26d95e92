"""Start (or join) a Ray cluster and run the worker group with Ray Train V2's TorchTrainer; resume is automatic."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec

from orchestration import checkpoint as ckpt
from orchestration.config import ConfigError, RunConfig, save_resolved
from orchestration.preflight import check_inputs, resolve_local_paths
from orchestration.stop_request import DriverStopHandler, clear_stop_request
from orchestration.storage_probe import fatal_error


@dataclass
class LaunchResult:
    run_dir: str
    error: BaseException | None
    metrics: dict[str, Any] | None
    stopped_at: int | None = None  # the checkpoint step of a requested stop (the run is not finished)


def check_run_dir(cfg: RunConfig, overwrite: bool) -> ckpt.Restored | None:
    """Same run name + storage resumes; a directory whose checkpoints come from another config refuses to start
    unless `overwrite`, which deletes it. Returns the checkpoint the workers will resume from, if any."""
    fs, path = fsspec.core.url_to_fs(cfg.run_dir)
    if overwrite and fs.exists(path):
        fs.rm(path, recursive=True)
        return None
    restore = ckpt.find_restore_point(cfg.run_dir)
    if restore is None:
        return None
    saved_hash = restore.state.get("config_hash")
    if saved_hash != cfg.config_hash():
        raise ConfigError(
            f"run.name: {cfg.run_dir} already holds checkpoints of a different config (hash {saved_hash} vs "
            f"{cfg.config_hash()}); use another run name or pass --overwrite to start over"
        )
    return restore


def _storage_for_ray(storage: str) -> str:
    """Ray Train needs an absolute local path or a URI."""
    return storage if "://" in storage else os.path.abspath(storage)


def maybe_init_ray(cfg: RunConfig) -> bool:
    """Connect to `run.ray_address`, or start a local Ray bound to 127.0.0.1 (no dashboard). Returns True if this
    call started it (the caller then shuts it down). The loopback binding also needs
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment before ray is imported (set by the CLI)."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address)
    else:
        ray.init(num_cpus=cfg.run.ray_num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    return True


def trainer_class(local_ray: bool):
    """TorchTrainer; on a local Ray this process started (no dashboard), without Ray Train's PlacementGroupCleaner.
    That helper asks the dashboard's state API whether the controller lives; without a dashboard every query fails
    and it logs "Failed to query Ray Train Controller actor state" every second of the run (with a traceback when
    the machine runs another Ray instance). Its job — freeing the placement group of a dead controller — is done
    here by `ray.shutdown()`. `_create_default_callbacks` is Ray 2.60's (setup.py pins ray ~=2.60.0)."""
    from ray.train.torch import TorchTrainer

    if not local_ray:
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return LocalTorchTrainer


def build_scaling_config(cfg: RunConfig):
    """Worker count (fixed, or elastic `(run.min_workers, train.workers)`: Ray Train V2 starts with what fits and
    grows back when nodes return) and the placement strategy across nodes (PACK / SPREAD / STRICT_*)."""
    from ray.train import ScalingConfig

    workers = cfg.train.workers if cfg.run.min_workers is None else (cfg.run.min_workers, cfg.train.workers)
    return ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu,
                         placement_strategy=cfg.run.placement_strategy)


def stopped_step(cfg: RunConfig) -> int | None:
    """The step of the latest checkpoint when the workers ended on a stop request before `train.steps`."""
    restore = ckpt.find_restore_point(cfg.run_dir)
    if restore is None or restore.step >= cfg.train.steps or not restore.state.get("stopped"):
        return None
    return restore.step


def launch(cfg: RunConfig, overwrite: bool = False, check: bool = True,
           resume_from: int | None = None, verbose: bool = False) -> LaunchResult:
    """Validate inputs, then run the worker group to `train.steps`, resuming from the latest checkpoint (or from
    `resume_from`, whose later checkpoints are moved aside first)."""
    cfg = resolve_local_paths(cfg)
    if check:
        check_inputs(cfg)
    if resume_from is not None:
        from orchestration.rewind import rewind_to

        moved = rewind_to(cfg.run_dir, resume_from, cfg.config_hash())
        if moved:
            print(f"[asymflow] resuming from step {resume_from}: checkpoints {moved} moved to "
                  f"{cfg.run_dir}/abandoned/", flush=True)
    restore = check_run_dir(cfg, overwrite)
    if restore is not None and restore.step >= cfg.train.steps:
        return LaunchResult(cfg.run_dir, None, {"step": restore.step})
    save_resolved(cfg, cfg.run_dir)
    if clear_stop_request(cfg.run_dir):  # this launch is the request to train again
        print(f"[asymflow] removed an earlier stop request from {cfg.run_dir}", flush=True)
    started = maybe_init_ray(cfg)
    on_sigterm = DriverStopHandler(cfg.run_dir, log=lambda line: print(line, flush=True))
    on_sigterm.install()
    try:
        import ray

        shortfall = cfg.sampling_gpu_shortfall(ray.cluster_resources().get("GPU", 0.0))
        if shortfall:
            raise ConfigError(shortfall)
        from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig

        from orchestration.worker import train_loop_per_worker

        trainer = trainer_class(local_ray=started and not cfg.run.ray_address)(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "verbose": verbose},
            scaling_config=build_scaling_config(cfg),
            run_config=RayRunConfig(
                name=cfg.run.name,
                storage_path=_storage_for_ray(cfg.run.storage),
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                # Our checkpoints (STORAGE/RUN/checkpoints) are the source of truth and are never reported to Ray;
                # Ray keeps only metrics, so its num_to_keep cannot delete anything of ours.
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            ),
        )
        try:
            result = trainer.fit()
            # A storage probe failure ends the workers normally (so Ray Train does not retry it): their return value.
            error, metrics = result.error or fatal_error(result.return_value), result.metrics
        except Exception as exc:  # TrainingFailedError once max_failures is exhausted
            error, metrics = exc, None
        clear_stop_request(cfg.run_dir)  # a request that came after the last step has nothing left to stop
        return LaunchResult(cfg.run_dir, error, metrics, stopped_at=None if error else stopped_step(cfg))
    finally:
        on_sigterm.uninstall()
        if started:
            import ray

            ray.shutdown()
