"""Our export loaded by the libraries themselves: peft's PeftModel.from_pretrained, diffusers' load_lora_adapter and the
pipeline's load_lora_weights give our loader's outputs exactly; the official layout (no adapter_config.json) loads;
the model card's front matter; bad input fails with one message and leaves nothing half-written."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from asymflow.convert import convert_transformer
from asymflow.export import (
    DIFFUSERS_LORA_NAME,
    FULL_TENSORS,
    PEFT_WEIGHTS_NAME,
    WEIGHTS_NAME,
    export_adapter,
    export_merged,
    load_adapter,
    load_pixel_base,
)
from asymflow.model import AsymFlux2Transformer2DModel
from asymflow.model_card import CardFacts, parse_front_matter, render_model_card
from asymflow.pipeline import AsymFlux2KleinPipeline
from asymflow.scheduler import FlowAdapterScheduler
from asymflow.tiny import build_tiny_transformer
from asymflow.trainable import LoRASettings, apply_trainable
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)
from tests.asymflow.test_export import inputs

LORA = LoRASettings(rank=4, alpha=8.0)  # scale α/r = 2: a loader that assumed alpha = rank would be off


@pytest.fixture(scope="module")
def latent():
    return build_tiny_transformer()


@pytest.fixture(scope="module")
def trained(latent) -> AsymFlux2Transformer2DModel:
    model = apply_trainable(convert_transformer(latent, random_basis(dtype=torch.float32), 0.7), "lora", LORA)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("export") / "adapter"
    export_adapter(trained, out, base_model="black-forest-labs/FLUX.2-klein-base-9B")
    return out


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs())


def test_peft_loads_the_export(exported, latent) -> None:
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "black-forest-labs/FLUX.2-klein-base-9B"
    assert config["modules_to_save"] == ["x_embedder", "proj_out", "norm_out"]
    reference = outputs(load_adapter(exported, latent))
    # The converted init with the export's B and s: x_embedder/proj_out/norm_out come from peft's modules_to_save.
    base = load_pixel_base(exported, latent, trained_modules=False)
    assert not torch.equal(base.x_embedder.weight, load_pixel_base(exported, latent).x_embedder.weight)
    model = PeftModel.from_pretrained(base, exported).eval()
    assert torch.equal(outputs(model), reference)  # max |diff| = 0


def test_diffusers_loads_the_export(exported, latent) -> None:
    reference = outputs(load_adapter(exported, latent))
    base = load_pixel_base(exported, latent)  # trained full modules included: diffusers loads only LoRA
    base.load_lora_adapter(exported, weight_name=DIFFUSERS_LORA_NAME, adapter_name="default")
    assert base.peft_config["default"].r == 4 and base.peft_config["default"].lora_alpha == 8.0
    assert torch.equal(outputs(base.eval()), reference)  # eval(): peft's new LoRA layers start in training mode

    pipe = AsymFlux2KleinPipeline(load_pixel_base(exported, latent), FlowAdapterScheduler())
    pipe.load_lora_weights(exported)  # Flux2KleinPipeline-style: finds pytorch_lora_weights.safetensors itself
    assert torch.equal(outputs(pipe.transformer.eval()), reference)


def test_the_three_lora_files_hold_the_same_tensors(exported) -> None:
    ours = load_file(exported / WEIGHTS_NAME)
    peft = load_file(exported / PEFT_WEIGHTS_NAME)
    diffusers = load_file(exported / DIFFUSERS_LORA_NAME)
    lora = {k: v for k, v in ours.items() if ".lora_" in k}
    assert {k.removeprefix("base_model.model."): v for k, v in peft.items()}.keys() == {*lora, *FULL_TENSORS}
    assert all(torch.equal(peft[f"base_model.model.{k}"], v) for k, v in lora.items())
    assert {k.removeprefix("transformer."): v for k, v in diffusers.items()}.keys() == lora.keys()
    assert all(torch.equal(diffusers[f"transformer.{k}"], v) for k, v in lora.items())


def test_official_layout_without_adapter_config(tmp_path, latent) -> None:
    """The reference code's export: config.json + diffusion_pytorch_model.safetensors (bf16, as the reference
    stores it) with x_embedder/proj_out/norm_out, proj_buffer, scale_buffer and <module>.lora_A/B.weight, nothing
    else; alpha = rank (scale 1)."""
    model = apply_trainable(convert_transformer(latent, random_basis(dtype=torch.float32), 1.9),
                            "lora", LoRASettings(rank=3, alpha=3.0))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
                p.copy_(p.bfloat16())  # bf16-exact values, so the bf16 file holds exactly this model
        model.proj_buffer.copy_(model.proj_buffer.bfloat16())
        model.scale_buffer.copy_(model.scale_buffer.bfloat16())  # s = 1.9 is 1.8984375 in bf16
    model.eval()
    sd = model.state_dict()
    tensors = {name: sd[name].bfloat16().contiguous() for name in (*FULL_TENSORS, "proj_buffer", "scale_buffer")}
    for name, t in sd.items():
        if ".lora_A.default." in name or ".lora_B.default." in name:
            tensors[name.replace(".default.", ".")] = t.bfloat16().contiguous()
    out = tmp_path / "official"
    out.mkdir()
    model.save_config(out)
    save_file(tensors, out / WEIGHTS_NAME)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME]

    loaded = load_adapter(out, latent)
    config = loaded.peft_config["default"]
    assert (config.r, config.lora_alpha) == (3, 3)  # rank from lora_A [r, in]; alpha = rank
    lora_modules = {n.removesuffix(".lora_A.default") for n, _ in loaded.named_modules() if n.endswith(".lora_A.default")}
    assert lora_modules == {n.removesuffix(".lora_A.weight") for n in tensors if n.endswith(".lora_A.weight")}
    assert torch.equal(outputs(loaded), outputs(model))


def test_model_card_front_matter(exported) -> None:
    facts = CardFacts(kind="adapter", base_model="black-forest-labs/FLUX.2-klein-base-9B", step=400, samples=20,
                      rank=128, scale=2.2, final_loss=0.0123, lora={"rank": 64, "alpha": 64.0},
                      trainable_mode="lora", eval={"PSNR (dB)": "20.39"})
    card = render_model_card(facts)
    front = parse_front_matter(card)
    assert front["base_model"] == "black-forest-labs/FLUX.2-klein-base-9B"
    assert front["library_name"] == "diffusers" and "lora" in front["tags"] and "asymflow" in front["tags"]
    assert "license" in front and front["license"] is None  # present, left for the user
    for fact in ("| optimizer steps | 400 |", "| training images | 20 |", "| subspace rank r | 128 |",
                 "| data scale s | 2.2 |", "| final loss | 0.0123 |", "| PSNR (dB) | 20.39 |"):
        assert fact in card


def test_merged_directory_loads_alone(tmp_path, exported, latent) -> None:
    export_merged(exported, latent, tmp_path / "merged")
    model = AsymFlux2Transformer2DModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(outputs(model), outputs(load_adapter(exported, latent)), rtol=1e-4, atol=1e-5)


def test_bad_input_fails_cleanly(tmp_path, exported, latent) -> None:
    with pytest.raises(ValueError, match="holds only part of an AsymFlux2Transformer2DModel"):
        AsymFlux2Transformer2DModel.from_pretrained(exported)
    with pytest.raises(ValueError, match="num_layers: adapter 2 vs base 1"):
        load_adapter(exported, build_tiny_transformer(num_layers=1))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((exported / "config.json").read_text())
    (broken / WEIGHTS_NAME).write_bytes((exported / WEIGHTS_NAME).read_bytes()[:1000])  # truncated download
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(broken, latent)
    # A failing export leaves neither the target nor its staging directory behind.
    with pytest.raises(ValueError):
        export_merged(broken, latent, tmp_path / "merged")
    target = tmp_path / "out"

    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom("disk full")

    model = load_adapter(exported, latent)
    model.save_config = fail
    with pytest.raises(Boom):
        export_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
