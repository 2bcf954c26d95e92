"""What is made from a committed checkpoint: the rebuilt pixel model, the exported adapter, and sample images."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from orchestration import checkpoint as ckpt
from orchestration.config import RunConfig, local_file

Weights = Literal["ema", "trainable"]


def resolve_checkpoint(run_dir: str, step: int | None = None) -> str:
    """The checkpoint directory of `step`, or the latest complete one; only complete checkpoints are returned."""
    steps = ckpt.complete_steps(run_dir)
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint{'' if step is None else f' at step {step}'}"
                                f" (complete: {steps})")
    return ckpt.checkpoint_dir(run_dir, steps[-1] if step is None else step)


def build_model_from_checkpoint(path: str, weights: Weights = "ema"):
    """(pixel model with the checkpoint's EMA or trainable tensors loaded, its RunConfig, its state)."""
    state = ckpt.read_state(path)
    tensors = ckpt.load_tensors(f"{path}/{ckpt.EMA if weights == 'ema' else ckpt.TRAINABLE}")
    model, cfg = build_model_from_state(state, tensors)
    return model, cfg, state


def build_model_from_state(state: dict, tensors: dict[str, torch.Tensor]):
    """(pixel model, RunConfig). The structure is rebuilt from the checkpoint's own resolved config:
    base transformer + subspace → convert → trainable set; then the given tensors are loaded."""
    from asymflow.components import load_base_components
    from asymflow.convert import convert_transformer
    from asymflow.subspace import SubspaceArtifact
    from asymflow.trainable import apply_trainable

    cfg = RunConfig.model_validate(state["config"])
    artifact = SubspaceArtifact.load(local_file(cfg.subspace_path), patch_size=cfg.objective.patch_size, rank=cfg.subspace.rank)
    latent = load_base_components(cfg.model, ("transformer",)).transformer
    model = convert_transformer(latent, artifact.basis, artifact.scale)
    with torch.random.fork_rng(devices=[]):
        apply_trainable(model, cfg.trainable.mode, cfg.trainable.lora, cfg.trainable.full_modules)
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise ValueError(f"checkpoint tensors do not fit the rebuilt model: {sorted(missing)[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model.eval(), cfg


def export_checkpoint(run_dir: str, step: int | None = None, out: str | None = None, weights: Weights = "ema") -> Path:
    """The adapter directory (spec §12) of a checkpoint, EMA weights by default: RUN_DIR/export/step-N."""
    from asymflow.export import export_adapter

    path = resolve_checkpoint(run_dir, step)
    model, _, state = build_model_from_checkpoint(path, weights)
    target = out or f"{run_dir.rstrip('/')}/export/{ckpt.step_name(int(state['step']))}"
    return export_adapter(model, target, state_dict=model.state_dict())


def render_samples(state: dict, ema: dict[str, torch.Tensor], out_dir: str) -> list[str]:
    """PNG samples of `sample.prompts` from a checkpoint's consolidated EMA weights (run as a separate Ray task, so
    the ZeRO-3 workers never gather for it and cannot deadlock). The caller passes the checkpoint's state and EMA
    tensors by value: keep-last-k may delete the checkpoint directory before the task runs."""
    from PIL import Image

    from asymflow.components import load_base_components
    from asymflow.pipeline import sample_images
    from asymflow.text import encode_prompts

    model, cfg = build_model_from_state(state, ema)
    s, m = cfg.sample, cfg.model
    parts = load_base_components(m, ("text_encoder", "tokenizer"))
    with torch.no_grad():
        cond = encode_prompts(parts.text_encoder, parts.tokenizer, list(s.prompts), m.text_hidden_layers,
                              m.max_sequence_length)
        neg = encode_prompts(parts.text_encoder, parts.tokenizer, [""], m.text_hidden_layers, m.max_sequence_length)
        images = sample_images(model, cond, neg, height=s.height, width=s.width, num_inference_steps=s.steps,
                               guidance_scale=s.guidance, generator=torch.Generator().manual_seed(cfg.train.seed))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images):
        pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        target = str(Path(out_dir) / f"{i:02d}.png")
        Image.fromarray(pixels).save(target)
        written.append(target)
    return written
