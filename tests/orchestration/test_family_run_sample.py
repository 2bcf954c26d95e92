"""`asymflow sample RUN_DIR` of a FLUX.1 run (checkpoint written by the checkpoint module, as
tests/orchestration/run_factory.make_run does for FLUX.2) equals the family pipeline built from the checkpoint's EMA
model and the run's model.path text encoders, and its export (export_family_adapter) samples alike."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orchestration import checkpoint as ckpt
from orchestration.cli import main
from tests.asymflow.family_pipelines import save_tiny_base

REPO = Path(__file__).resolve().parents[2]


def test_flux1_run_dir_samples(tmp_path):
    from asymflow.families.load import load_pipeline_components, text_component_names
    from asymflow.families.pipeline import AsymFlowFamilyPipeline
    from asymflow.subspace import SubspaceArtifact
    from asymflow.trainable import trainable_state_dict
    from orchestration.artifacts import build_model_from_checkpoint, build_model_from_state
    from orchestration.config import load_config

    base = save_tiny_base("flux1", tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(768, 64, generator=gen, dtype=torch.float64))[0].float().contiguous()
    SubspaceArtifact(basis, 0.8, patch_size=16).save(data / "subspace.safetensors")
    cfg = load_config(str(REPO / "configs" / "tiny-flux1.yaml"), [f"data.path={data}", f"run.storage={tmp_path}",
                                                                  "run.name=run", f"model.path={base}"])
    state = {"step": 4, "config": cfg.to_dict()}
    model, _ = build_model_from_state(state, {})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tensors = trainable_state_dict(model)
    staging = ckpt.begin_checkpoint(cfg.run_dir, 4)
    ckpt.save_tensors(f"{staging}/{ckpt.EMA}", tensors)
    ckpt.save_tensors(f"{staging}/{ckpt.TRAINABLE}", tensors)
    ckpt.write_state(f"{staging}/{ckpt.STATE}", state)
    ckpt.commit_checkpoint(cfg.run_dir, 4, keep=2)

    out = tmp_path / "png"
    assert main(["sample", cfg.run_dir, "--prompt", "a red cat", "--out", str(out), "--device", "cpu"]) == 0
    (png,) = sorted(out.glob("*.png"))
    ema_model, _, _ = build_model_from_checkpoint(f"{cfg.run_dir}/checkpoints/step-00000004", "ema")
    pipe = AsymFlowFamilyPipeline(ema_model.eval(), **load_pipeline_components(base, text_component_names("flux1")))
    want = pipe("a red cat", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]
    with Image.open(png) as im:
        got = np.asarray(im.convert("RGB"))
        meta = im.text["asymflow"]
    assert '"family": "flux1"' in meta
    assert np.array_equal(got, (want * 255).round().astype("uint8"))
    assert main(["export", cfg.run_dir]) == 0
    export = Path(cfg.run_dir) / "export" / "step-00000004"
    out2 = tmp_path / "png2"
    assert main(["sample", str(export), "--prompt", "a red cat", "--height", "32", "--width", "32", "--steps", "2",
                 "--out", str(out2), "--device", "cpu"]) == 0  # base recorded in the export's asymflow_base.json
    (png2,) = sorted(out2.glob("*.png"))
    with Image.open(png2) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), got)

    # `export --merged --pipeline`: a whole AsymFlowFamilyPipeline directory (merged transformer + the base's text
    # parts) that diffusers' own DiffusionPipeline.from_pretrained loads, and `asymflow sample` samples alike.
    from diffusers import DiffusionPipeline

    assert main(["export", cfg.run_dir, "--merged", "--pipeline"]) == 0
    saved = Path(cfg.run_dir) / "export" / "step-00000004-pipeline"
    loaded = DiffusionPipeline.from_pretrained(str(saved), trust_remote_code=True)
    assert type(loaded).__name__ == "AsymFlowFamilyPipeline" and loaded.transformer.family().name == "flux1"
    out3 = tmp_path / "png3"
    assert main(["sample", str(saved), "--prompt", "a red cat", "--height", "32", "--width", "32", "--steps", "2",
                 "--out", str(out3), "--device", "cpu"]) == 0
    (png3,) = sorted(out3.glob("*.png"))
    with Image.open(png3) as im:  # the LoRA fused into the weights: equal to 8-bit rounding of fp32 reassociation
        assert np.abs(np.asarray(im.convert("RGB")).astype(int) - got.astype(int)).max() <= 1
