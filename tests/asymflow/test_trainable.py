"""Trainable set (spec §9): LoRA targets, freezing, parameter groups, the shared-base teacher, and training on the seam."""
import re

import pytest
import torch

from asymflow.convert import convert_transformer
from asymflow.latents import encode_latents
from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step
from asymflow.perceptual import TinyConvDistance
from asymflow.tiny import build_tiny_transformer, build_tiny_vae
from asymflow.trainable import (
    LoRASettings,
    apply_trainable,
    build_teacher,
    has_adapter,
    param_groups,
    trainable_state_dict,
)

from .helpers import random_basis

FULL = ("x_embedder", "proj_out", "norm_out")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are far too small for intra-op threads; on a shared 2-core box they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pair(rank: int = 8, share_base: bool = True, scale: float = 1.3):
    """A converted tiny pixel student (LoRA + full modules, train mode) and its frozen teacher."""
    student = convert_transformer(build_tiny_transformer(seed=0), random_basis(768, 128, seed=0, dtype=torch.float32), scale)
    teacher = build_teacher(student, share_base=share_base)
    apply_trainable(student, "lora", LoRASettings(rank=rank, alpha=rank))
    return student.train(), teacher


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two 32×32 RGB images in [−1,1], their tiny-VAE latent grids [2,128,2,2] and fixed random text embeddings."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return {
        "images": images,
        "latents": encode_latents(build_tiny_vae(), images),
        "text_embeds": torch.randn(2, 8, 96, generator=g),
        "negative_embeds": torch.randn(1, 8, 96, generator=g),
    }


def _under(name: str, modules=FULL) -> bool:
    return any(re.search(rf"(^|\.){m}(\.|$)", name) for m in modules)


def test_lora_targets_match_the_spec_modules_for_any_block_count():
    regex = LoRASettings().target_regex()
    for layers, singles in ((2, 2), (3, 5)):
        model = build_tiny_transformer(num_layers=layers, num_single_layers=singles)
        hits = {n for n, _ in model.named_modules() if re.fullmatch(regex, n)}
        expected = {f"transformer_blocks.{i}.{ff}.linear_{io}" for i in range(layers) for ff in ("ff", "ff_context") for io in ("in", "out")}
        expected |= {"time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2"}
        expected |= {f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)}
        assert hits == expected
        assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in hits)
    assert (LoRASettings().rank, LoRASettings().alpha, LoRASettings().dropout) == (256, 256.0, 0.05)


def test_apply_trainable_lora_freezes_all_but_lora_and_full_modules():
    student, _ = tiny_pair()
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or _under(n) for n in trainable)
    assert {m for m in FULL if any(_under(n, (m,)) for n in trainable)} == set(FULL)
    lora_modules = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert len(lora_modules) == 12  # 2 double × 4 + 2 timestep + 2 single
    assert all(p.dtype == torch.float32 for n, p in student.named_parameters() if p.requires_grad)
    # PEFT "gaussian": B = 0, so the adapter starts as a no-op.
    assert all((p == 0).all() for n, p in student.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="already carries"):
        apply_trainable(student, "lora", LoRASettings(rank=4, alpha=4))


def test_apply_trainable_full_and_unknown_mode():
    model = convert_transformer(build_tiny_transformer(), random_basis(768, 128, dtype=torch.float32), 1.0)
    apply_trainable(model, "full")
    assert all(p.requires_grad for p in model.parameters()) and not has_adapter(model)
    with pytest.raises(ValueError, match="unknown trainable mode"):
        apply_trainable(model, "partial")  # type: ignore[arg-type]


def test_param_groups_split_proj_out_with_ten_times_lr():
    student, _ = tiny_pair()
    groups = param_groups(student, lr=1e-4, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"proj_out", "default"}
    assert by_name["proj_out"]["lr"] == pytest.approx(1e-3) and by_name["default"]["lr"] == pytest.approx(1e-4)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    assert {id(p) for p in by_name["proj_out"]["params"]} == {id(student.proj_out.weight)}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in student.parameters() if p.requires_grad)
    custom = {g["name"]: g["lr"] for g in param_groups(student, 1.0, {"x_embedder": 2.0, "norm_out": 0.5})}
    assert custom == {"x_embedder": 2.0, "norm_out": 0.5, "default": 1.0}


def test_teacher_shares_frozen_base_and_owns_full_modules():
    student, teacher = tiny_pair()
    assert not has_adapter(teacher) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    student_ptrs = {p.data_ptr() for p in student.parameters()}
    for name, p in teacher.named_parameters():
        assert (p.data_ptr() in student_ptrs) != _under(name), name
    # LoRA wraps the same base Parameter objects (identity, not only storage).
    assert teacher.transformer_blocks[0].ff.linear_in.weight is student.transformer_blocks[0].ff.linear_in.base_layer.weight
    assert teacher.proj_out.weight is not student.proj_out.weight
    assert torch.equal(teacher.proj_out.weight, student.proj_out.weight)
    with pytest.raises(ValueError, match="before LoRA"):
        build_teacher(student)
    _, independent = tiny_pair(share_base=False)
    assert not any(p.data_ptr() in {q.data_ptr() for q in student.parameters()} for p in independent.parameters())


def test_trainable_state_dict_holds_trainable_params_and_buffers():
    student, _ = tiny_pair()
    state = trainable_state_dict(student)
    expected = {n for n, p in student.named_parameters() if p.requires_grad} | {"proj_buffer", "scale_buffer"}
    assert set(state) == expected and not any(t.requires_grad for t in state.values())


def test_gradients_reach_only_trainable_student_params():
    student, teacher = tiny_pair()
    loss, _ = asymflow_vr_step(student, teacher, tiny_batch(), torch.Generator().manual_seed(0), AsymFlowVRConfig(), TinyConvDistance())
    loss.backward()
    for name, p in student.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert all(p.grad is None for p in teacher.parameters())
    # Gradients reach both kinds of trainable tensors (LoRA A gets none while B = 0, so check B and proj_out).
    assert student.proj_out.weight.grad.abs().sum() > 0
    assert student.transformer_blocks[0].ff.linear_out.lora_B.default.weight.grad.abs().sum() > 0


def test_adamw_on_the_seam_reduces_the_loss_and_leaves_the_teacher_at_init():
    student, teacher = tiny_pair()
    batch = tiny_batch()
    cfg = AsymFlowVRConfig()
    distance = TinyConvDistance()
    probe = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0.7]), batch["text_embeds"][:1])
    with torch.no_grad():
        teacher_before = teacher(*probe)
    optimizer = torch.optim.AdamW(param_groups(student, lr=1e-3), betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(50):
        # Seeds cycle with period 5, so the first and last five steps see identical σ and ε.
        loss, _ = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(step % 5), cfg, distance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        assert torch.equal(teacher(*probe), teacher_before)
