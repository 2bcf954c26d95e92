"""A run directory with one committed checkpoint, written by the checkpoint module itself (no Ray, no DeepSpeed): the
tiny model converted with a random subspace, LoRA attached, trained tensors moved so the fine-tune is visible."""
from __future__ import annotations

from pathlib import Path

import torch

from orchestration import checkpoint as ckpt

SCALE = 1.3


def make_run(root: Path, step: int = 6, model_kind: str = "tiny", loss: float = 0.125) -> tuple[str, dict]:
    """(run_dir, the EMA tensors) under `root`: data/subspace.safetensors, run/checkpoints/step-N, run/metrics.jsonl."""
    from asymflow.subspace import SubspaceArtifact
    from asymflow.trainable import trainable_state_dict
    from orchestration.artifacts import build_model_from_state
    from orchestration.config import load_config

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(768, 128, generator=gen, dtype=torch.float64))[0].float().contiguous()
    SubspaceArtifact(basis, SCALE, patch_size=16).save(data / "subspace.safetensors")
    overrides = [f"data.path={data}", f"run.storage={root}", "run.name=run", f"model.kind={model_kind}"]
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"), overrides)
    state = {"step": step, "config": cfg.to_dict()}
    model, _ = build_model_from_state(state, {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tensors = trainable_state_dict(model)
    run_dir = cfg.run_dir
    staging = ckpt.begin_checkpoint(run_dir, step)
    ckpt.save_tensors(f"{staging}/{ckpt.EMA}", tensors)
    ckpt.save_tensors(f"{staging}/{ckpt.TRAINABLE}", tensors)
    ckpt.write_state(f"{staging}/{ckpt.STATE}", state)
    ckpt.commit_checkpoint(run_dir, step, keep=2)
    (Path(run_dir) / "metrics.jsonl").write_text(f'{{"step": {step}, "loss": {loss}}}\n')
    return run_dir, tensors


def add_card_sources(run_dir: str, data_dir: str, samples: int, psnr: float) -> None:
    """What a model card reads besides the checkpoint: the dataset manifest (one 32×32 bucket of `samples`) and
    `orchestration.compare`'s metrics.json for the latest step (only the fields the card uses)."""
    import json

    from data_prep.format import FORMAT_VERSION

    manifest = {"version": FORMAT_VERSION, "num_samples": samples, "builder": {}, "totals": {},
                "shards": [{"name": "shard-000000.tar", "num_samples": samples, "bytes": 0, "sha256": "0" * 64}],
                "buckets": {"32x32": samples}}
    Path(data_dir, "index.json").write_text(json.dumps(manifest))
    step = ckpt.complete_steps(run_dir)[-1]
    compare = Path(run_dir) / "compare" / ckpt.step_name(step)
    compare.mkdir(parents=True)
    metrics = {"psnr": {"pixel_finetuned": {"mean": psnr}}, "ssim": {"pixel_finetuned": {"mean": 0.5}}}
    (compare / "metrics.json").write_text(json.dumps(metrics))
