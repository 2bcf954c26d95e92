"""The per-worker training loop run by Ray Train: build → restore → loop (step, maybe checkpoint, maybe log)."""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from orchestration import checkpoint as ckpt
from orchestration.config import RunConfig, local_file
from orchestration.goodput import Goodput, executed_steps
from orchestration.lr_schedule import lr_factor
from orchestration.node import NodeInfo, this_node
from orchestration.node_restore import NodeCopy, node_checkpoint_copy
from orchestration.progress import write_progress
from orchestration.quiet import quiet_library_output
from orchestration.preemption import (CONTINUE, PREEMPT, STOP, Preempted, PreemptionFlag, agree_to_stop,
                                      maybe_ray_preemption_notice)
from orchestration.stop_request import StopPoller, clear_stop_request, read_stop_request
from orchestration.storage_probe import FATAL

KEYS_LOG = "keys.jsonl"  # per-step consumed sample keys (rank 0, global batch order): resume tests compare these
KEYS_DIR = "keys"  # object storage cannot append: one `keys/step-N.json` object per step instead of KEYS_LOG
METRICS_LOG = "metrics.jsonl"  # one line per logged step (rank 0): loss curve, `asymflow status` progress and ETA


# ----------------------------------------------------------------------------------------------- entry point


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, str] | None:
    """Ray Train entry point. `payload = {"config": resolved config dict}`; the environment is set here, the
    only place a worker process reads or writes it. Returns a fatal error for the driver (`storage_probe.FATAL`),
    or None."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray.train

    cfg = RunConfig.model_validate(payload["config"])
    if not payload.get("verbose"):
        quiet_library_output(cfg.train.use_gpu)
    context = ray.train.get_context()
    trainer = Trainer(cfg, rank=context.get_world_rank(), world_size=context.get_world_size(),
                      local_rank=context.get_local_rank())
    return trainer.run()


# ----------------------------------------------------------------------------------------------- helpers


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, micro): a pure function, so resumed runs redraw the same."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _gather_partition(local: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Full tensor of a ZeRO-3 partitioned quantity (fp32 EMA shard): all-gather the equal-size partitions, trim
    the padding, restore the shape. Collective: every rank calls it in the same order."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    flat = local.detach().reshape(-1).float().contiguous()
    if world > 1:
        out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
        dist.all_gather_into_tensor(out, flat)
        flat = out
    return flat[: param.ds_numel].view(param.ds_shape).cpu()


def engine_to_universal(engine_dir: str, output_dir: str) -> None:
    """DeepSpeed's own converter (a subprocess, as its CLI) from the ZeRO engine files of one tag to the universal
    format. It reads every rank's optimizer and model-state files: only the trainable state, since checkpoints
    exclude frozen parameters."""
    subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", engine_dir,
         "--output_folder", output_dir, "--num_extract_workers", "1", "--num_merge_workers", "1", "--no_strict"],
        check=True,
    )


def _partition_of(full: torch.Tensor, param: torch.nn.Parameter, rank: int) -> torch.Tensor:
    """This rank's slice of a full tensor in ZeRO-3's layout: flatten, zero-pad to world × part, take part r."""
    part = param.ds_tensor.numel()
    flat = full.detach().reshape(-1).float()
    padded = torch.zeros(part * (rank + 1), dtype=flat.dtype)
    n = min(flat.numel(), padded.numel())
    padded[:n] = flat[:n]
    return padded[rank * part : (rank + 1) * part]


# ----------------------------------------------------------------------------------------------- trainer


@dataclass
class Counters:
    skipped_steps: int = 0
    preemptions: int = 0
    # The current logging window (reset at every logged step); whole-run totals live in `Trainer.goodput`.
    data_wait_s: float = 0.0
    step_time_s: float = 0.0
    window_steps: int = 0


class Trainer:
    """One rank of the run. Reads top to bottom in `run`."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, local_rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.run_dir = cfg.run_dir
        self.device = torch.device(f"cuda:{local_rank}" if cfg.train.use_gpu else "cpu")
        self.flag = PreemptionFlag()
        self.stop_poller = StopPoller(cfg.run_dir)
        self.counters = Counters()
        self.goodput = Goodput()
        self.wandb_run = None
        self.wandb_id: str | None = None
        self.sample_tasks: list[tuple[int, Any]] = []  # (checkpoint step, Ray ref of its render task)
        self.last_step = 0  # the last step logged to wandb (its steps only move forward)

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, str] | None:
        self.flag.install()
        self.apply_distributed()
        problem = self.probe_storage()
        if problem is not None:
            # Returned, not raised: Ray Train restarts a raising group up to max_failures times, and no restart can
            # make node-local storage shared. The driver turns it into `StorageProbeError`.
            return {FATAL: problem}
        restore = self.find_restore()
        self.build_models()
        self.build_engine(load_universal=restore is not None and restore.state["world_size"] != self.world_size)
        step, data_state = self.restore(restore)
        self.loader = self.build_loader(data_state)
        interruptions = self.account_attempt(restore)
        self.maybe_start_wandb(interruptions)
        total = self.cfg.train.steps
        self.t_start, self.step_start = time.time(), step
        while step < total:
            self.train_step(step)
            step += 1
            wish = agree_to_stop(self.local_wish(step))
            if step % self.cfg.checkpoint.every == 0 or step == total or wish:
                self.save_checkpoint(step, preempted=wish != CONTINUE, stopped=wish == STOP)
            self.maybe_log(step, total, force=wish != CONTINUE)
            self.maybe_sample(step)
            if wish == PREEMPT:
                self.log_line(f"preempted: checkpoint at step {step} committed; exiting for a restart")
                raise Preempted(f"preempted at step {step}")
            if wish == STOP and step < total:  # a stop at the last step is simply the end of the run
                self.end_on_stop(step)
                return
        self.loader.close()
        self.log_summary(total)
        self.maybe_export(total)
        self.finish()

    def local_wish(self, step: int) -> int:
        """This rank's wish at the boundary after `step`: STOP (the run's stop marker), PREEMPT (SIGTERM or Ray's
        notice) or CONTINUE. The notice is polled first and unconditionally: it is a Ray collective."""
        preempt = self.maybe_preemption_notice(step) or self.flag.is_set()
        return STOP if self.stop_poller.requested() else PREEMPT if preempt else CONTINUE

    def end_on_stop(self, step: int) -> None:
        """A requested stop: the checkpoint is committed; rank 0 records it in the ledger (what `asymflow stop`
        waits for) and removes the marker; then the training function returns normally, which Ray Train does not
        restart. No export: the run is not finished."""
        self.loader.close()
        if self.rank == 0:
            request = read_stop_request(self.run_dir) or {}
            self.append_to_ledger("stopped", step=step, request_id=request.get("id"), source=request.get("source"))
            clear_stop_request(self.run_dir)
            self.log_line(f"stopped: checkpoint at step {step} committed; run the same command to resume")
        self.barrier()
        self.finish()

    def maybe_preemption_notice(self, step: int) -> bool:
        """Ray's node-preemption notice, polled every `run.preemption_poll_every` steps (it is a Ray collective,
        so every rank polls at the same steps; polling each step would cost a round trip per step)."""
        every = self.cfg.run.preemption_poll_every
        return bool(every) and (step - 1) % every == 0 and maybe_ray_preemption_notice()

    # ------------------------------------------------------------------ build

    def apply_distributed(self) -> None:
        """DeepSpeed on top of the process group Ray Train already created (gloo on CPU, nccl on GPU)."""
        import deepspeed

        if not self.cfg.train.use_gpu:
            # The CPU shm all-reduce op is a JIT C++ build (~30 s cold) that gloo does not need; turning it off
            # through DeepSpeed's compatible-ops table (the only switch it has) keeps worker start fast.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        else:
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.train.use_gpu else "gloo")

    @functools.cached_property
    def node(self) -> NodeInfo:
        """This rank's machine as Ray names it."""
        return this_node()

    def probe_storage(self) -> str | None:
        """Every rank sees rank 0's run directory and dataset (`orchestration.storage_probe`); the error or None."""
        from orchestration.storage_probe import probe_storage

        problem = probe_storage(self.run_dir, self.cfg.data.path, self.rank, self.node.label, self.gather)
        if problem is not None:
            self.log_line(problem)
        return problem

    def find_restore(self) -> ckpt.Restored | None:
        """Rank 0 cleans partial checkpoints; then every rank reads the same latest complete one."""
        if self.rank == 0:
            removed = ckpt.clean_partial(self.run_dir)
            if removed:
                self.log_line(f"removed partial checkpoints {removed}")
        self.barrier()
        return ckpt.find_restore_point(self.run_dir)

    def build_models(self) -> None:
        """Pixel model = convert(base latent transformer, B, s); teacher = frozen converted init; then the trainable
        set. Built identically on every rank (seeded), whether starting or resuming: frozen weights are never
        checkpointed, trainable ones are overwritten by the restore."""
        import diffusers  # noqa: F401  (DeepSpeed's ZeRO-3 hooks need diffusers and dynamo imported first)
        import torch._dynamo  # noqa: F401

        from asymflow.perceptual import build_image_distance
        from asymflow.subspace import SubspaceArtifact
        from orchestration.model_build import build_student_and_teacher, training_guidance

        cfg = self.cfg
        artifact = SubspaceArtifact.load(local_file(cfg.subspace_path), patch_size=cfg.objective.patch_size,
                                         rank=cfg.subspace.rank)
        student, teacher = build_student_and_teacher(cfg, artifact.basis, artifact.scale,
                                                     lora_seed=derive_seed(cfg.train.seed, 0xC0FFEE))
        self.guidance = training_guidance(cfg, student)  # None but for guidance-distilled models (FLUX.1-dev)
        self.teacher = teacher.to(self.device)
        self.student = student
        self.buffers = {name: b.detach().clone() for name, b in student.named_buffers()}
        self.perceptual = build_image_distance(cfg.perceptual.kind, cfg.perceptual.weights_path, cfg.perceptual.seed)
        if self.perceptual is not None:
            self.perceptual = self.perceptual.to(self.device)

    def build_engine(self, load_universal: bool) -> None:
        """DeepSpeed ZeRO-3 engine over the trainable parameters, grouped for per-module learning rates."""
        import deepspeed

        from asymflow.trainable import param_groups
        from orchestration.deepspeed_config import build_deepspeed_config
        from orchestration.frozen_params import apply_frozen_params

        t = self.cfg.train
        # replicated: the frozen base leaves ZeRO-3, in the dtype the engine gives parameters
        apply_frozen_params(self.student, self.cfg.trainable.frozen_params, torch.bfloat16 if t.use_gpu else None)
        groups = param_groups(self.student, t.lr, t.lr_multipliers, t.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.default_group = next((i for i, g in enumerate(groups) if g["name"] == "default"), 0)
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay)
        ds_config = build_deepspeed_config(t, self.world_size, t.use_gpu, load_universal=load_universal)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.student, optimizer=optimizer, config=ds_config)
        self.accum = ds_config["gradient_accumulation_steps"]
        self.trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        # What ZeRO-3 really holds on this rank vs the full model (rank 0's numbers go into state.json).
        params = list(self.engine.module.parameters())
        self.zero_partition = {"rank_numel": sum(p.ds_tensor.numel() for p in params),
                               "full_numel": sum(p.ds_numel for p in params), "world_size": self.world_size}

    def build_loader(self, data_state: Any):
        """This rank's slice of every planned global batch, continuing exactly from `data_state`."""
        from data_prep.reader import DatasetIndex
        from orchestration.loader import RankLoader

        t = self.cfg.train
        index = DatasetIndex.open(self.cfg.data.path)
        # The empty prompt replaces dropped captions (only needed when caption dropout is on): every named text tensor
        # of the cache, split as the loader splits a sample's (FLUX.2: text_embeds alone; a family cache:
        # encoder_hidden_states → negative_embeds, the rest by name).
        self.negative_embeds, self.negative_extras = None, {}
        if self.cfg.objective.caption_dropout > 0:
            from data_prep.reader import split_text

            text, extras = split_text(index.negative_text(), index.text_tensors)
            self.negative_embeds, self.negative_extras = text[None], {k: v[None] for k, v in extras.items()}
        self.text_projected = index.text_projected  # context_embedder's outputs: the models skip that layer
        return RankLoader(index, self.cfg.data, rank=self.rank, world_size=self.world_size, micro_batch=t.micro_batch,
                          grad_accum=self.accum, global_batch=t.global_batch, state=data_state,
                          pin_memory=t.use_gpu)

    # ------------------------------------------------------------------ restore

    def restore(self, restore: ckpt.Restored | None) -> tuple[int, Any]:
        """Engine (optimizer included), EMA and data state from the latest complete checkpoint; or a fresh EMA."""
        from asymflow.ema import EMA
        from orchestration.data_plan import DataState

        local = {name: self._local_fp32(p).clone() for name, p in self.trainable}
        self.ema = EMA(local, start_iter=self.cfg.ema.start_iter, gamma=self.cfg.ema.gamma)
        if restore is None:
            self.log_line(f"starting from the pretrained init (no checkpoint in {self.run_dir})")
            return 0, None
        saved_world = restore.state["world_size"]
        copy = self.local_copy(restore.path, every_rank=saved_world != self.world_size)
        local_dir = copy.path
        if saved_world == self.world_size:
            self.engine.load_checkpoint(local_dir, tag=ckpt.ENGINE_TAG, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            tag = self.maybe_convert_universal(local_dir, converter=copy.converts)
            self.engine.load_checkpoint(local_dir, tag=tag, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        ema_full = ckpt.load_tensors(f"{local_dir}/{ckpt.EMA}")
        self.ema.load_state_dict({name: _partition_of(ema_full[name], p, self.rank) for name, p in self.trainable})
        self.wandb_id = restore.state.get("wandb_run_id")
        self.counters.skipped_steps = int(restore.state.get("skipped_steps", 0))
        self.counters.preemptions = int(restore.state.get("preemptions", 0)) + int(bool(restore.state.get("preempted")))
        self.goodput = Goodput.from_state(restore.state)
        self.log_line(f"resumed from {restore.path} (step {restore.step}, saved by {saved_world} worker(s))")
        return restore.step, DataState.model_validate(restore.state["data"])

    def steps_lost_total(self, step: int) -> int:
        """Steps executed over the whole run that are not in the history up to restored `step` (see
        `orchestration.goodput`). Local storage: exact, from the appended key log. Object storage keeps one key
        object per step (a redone step overwrites it), so there only the last attempt's loss is known: the steps
        recorded beyond `step`, added to the restored total."""
        if not ckpt.is_local(self.run_dir):
            fs, keys_dir = ckpt._fs(f"{self.run_dir}/{KEYS_DIR}")
            names = fs.ls(keys_dir, detail=False) if fs.exists(keys_dir) else []
            steps = [int(n.rsplit("step-", 1)[1].split(".")[0]) for n in names
                     if n.rsplit("/", 1)[-1].startswith("step-")]
            return self.goodput.steps_lost + max(max(steps, default=-1) + 1 - step, 0)
        path = os.path.join(ckpt._fs(self.run_dir)[1], KEYS_LOG)
        if not os.path.exists(path):
            return self.goodput.steps_lost
        with open(path) as f:
            return max(executed_steps(f) - step, 0)

    def local_copy(self, checkpoint: str, every_rank: bool) -> NodeCopy:
        """A local directory holding what this rank reads of `checkpoint`: object storage is fetched once per node
        (`orchestration.node_restore`); `every_rank` for the universal conversion, which reads all ranks' files."""
        copy = node_checkpoint_copy(checkpoint, self.rank, self.node.node_id, self.node.label, every_rank,
                                    self.gather)
        for node, files, size in copy.downloads:
            self.log_line(f"restore copy on node {node}: downloaded {files} file(s), {size / 2**20:.1f} MiB")
        return copy

    def maybe_convert_universal(self, local_dir: str, converter: bool) -> str:
        """A ZeRO checkpoint refuses another world size: convert it once to DeepSpeed's universal format (one
        `converter` rank per copy, a subprocess of DeepSpeed's own converter), then every rank loads that. Shared
        local storage has one copy (rank 0 converts); with remote storage each node has its own downloaded copy,
        which the node's first rank converts."""
        tag = ckpt.UNIVERSAL
        target = os.path.join(local_dir, tag)
        if converter and not os.path.exists(os.path.join(target, "COMPLETE")):
            # Per-process staging, marked complete before the rename: the converters of several Ray nodes sharing
            # one /tmp (raylets on one host) may run at once; the first rename wins, no finished copy is deleted.
            staging = f"{target}.staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            engine_to_universal(os.path.join(local_dir, ckpt.ENGINE_TAG), staging)
            open(os.path.join(staging, "COMPLETE"), "w").close()
            if os.path.exists(target) and not os.path.exists(os.path.join(target, "COMPLETE")):
                shutil.rmtree(target, ignore_errors=True)  # an interrupted conversion of an earlier version
            try:
                os.rename(staging, target)
            except OSError:  # another converter's complete copy is already in place
                shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        return tag

    # ------------------------------------------------------------------ step

    def train_step(self, step: int) -> None:
        from asymflow.objective import asymflow_vr_step

        t = self.cfg.train
        t0 = time.perf_counter()
        micro_batches = next(self.loader)
        t_data = time.perf_counter() - t0
        factor = lr_factor(step, warmup_steps=t.warmup_steps, start_factor=t.warmup_start_factor, total_steps=t.steps,
                           schedule=t.lr_schedule, min_ratio=t.min_lr / t.lr)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        # ZeRO-3 clips inside its step with `clip_grad`; the spec turns clipping on only from a given step.
        self.optimizer.clip_grad = float(t.grad_clip) if t.grad_clip and step >= t.grad_clip_from_step else 0.0
        metrics_sum: dict[str, float] = {}
        keys: list[str] = []
        for micro, batch in enumerate(micro_batches):
            keys.extend(batch["keys"])
            # Pinned on GPU runs (the loader's pin_memory), so these copies overlap with the previous kernels.
            tensors = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if "text_extras" in batch:  # a family cache's other text tensors (FLUX.1 pooled_projections, ...)
                tensors["text_extras"] = {k: v.to(self.device, non_blocking=True) for k, v in batch["text_extras"].items()}
            if self.negative_embeds is not None:
                tensors["negative_embeds"] = self.negative_embeds.to(self.device)
                if self.negative_extras:
                    tensors["negative_extras"] = {k: v.to(self.device) for k, v in self.negative_extras.items()}
            generator = torch.Generator().manual_seed(derive_seed(t.seed, step, self.rank, micro))
            # bf16 autocast reaches the transformer blocks (and the perceptual network) only: the step's codec, twin,
            # calibration and recovery switch it off themselves (asymflow.precision, spec §3.4a).
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.use_gpu):
                loss, metrics = asymflow_vr_step(self.engine, self.teacher, tensors, generator, self.cfg.objective,
                                                 self.perceptual, text_projected=self.text_projected,
                                                 guidance=self.guidance)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / len(micro_batches)
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(grad_norm):
            self.counters.skipped_steps += 1  # ZeRO-3 already discarded this update
        else:
            self.ema.update(step, {name: self._local_fp32(p) for name, p in self.trainable})
        self.record_keys(step, keys)
        self.counters.data_wait_s += t_data
        self.counters.step_time_s += time.perf_counter() - t0
        self.goodput.add_step(time.perf_counter() - t0, t_data)
        self.counters.window_steps += 1
        self.last_metrics = {**metrics_sum, "grad_norm": grad_norm, "lr": self.base_lrs[self.default_group] * factor}

    def _local_fp32(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param)

    def record_keys(self, step: int, keys: list[str]) -> None:
        """Gather every rank's keys in rank order (= the global batch order) and append one line (rank 0)."""
        gathered: list[list[str]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, keys)
        if self.rank != 0:
            return
        record = json.dumps({"step": step, "keys": [k for part in gathered for k in part]})
        if ckpt.is_local(self.run_dir):
            with open(os.path.join(ckpt._fs(self.run_dir)[1], KEYS_LOG), "a") as f:
                f.write(record + "\n")
        else:  # a redone step overwrites its object, like "last record per step" in the local log
            ckpt.write_bytes(f"{self.run_dir}/{KEYS_DIR}/{ckpt.step_name(step)}.json", record.encode(), self.retry)

    # ------------------------------------------------------------------ checkpoint

    def save_checkpoint(self, step: int, preempted: bool = False, stopped: bool = False) -> None:
        """All ranks: engine files; rank 0: the consolidated EMA (safetensors) and state.json; then rank 0 commits
        (rename + COMPLETE last + keep-last-k) after a barrier. The trainable weights are stored once, as DeepSpeed's
        fp32 master partitions in the optimizer states (`artifacts.load_trainable_weights` consolidates them)."""
        t0 = time.perf_counter()
        if self.rank == 0:
            ckpt.begin_checkpoint(self.run_dir, step)
        self.barrier()
        staging = ckpt.staging_dir(self.run_dir, step)
        # Frozen weights are never written (DESIGN §2): the base is rebuilt from the pretrained files at every start,
        # and at 9B their partitions would be ~70 % of the checkpoint's bytes (and of any universal conversion).
        # save_latest: a `latest` file naming the tag, so DeepSpeed's own zero_to_fp32.py in the checkpoint works as
        # DeepSpeed documents it (our restore always names the tag).
        self.engine.save_checkpoint(ckpt.local_engine_dir(self.run_dir, step, self.rank), tag=ckpt.ENGINE_TAG,
                                    save_latest=True, exclude_frozen_parameters=True)
        ckpt.upload_engine_files(self.run_dir, step, self.rank, self.retry)  # object storage: each rank its own files
        ema_local = self.ema.shadow
        ema = {name: _gather_partition(ema_local[name], p) for name, p in self.trainable}
        if self.rank == 0:
            ckpt.save_tensors(f"{staging}/{ckpt.EMA}", {**ema, **self.buffers})
            ckpt.write_state(f"{staging}/{ckpt.STATE}", {**self.state_dict(step, preempted), "stopped": stopped})
        self.barrier()
        if self.rank == 0:
            ckpt.commit_checkpoint(self.run_dir, step, self.cfg.checkpoint.keep, self.retry)
            self.log_line(f"checkpoint step {step} committed in {time.perf_counter() - t0:.1f}s")
        self.barrier()
        self.goodput.add_checkpoint(time.perf_counter() - t0)

    def state_dict(self, step: int, preempted: bool) -> dict[str, Any]:
        return {
            "step": step,
            "data": self.loader.state().model_dump(mode="json"),
            "seeds": {"train": self.cfg.train.seed, "data": self.cfg.data.seed},
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.config_hash(),
            "world_size": self.world_size,
            "wandb_run_id": self.wandb_id,
            "skipped_steps": self.counters.skipped_steps,
            "preemptions": self.counters.preemptions,
            "steps_lost": self.goodput.steps_lost,
            "preempted": preempted,
            "goodput": self.goodput.state(),
            "zero_partition": self.zero_partition,
            "time": time.time(),
        }

    # ------------------------------------------------------------------ observe

    def maybe_start_wandb(self, interruptions: list[dict[str, Any]]) -> None:
        """wandb on rank 0 only; the run id lives in state.json (and, before the first checkpoint, in the ledger's
        `start` event) so every attempt continues the same wandb run. A resumed wandb run cannot log at an earlier
        step, so the run's interruption log goes into its summary; running totals `goodput/*` go with every step."""
        if self.rank != 0 or self.cfg.log.wandb_mode == "disabled":
            return
        import wandb

        wandb_dir = os.path.join(ckpt._fs(self.run_dir)[1], "wandb") if ckpt.is_local(self.run_dir) else None
        if wandb_dir:
            os.makedirs(wandb_dir, exist_ok=True)
        self.wandb_run = wandb.init(id=self.wandb_id, resume="allow", dir=wandb_dir, config=self.cfg.to_dict(),
                                    **self.cfg.log.wandb_init_kwargs(self.cfg.run.name))
        if interruptions:
            self.wandb_run.summary["interruption_log"] = [_brief(e) for e in interruptions]

    def maybe_log(self, step: int, total: int, force: bool = False) -> None:
        """Every `log.every` steps, the last step, and (`force`) the step a stop or preemption checkpoints at."""
        if step % self.cfg.log.every and step != total and not force:
            return
        c = self.counters
        step_time = c.step_time_s / max(c.window_steps, 1)
        metrics = {
            **self.last_metrics,
            "step_time_s": step_time,
            "samples_per_s": self.cfg.train.global_batch / step_time if step_time else 0.0,
            "data_wait_frac": c.data_wait_s / c.step_time_s if c.step_time_s else 0.0,
            "skipped_steps": c.skipped_steps,
            "preemptions": c.preemptions,
            "steps_lost": self.goodput.steps_lost,
            **self.goodput.metrics(step, self.cfg.train.global_batch),
        }
        c.data_wait_s = c.step_time_s = 0.0
        c.window_steps = 0
        if step == total or step % self.cfg.checkpoint.every == 0:
            # Ray Train drains each worker's one-slot result queue on a ~2 s poll and every report waits on all
            # ranks, so reporting every step would stretch short steps to 2 s; metrics.jsonl and wandb carry
            # every logged step, Ray only needs the occasional summary.
            import ray.train

            ray.train.report({k: float(v) for k, v in metrics.items()})
        if self.rank != 0:
            return
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
            self.last_step = step
            self.maybe_log_samples(step)
        done = step - self.step_start
        eta = (time.time() - self.t_start) / max(done, 1) * (total - step)
        record = {"step": step, "total_steps": total, "time": time.time(), "eta_s": eta,
                  **{k: float(v) for k, v in metrics.items()}}
        if ckpt.is_local(self.run_dir):
            with open(os.path.join(ckpt._fs(self.run_dir)[1], METRICS_LOG), "a") as f:
                f.write(json.dumps(record) + "\n")
        try:  # what `asymflow status` reads, on every storage kind
            write_progress(self.run_dir, {**record, "total": total})
        except Exception as exc:  # noqa: BLE001  (a status file must never stop training)
            self.log_line(f"could not write progress.json: {type(exc).__name__}")
        self.log_line(
            f"step {step}/{total} loss {metrics.get('loss', float('nan')):.4f} gn {metrics['grad_norm']:.3g} "
            f"lr {metrics['lr']:.3g} {metrics['samples_per_s']:.1f} samples/s data-wait "
            f"{100 * metrics['data_wait_frac']:.0f}% skipped {c.skipped_steps} eta {eta / 60:.1f} min"
        )

    @property
    def retry(self) -> ckpt.RetryPolicy:
        c = self.cfg.checkpoint
        return ckpt.RetryPolicy(attempts=c.upload_retries, backoff_s=c.upload_backoff_s)

    def account_attempt(self, restore: ckpt.Restored | None) -> list[dict[str, Any]]:
        """Rank 0: who this attempt is and what the interruption before it cost. Returns the run's interruption
        log (empty for a first attempt). Other ranks only keep the restored totals (rank 0 reports them).

        - A fresh run gets its wandb id and a `start` event in the ledger (so a restart before the first
          checkpoint keeps the id and the start time).
        - A restart from a checkpoint, or from scratch after steps were already executed (killed before the
          first checkpoint), appends an `interruption` event: steps lost, wall time lost, preempted or not."""
        now = time.time()
        if self.rank != 0:
            if restore is None:
                self.goodput.start(now)
            return []
        ledger = self.ledger_events()
        restored = restore.state if restore is not None else None
        lost_total = self.steps_lost_total(restore.step if restore is not None else 0)  # reads the key log once
        if restored is None:
            start = next((e for e in reversed(ledger) if e.get("kind") == "start"), None)
            if start is None or not lost_total:
                self.wandb_id = f"{self.cfg.run.name}-{derive_seed(int(now * 1e6)) % 10**8:08d}"
                self.goodput.start(now)
                self.append_to_ledger("start", wandb_run_id=self.wandb_id, run_start_time=now)
                return []
            self.wandb_id = start["wandb_run_id"]  # killed before its first checkpoint: same run, from step 0
            restored = {"step": 0, "time": start["run_start_time"], "preempted": False}
        earlier = [e for e in ledger if e.get("kind") == "interruption" and e.get("wandb_run_id") == self.wandb_id]
        event = self.goodput.resume(restored, now, lost_total, earlier)
        event.update(world_size=self.world_size, wandb_run_id=self.wandb_id)
        self.append_to_ledger("interruption", **event)
        self.log_line(f"interruption #{event['interruption']}: resumed at step {event['step']}, "
                      f"{event['steps_lost']} step(s) lost, {event['lost_s']:.1f}s of wall time")
        return [*earlier, event]

    def ledger_events(self) -> list[dict[str, Any]]:
        try:
            from orchestration.ledger import Ledger

            return Ledger.for_run(self.cfg.run.storage, self.cfg.run.name).read()
        except Exception as exc:  # noqa: BLE001  (unreadable ledger: the checkpoint's own totals still count)
            self.log_line(f"could not read the run ledger: {type(exc).__name__}")
            return []

    def append_to_ledger(self, kind: str, **fields: Any) -> None:
        try:
            from orchestration.ledger import Ledger

            Ledger.for_run(self.cfg.run.storage, self.cfg.run.name).append(kind, **fields)
        except Exception as exc:  # noqa: BLE001  (the ledger is a record; training goes on without it)
            self.log_line(f"could not append a {kind} event to the run ledger: {type(exc).__name__}")

    def log_summary(self, step: int) -> None:
        """The run's goodput, once at the end: log line and wandb summary (rank 0)."""
        if self.rank != 0:
            return
        g = self.goodput.metrics(step, self.cfg.train.global_batch)
        if self.wandb_run is not None:
            self.wandb_run.summary.update({**g, "steps_lost": self.goodput.steps_lost})
        self.log_line(
            f"goodput: {g['goodput/effective_samples_per_s']:.2f} samples/s over {g['goodput/wall_s']:.0f}s, "
            f"{g['goodput/restart_lost_s']:.1f}s lost to {self.goodput.interruptions} restart(s) "
            f"({self.goodput.steps_lost} step(s) redone), {g['goodput/checkpoint_stall_s']:.1f}s in checkpoints, "
            f"data wait {100 * g['goodput/data_wait_frac']:.1f}%"
        )

    def log_line(self, text: str) -> None:
        """One line on rank 0's process stdout, which Ray streams to the driver. Not `print`: Ray Train patches it
        to log through its logger and, once wandb wraps sys.stdout, also to the wrapped stream — every line twice."""
        if self.rank == 0:
            sys.__stdout__.write(f"[asymflow] {text}\n")
            sys.__stdout__.flush()

    def maybe_export(self, step: int) -> None:
        """The adapter directory from the EMA weights of the final checkpoint (rank 0)."""
        if self.rank == 0 and ckpt.is_local(self.run_dir):
            from orchestration.artifacts import export_checkpoint

            out = export_checkpoint(self.run_dir, step=step)
            self.log_line(f"exported EMA adapter to {out}")
        self.barrier()

    def maybe_sample(self, step: int) -> None:
        """Every `sample.every` steps (always a checkpoint step), rank 0 starts a Ray task that renders EMA samples
        from the committed checkpoint into RUN_DIR/samples/step-N; training does not wait for it."""
        every = self.cfg.sample.every
        if not every or step % every or self.rank != 0 or not ckpt.is_local(self.run_dir):
            return
        import ray

        from orchestration.artifacts import render_samples

        out = os.path.join(ckpt._fs(self.run_dir)[1], "samples", ckpt.step_name(step))
        path = ckpt.checkpoint_dir(self.run_dir, step)
        # read now, pass by value: keep-last-k may delete this checkpoint before the task starts
        state, ema = ckpt.read_state(path), ckpt.load_tensors(f"{path}/{ckpt.EMA}")
        task = ray.remote(num_cpus=0, num_gpus=self.cfg.sample.num_gpus)(render_samples)
        self.sample_tasks.append((step, task.remote(state, ema, out)))

    def maybe_log_samples(self, step: int, wait: bool = False) -> None:
        """Rank 0: the EMA sample grids whose render tasks finished go to wandb as images, logged at `step` (wandb
        steps only move forward), captioned with the checkpoint step they show. `wait`: all of them (the end)."""
        if not self.sample_tasks:
            return
        import ray

        refs = [ref for _, ref in self.sample_tasks]
        ready, _ = ray.wait(refs, num_returns=len(refs) if wait else 1, timeout=None if wait else 0)
        done = [(s, ref) for s, ref in self.sample_tasks if ref in ready]
        self.sample_tasks = [(s, ref) for s, ref in self.sample_tasks if ref not in ready]
        for sample_step, ref in done:
            paths = ray.get(ref)
            if self.wandb_run is not None and paths:
                import wandb

                prompts = list(self.cfg.sample.prompts)
                self.wandb_run.log({"samples/ema": [
                    wandb.Image(p, caption=f"EMA, step {sample_step}: {prompts[i % len(prompts)]}")
                    for i, p in enumerate(paths)]}, step=step)

    def finish(self) -> None:
        self.maybe_log_samples(self.last_step, wait=True)  # the run's last samples exist when `fit()` returns
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` in rank order (all_gather_object; a collective)."""
        if not dist.is_initialized():
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def _brief(event: dict[str, Any]) -> dict[str, Any]:
    """An interruption as the wandb summary lists it."""
    return {k: event[k] for k in ("interruption", "step", "steps_lost", "preempted", "lost_s") if k in event}
