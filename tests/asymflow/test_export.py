"""Adapter export (spec §12): exported tensors, exact export → import with a LoRA, EMA weights, merged export."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from asymflow.convert import convert_transformer
from asymflow.export import EXPORT_TENSORS, WEIGHTS_NAME, export_adapter, export_merged, load_adapter
from asymflow.model import AsymFlux2Transformer2DModel
from asymflow.tiny import build_tiny_transformer
from asymflow.trainable import LoRASettings, apply_trainable, trainable_state_dict
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

LORA = LoRASettings(rank=4, alpha=8.0)  # scale α/r = 2, so a wrong scale on reload would show


@pytest.fixture(scope="module")
def latent():
    return build_tiny_transformer()


@pytest.fixture(scope="module")
def trained(latent) -> AsymFlux2Transformer2DModel:
    """A converted model after 'training': LoRA attached (lora_B ≠ 0) and the full modules moved."""
    model = apply_trainable(convert_transformer(latent, random_basis(dtype=torch.float32), 0.7), "lora", LORA)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or any(name.startswith(m) for m in ("x_embedder", "proj_out", "norm_out")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 48, generator=gen), torch.tensor([0.4, 0.95]), torch.randn(2, 5, 96, generator=gen)


def outputs(model: AsymFlux2Transformer2DModel) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs())


def test_exported_files_share_the_umask_mode(tmp_path, trained) -> None:
    """safetensors writes 0600; every exported file gets the mode the umask implies, like its JSON siblings."""
    import os

    out = export_adapter(trained, tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_exported_tensors(tmp_path, trained) -> None:
    export_adapter(trained, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    lora_keys = {k for k in tensors if ".lora_" in k}
    assert set(tensors) - lora_keys == set(EXPORT_TENSORS)
    assert lora_keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_keys)
    assert "transformer_blocks.0.ff.linear_in.lora_A.weight" in lora_keys
    assert "single_transformer_blocks.1.attn.to_out.lora_B.weight" in lora_keys
    assert len(lora_keys) == 2 * sum(1 for n, _ in trained.named_modules() if n.endswith(".lora_A.default"))
    assert tensors["proj_buffer"].dtype == torch.float32 and tensors["scale_buffer"].shape == ()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AsymFlux2Transformer2DModel"
    assert config["patch_size"] == 16 and config["in_channels"] == 3 and config["base_rank"] == 128
    lora_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert lora_config["r"] == 4 and lora_config["lora_alpha"] == 8.0


def test_export_import_is_exact(tmp_path, latent, trained) -> None:
    export_adapter(trained, tmp_path)
    loaded = load_adapter(tmp_path, latent)
    assert not loaded.training
    assert loaded.peft_config["default"].r == 4  # a named, unfused peft adapter
    assert any(".lora_A.default." in n for n, _ in loaded.named_parameters())
    assert torch.equal(outputs(loaded), outputs(trained))
    loaded.disable_adapters()  # the LoRA matters: without it the output moves
    assert not torch.allclose(outputs(loaded), outputs(trained), atol=1e-3)
    # The base is copied, not aliased: the latent model is untouched and independent.
    assert loaded.context_embedder.weight.data_ptr() != latent.context_embedder.weight.data_ptr()


def test_export_ema_state_dict(tmp_path, latent, trained) -> None:
    """EMA weights (trainable params with adapter names, no buffers) replace the live ones in the export."""
    ema = {name: t + 0.01 for name, t in trainable_state_dict(trained).items() if name not in ("proj_buffer", "scale_buffer")}
    export_adapter(trained, tmp_path, state_dict=ema)
    loaded = load_adapter(tmp_path, latent)
    live = dict(loaded.named_parameters())
    for name, tensor in ema.items():
        assert torch.equal(live[name], tensor), name
    assert torch.equal(loaded.proj_buffer, trained.proj_buffer)
    with pytest.raises(ValueError, match="norm_out.linear.weight"):
        export_adapter(trained, tmp_path / "bad", state_dict={k: v for k, v in ema.items() if "norm_out" not in k})


def test_merged_export(tmp_path, latent, trained) -> None:
    export_adapter(trained, tmp_path / "adapter")
    merged = export_merged(tmp_path / "adapter", latent, tmp_path / "merged")
    assert not hasattr(merged, "peft_config")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = outputs(trained)
    assert torch.allclose(outputs(merged), reference, rtol=1e-4, atol=1e-5)  # W + (α/r)·B·A rounded once in fp32
    reloaded = AsymFlux2Transformer2DModel.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(outputs(reloaded), outputs(merged))


def test_adapter_without_lora(tmp_path, latent) -> None:
    model = convert_transformer(latent, random_basis(dtype=torch.float32), 2.3).eval()
    export_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    assert torch.equal(outputs(load_adapter(tmp_path, latent)), outputs(model))


def test_rejects_mismatched_base(tmp_path, trained) -> None:
    export_adapter(trained, tmp_path)
    with pytest.raises(ValueError, match="num_layers"):
        load_adapter(tmp_path, build_tiny_transformer(num_layers=1))


def test_full_fine_tune_exports_every_trained_tensor(tmp_path, latent) -> None:
    """trainable.mode full: every parameter is trained, so every one is exported and a block weight moved by
    training comes back on load (instead of the base's re-projected weight)."""
    model = apply_trainable(convert_transformer(latent, random_basis(dtype=torch.float32), 0.7), "full")
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_q.weight.add_(0.1)
    model.eval()
    export_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert set(tensors) == {n for n, _ in model.named_parameters()} | set(EXPORT_TENSORS)
    assert torch.equal(outputs(load_adapter(tmp_path, latent)), outputs(model))
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.weight"):
        export_adapter(model, tmp_path / "bad", state_dict={k: v for k, v in model.state_dict().items()
                                                            if k != "transformer_blocks.0.attn.to_q.weight"})

