"""The base's context_embedder on its own (what a projected text cache is computed with) and when it is trained."""
from __future__ import annotations

import pytest
import torch

from asymflow.components import BaseModelConfig, context_embedder_fingerprint, load_base_components, load_context_embedder
from asymflow.tiny import build_tiny_transformer
from asymflow.trainable import FULL_MODULES, LoRASettings, why_trained


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_layer_alone_is_the_full_load_s_layer(tmp_path, dtype):
    """Read from a sharded fp16 diffusers directory, the layer equals the one the whole transformer load holds."""
    root = tmp_path / "model"
    build_tiny_transformer(seed=3).half().save_pretrained(root / "transformer", max_shard_size="20KB")
    assert len(list((root / "transformer").glob("*.safetensors"))) > 1  # the tensor is looked up across shards
    cfg = BaseModelConfig(kind="diffusers", path=str(root), dtype=dtype)
    alone = load_context_embedder(cfg)
    full = load_base_components(cfg, ("transformer",)).transformer.context_embedder
    assert alone.weight.dtype == full.weight.dtype == getattr(torch, dtype)
    assert torch.equal(alone.weight, full.weight) and not alone.weight.requires_grad
    assert context_embedder_fingerprint(alone) == context_embedder_fingerprint(full)
    other = BaseModelConfig(kind="diffusers", path=str(root), dtype="float16" if dtype == "float32" else "float32")
    assert context_embedder_fingerprint(load_context_embedder(other)) != context_embedder_fingerprint(alone)
    tiny = BaseModelConfig(kind="tiny", seed=3, dtype=dtype)
    # the same seed without the fp16 round trip: other weight bits, another fingerprint
    assert context_embedder_fingerprint(load_context_embedder(tiny)) != context_embedder_fingerprint(alone)


def test_why_trained_names_the_setting_that_trains_a_module():
    assert why_trained("context_embedder", "lora", LoRASettings(), FULL_MODULES) is None  # the recipe: frozen
    assert why_trained("context_embedder", "full", None, FULL_MODULES) == "trainable.mode is 'full'"
    assert why_trained("context_embedder", "lora", None, (*FULL_MODULES, "context_embedder")) == \
        "trainable.full_modules includes 'context_embedder'"
    assert why_trained("context_embedder", "lora", LoRASettings(targets=(r"context_\w+",)), FULL_MODULES) == \
        "a trainable.lora.targets pattern matches it"
    assert why_trained("proj_out", "lora", None, FULL_MODULES) == "trainable.full_modules includes 'proj_out'"
    assert why_trained("transformer_blocks.0.ff.linear_in", "lora", None, ()) is not None
    assert why_trained("transformer_blocks.0.attn.to_q", "lora", None, FULL_MODULES) is None


def test_a_directory_without_the_transformer_is_named(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=r"transformer has no config.json"):
        load_context_embedder(BaseModelConfig(kind="diffusers", path=str(tmp_path)))
