"""What is made from a committed checkpoint: the rebuilt pixel model, the exported adapter, and sample images."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from asymflow.components import TRAINING_FAMILY
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
    model, cfg = build_model_from_state(state, load_weights(path, weights))
    return model, cfg, state


def load_weights(path: str, weights: Weights = "ema") -> dict[str, torch.Tensor]:
    """A committed checkpoint's consolidated fp32 tensors (trainable parameters + buffers): the EMA from its
    safetensors file, or the raw trainable weights from DeepSpeed's own files (`load_trainable_weights`)."""
    if weights == "trainable":
        return load_trainable_weights(path)
    file = f"{path}/{ckpt.EMA}"
    try:
        return ckpt.load_tensors(file)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{file} does not exist") from exc
    except Exception as exc:  # safetensors' own SafetensorError for a truncated or damaged file
        raise ValueError(f"{file} is not a readable safetensors file ({exc})") from exc


def load_trainable_weights(path: str) -> dict[str, torch.Tensor]:
    """The trainable weights (fp32) and buffers of a checkpoint, consolidated by DeepSpeed's zero_to_fp32 from the
    fp32 master partitions in its optimizer-state files (checkpoints store them once: a consolidated copy would add
    4 bytes per trainable parameter to the 16 of weights, Adam state and EMA). The files hold no frozen parameter,
    so this reads only the trainable state. Checkpoints written before that carry `trainable.safetensors`, which is
    read instead. Remote checkpoints: the engine files are fetched into this machine's restore cache.

    DeepSpeed unpickles its files (`torch.load(weights_only=False)`, as its own resume does): load trainable weights
    only from checkpoints you trust; the EMA (the default everywhere) is plain safetensors."""
    import contextlib
    import io

    legacy = f"{path}/{ckpt.TRAINABLE}"
    fs, legacy_path = ckpt._fs(legacy)
    if fs.exists(legacy_path):
        return ckpt.load_tensors(legacy)
    local = ckpt.local_engine_copy(path)
    engine = f"{local}/{ckpt.ENGINE_TAG}"
    noise = io.StringIO()  # DeepSpeed's accelerator guess at import, its prints and progress bars: not for the CLI
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(local, tag=ckpt.ENGINE_TAG, exclude_frozen_parameters=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{engine} does not exist (no DeepSpeed engine files to read trainable weights from; "
                                "the EMA weights need only ema.safetensors)") from exc
    except Exception as exc:  # noqa: BLE001  (damaged or foreign files: DeepSpeed raises several classes)
        raise ValueError(f"{engine} holds no readable DeepSpeed ZeRO checkpoint ({type(exc).__name__}: {exc})") from exc


def build_model_from_state(state: dict, tensors: dict[str, torch.Tensor]):
    """(pixel model, RunConfig). The structure is rebuilt from the checkpoint's own resolved config:
    base transformer + subspace → convert → trainable set; then the given tensors are loaded. Any training family:
    the family's pixel model (orchestration.model_build.convert_base)."""
    from asymflow.subspace import SubspaceArtifact
    from asymflow.trainable import apply_trainable
    from orchestration.model_build import convert_base

    cfg = RunConfig.model_validate(state["config"])
    artifact = SubspaceArtifact.load(local_file(cfg.subspace_path), patch_size=cfg.objective.patch_size, rank=cfg.subspace.rank)
    model = convert_base(cfg, artifact.basis, artifact.scale)
    with torch.random.fork_rng(devices=[]):
        apply_trainable(model, cfg.trainable.mode, cfg.trainable.lora, cfg.trainable.full_modules)
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise ValueError(f"checkpoint tensors do not fit the rebuilt model: {sorted(missing)[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model.eval(), cfg


def base_model_name(model_cfg) -> str:
    """How an export names its latent base (peft's base_model_name_or_path, the card's base_model)."""
    if model_cfg.kind == "diffusers":
        return str(model_cfg.path)
    if model_cfg.kind == "bundled":
        return str(model_cfg.path or "asymflow/assets/tiny_base")
    return f"asymflow.tiny (in-code, seed {model_cfg.seed})"


def base_record(cfg: RunConfig) -> dict:
    """asymflow_base.json: the base (which also rebuilds the text encoder) and the run's sampling settings."""
    s = cfg.sample
    return {"model": cfg.model.model_dump(mode="json"),
            "sample": {"height": s.height, "width": s.width, "steps": s.steps, "guidance": s.guidance}}


def card_facts(run_dir: str, cfg: RunConfig, state: dict, kind: str = "adapter"):
    """The model card's facts from the run: step, dataset size, subspace, last logged loss, compare metrics."""
    import json

    from asymflow.model_card import CardFacts
    from asymflow.subspace import SubspaceArtifact

    step = int(state["step"])
    samples = None
    try:
        from data_prep.format import load_manifest

        samples = int(load_manifest(str(cfg.data.path))["num_samples"])
    except Exception:  # the dataset may live elsewhere now; the card then says "unknown"
        pass
    rank = scale = None
    try:
        artifact = SubspaceArtifact.load(local_file(cfg.subspace_path), patch_size=cfg.objective.patch_size)
        rank, scale = int(artifact.basis.shape[1]), float(artifact.scale)
    except Exception:
        pass
    final_loss = None
    try:
        lines = ckpt.read_bytes(f"{run_dir.rstrip('/')}/metrics.jsonl").decode().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        losses = [r["loss"] for r in records if "loss" in r and r.get("step", 0) <= step]
        final_loss = float(losses[-1]) if losses else None
    except Exception:
        pass
    evaluation = {}
    try:
        metrics = json.loads(ckpt.read_bytes(f"{run_dir.rstrip('/')}/compare/{ckpt.step_name(step)}/metrics.json"))
        for name, value in metrics.get("psnr", {}).items():
            evaluation[f"PSNR vs photos, {name} (dB)"] = f"{value['mean']:.2f}"
        for name, value in metrics.get("ssim", {}).items():
            evaluation[f"SSIM vs photos, {name}"] = f"{value['mean']:.3f}"
    except Exception:
        pass
    lora = None
    if cfg.trainable.mode == "lora":
        lora = {"rank": cfg.trainable.lora.rank, "alpha": cfg.trainable.lora.alpha}
    return CardFacts(kind=kind, base_model=base_model_name(cfg.model), step=step, samples=samples,
                     dataset=str(cfg.data.path), rank=rank, scale=scale, final_loss=final_loss, lora=lora,
                     trainable_mode=cfg.trainable.mode, eval=evaluation)


def export_checkpoint(run_dir: str, step: int | None = None, out: str | None = None, weights: Weights = "ema",
                      merged: bool = False, pipeline: bool = False) -> Path:
    """The adapter directory (spec §12) of a checkpoint, EMA weights by default: RUN_DIR/export/step-N, with peft and
    diffusers LoRA files, the base record and a model card. `merged=True`: a complete diffusers model directory with
    the LoRA fused in (RUN_DIR/export/step-N-merged), loadable by `from_pretrained` alone; with `pipeline=True` a
    whole pipeline directory instead (RUN_DIR/export/step-N-pipeline: transformer/, scheduler/, text_encoder/,
    tokenizer/). Every output is staged and renamed last."""
    import dataclasses

    import json

    from asymflow.export import BASE_NAME, export_adapter, merge_lora, save_merged, write_staged
    from asymflow.model_card import render_model_card

    if pipeline and not merged:
        raise ValueError("a pipeline export holds the merged transformer: pass merged=True (--merged)")
    path = resolve_checkpoint(run_dir, step)
    family = RunConfig.model_validate(ckpt.read_state(path)["config"]).family()
    model, cfg, state = build_model_from_checkpoint(path, weights)
    name = ckpt.step_name(int(state["step"]))
    suffix = "-pipeline" if pipeline else "-merged" if merged else ""
    target = out or f"{run_dir.rstrip('/')}/export/{name}{suffix}"
    facts = card_facts(run_dir, cfg, state)
    base = base_model_name(cfg.model)
    if not merged:
        from asymflow.families.adapter import export_family_adapter

        # another family's fully trained modules and tensors (pos_embed.proj, ...): asymflow.families.adapter
        write_adapter = export_adapter if family == TRAINING_FAMILY else export_family_adapter
        return write_adapter(model, target, state_dict=model.state_dict(), base_model=base,
                             base_info=base_record(cfg), card=render_model_card(facts))
    merge_lora(model)
    card = render_model_card(dataclasses.replace(facts, kind="merged"))
    if not pipeline:
        return save_merged(model, target, card=card, base_info=base_record(cfg))
    pipe = _flux2_pipeline(model, cfg) if family == TRAINING_FAMILY else _family_pipeline(model, cfg)

    def write(staging: Path) -> None:
        pipe.save_pretrained(staging)
        (staging / "README.md").write_text(card)
        (staging / BASE_NAME).write_text(json.dumps(base_record(cfg), indent=2) + "\n")  # sampling defaults

    return write_staged(target, write)


def _flux2_pipeline(model, cfg: RunConfig):
    from asymflow.components import load_base_components
    from asymflow.pipeline import AsymFlux2KleinPipeline
    from asymflow.scheduler import released_pipeline_scheduler

    parts = load_base_components(cfg.model, ("text_encoder", "tokenizer"))
    return AsymFlux2KleinPipeline(model, released_pipeline_scheduler(), parts.text_encoder, parts.tokenizer,
                                  text_hidden_layers=cfg.model.text_hidden_layers,
                                  max_sequence_length=cfg.model.max_sequence_length)


def _family_pipeline(model, cfg: RunConfig):
    """Another family: AsymFlowFamilyPipeline with the base pipeline directory's own tokenizers and text encoders."""
    from asymflow.families.pipeline import AsymFlowFamilyPipeline

    return AsymFlowFamilyPipeline.with_base_text(model, cfg.model.path)


def render_samples(state: dict, ema: dict[str, torch.Tensor], out_dir: str) -> list[str]:
    """PNG samples of `sample.prompts` from a checkpoint's consolidated EMA weights (run as a separate Ray task, so
    the ZeRO-3 workers never gather for it and cannot deadlock). The caller passes the checkpoint's state and EMA
    tensors by value: keep-last-k may delete the checkpoint directory before the task runs."""
    from PIL import Image

    model, cfg = build_model_from_state(state, ema)
    if cfg.family() == TRAINING_FAMILY:
        images = _flux2_samples(model, cfg)
    else:
        images = _family_samples(model, cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images):
        pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        target = str(Path(out_dir) / f"{i:02d}.png")
        Image.fromarray(pixels).save(target)
        written.append(target)
    return written


def _flux2_samples(model, cfg: RunConfig) -> torch.Tensor:
    """FLUX.2: asymflow.pipeline's sampler, true CFG at sample.guidance with the empty prompt."""
    from asymflow.components import load_base_components
    from asymflow.pipeline import sample_images
    from asymflow.text import encode_prompts

    s, m = cfg.sample, cfg.model
    parts = load_base_components(m, ("text_encoder", "tokenizer"))
    with torch.no_grad():
        cond = encode_prompts(parts.text_encoder, parts.tokenizer, list(s.prompts), m.text_hidden_layers,
                              m.max_sequence_length)
        neg = encode_prompts(parts.text_encoder, parts.tokenizer, [""], m.text_hidden_layers, m.max_sequence_length)
        return sample_images(model, cond, neg, height=s.height, width=s.width, num_inference_steps=s.steps,
                             guidance_scale=s.guidance, generator=torch.Generator().manual_seed(cfg.train.seed))


def _family_samples(model, cfg: RunConfig) -> torch.Tensor:
    """Another family: its pipeline's text encoders on sample.prompts (and the empty prompt) as its pipeline encodes
    them, then families.sampling with the family's sampler defaults and CFG convention; sample.steps steps. The
    family's own CFG scale is used, not sample.guidance (FLUX.2's true CFG scale: FLUX.1-dev is guidance-distilled
    and samples without true CFG), and a guidance-distilled model gets the guidance value it was trained with."""
    from asymflow.families import encode_family_prompts
    from asymflow.families.load import load_pipeline_components, text_component_names
    from asymflow.families.sampling import sample_family
    from data_prep.reader import split_text
    from orchestration.model_build import training_guidance

    s, family = cfg.sample, cfg.family()
    parts = load_pipeline_components(cfg.model.path, text_component_names(family))
    with torch.no_grad():
        cond = encode_family_prompts(family, parts, list(s.prompts))
        neg = encode_family_prompts(family, parts, [""] * len(s.prompts), negative=True)
        text, extras = split_text(cond, tuple(cond))
        neg_text, neg_extras = split_text(neg, tuple(neg))
        return sample_family(model, text, extras, neg_text, neg_extras, height=s.height, width=s.width,
                             num_inference_steps=s.steps, embedded_guidance=training_guidance(cfg, model),
                             seed=cfg.train.seed)
