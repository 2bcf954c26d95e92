"""The real FLUX.2 klein 4B and 9B configs, built on the meta device: conversion, trainable selection, teacher tying,
parameter groups and export key lists run on the full-size models without allocating their weights.

Expected counts are derived from the config dimensions (d = heads × head_dim, h = mlp_ratio·d, T = timestep
channels, D = 3·16² pixel patch, r = LoRA rank), not read off the model:
  LoRA   = r·[ L·2·((d + 2h) + (h + d))   double blocks: ff and ff_context, linear_in (SwiGLU: 2h) and linear_out
             + S·((d + h) + d)            single blocks: the fused attention + MLP output projection
             + (T + d) + (d + d) ]        timestep embedder linear_1, linear_2
  full   = D·d + d·D + 2d·d               x_embedder, proj_out, norm_out.linear (spec §9: ≈ 314 M + 40 M at 9B)
  pixel total = latent total + (D − 128)·d·2     (x_embedder and proj_out widen from 128 to D features)
"""
import resource

import pytest
import torch

from asymflow.convert import convert_transformer
from asymflow.klein import KLEIN_TRANSFORMER_CONFIGS, build_klein_transformer
from asymflow.teacher import make_teacher
from asymflow.trainable import FULL_MODULES, LoRASettings, apply_trainable, param_groups

from .helpers import random_basis

D = 3 * 16 * 16


def _expected(cfg: dict, rank: int) -> tuple[int, int]:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    h = int(cfg["mlp_ratio"] * d)
    t = cfg["timestep_guidance_channels"]
    lora = rank * (cfg["num_layers"] * 2 * ((d + 2 * h) + (h + d)) + cfg["num_single_layers"] * ((d + h) + d)
                   + (t + d) + (d + d))
    full = D * d + d * D + 2 * d * d
    return lora, full


# The 9B headline figures of the design review (issue 12): 9.08 B parameters, 353 M trainable (3.9 %).
@pytest.mark.parametrize("name, total_b, trainable_m", [("4b", None, None), ("9b", 9.08, 353.4)])
def test_real_klein_config_on_meta(name, total_b, trainable_m):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = KLEIN_TRANSFORMER_CONFIGS[name]
    latent = build_klein_transformer(name)  # meta, bf16
    latent_total = sum(p.numel() for p in latent.parameters())
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]

    pixel = convert_transformer(latent, random_basis(D, 128, seed=0, dtype=torch.float32), 2.2)
    assert pixel.proj_buffer.device.type == "cpu" and pixel.proj_buffer.dtype == torch.float32  # B and s are real
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in pixel.parameters())
    assert tuple(pixel.x_embedder.weight.shape) == (d, D) and tuple(pixel.proj_out.weight.shape) == (D, d)
    pixel_total = sum(p.numel() for p in pixel.parameters())
    assert pixel_total == latent_total + 2 * (D - 128) * d

    teacher = make_teacher(pixel, "tied")
    with torch.device("meta"):
        apply_trainable(pixel, "lora", LoRASettings())  # rank 256, the recipe
    lora, full = _expected(cfg, 256)
    trainable = {n: p.numel() for n, p in pixel.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if "lora_" in n) == lora
    assert sum(v for n, v in trainable.items() if "lora_" not in n) == full
    if total_b is not None:
        assert (lora + full) / 1e6 == pytest.approx(trainable_m, abs=0.1)
        assert pixel_total / 1e9 == pytest.approx(total_b, abs=0.01)
    assert all(p.dtype == torch.float32 for n, p in pixel.named_parameters() if p.requires_grad)  # fp32 trainables

    # The teacher owns only its copies of the fully trained modules, in the load dtype (bf16): 2 bytes each.
    assert teacher.own_bytes() == 2 * full
    assert not any(t is p for t in teacher.parameters() for p in pixel.parameters())

    groups = {g["name"]: g for g in param_groups(pixel, 1e-4)}
    assert set(groups) == {"proj_out", "default"}
    assert sum(p.numel() for p in groups["proj_out"]["params"]) == d * D and groups["proj_out"]["lr"] == pytest.approx(1e-3)
    assert sum(p.numel() for p in groups["default"]["params"]) == lora + full - d * D

    # What an export holds (spec §12): the fully trained tensors, B and s, and every LoRA A/B pair.
    targets = [n for n, m in pixel.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    expected_lora_keys = {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    lora_keys = {n.replace(".default", "") for n in trainable if "lora_" in n}
    assert lora_keys == expected_lora_keys
    assert {n for n in trainable if "lora_" not in n} == {f"{m}.weight" if m != "norm_out" else "norm_out.linear.weight"
                                                          for m in FULL_MODULES}
    assert len(targets) == 4 * cfg["num_layers"] + cfg["num_single_layers"] + 2

    # Nothing of the model's size was allocated (9B in bf16 would be 18 GB): peak RSS grew by far less than 1 GB.
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 1024 * 1024, f"peak RSS grew by {grown_kb / 1024:.0f} MB"
