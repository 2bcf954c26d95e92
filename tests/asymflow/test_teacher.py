"""The tied teacher: the student's own modules with LoRA off and frozen init copies of the fully trained modules."""
import copy

import pytest
import torch

from asymflow.convert import convert_transformer
from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step
from asymflow.perceptual import TinyConvDistance
from asymflow.teacher import TiedTeacher
from asymflow.tiny import build_tiny_transformer
from asymflow.trainable import FULL_MODULES, LoRASettings, apply_trainable, build_teacher, param_groups

from .helpers import random_basis
from .test_trainable import one_thread, tiny_batch  # noqa: F401  (one_thread: autouse fixture)


def _student_and_teachers(scale: float = 1.3):
    """A converted LoRA student with (tied teacher, independent full-copy teacher) built from the same init."""
    student = convert_transformer(build_tiny_transformer(seed=0), random_basis(768, 128, seed=0, dtype=torch.float32), scale)
    copied = build_teacher(student, share_base=False)
    tied = TiedTeacher(student)
    apply_trainable(student, "lora", LoRASettings(rank=8, alpha=8))
    return student.train(), tied, copied


def _probe(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.4, 0.95]), torch.randn(2, 8, 96, generator=g)


def _perturb_trainables(student: torch.nn.Module) -> None:
    """Move every trainable tensor (LoRA A and B, x_embedder, proj_out, norm_out) away from its init."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_tied_teacher_computes_the_converted_init_bitwise():
    student, tied, copied = _student_and_teachers()
    probe = _probe()
    with torch.no_grad():
        assert torch.equal(tied(*probe), copied(*probe))
        _perturb_trainables(student)  # the student moves on; the teacher must not
        assert not torch.equal(student.eval()(*probe), copied(*probe))
        student.train()
        assert torch.equal(tied(*probe), copied(*probe))
        assert torch.equal(tied(*probe, prediction="x0"), copied(*probe, prediction="x0"))


def test_tied_teacher_leaves_the_student_as_it_found_it():
    student, tied, _ = _student_and_teachers()
    modules = {path: student.get_submodule(path) for path in FULL_MODULES}
    grads = {name: p.requires_grad for name, p in student.named_parameters()}
    modes = {name: m.training for name, m in student.named_modules()}
    probe = _probe()
    tied(*probe)
    assert {path: student.get_submodule(path) for path in FULL_MODULES} == modules
    assert {name: p.requires_grad for name, p in student.named_parameters()} == grads
    assert {name: m.training for name, m in student.named_modules()} == modes


def test_the_loss_and_its_gradients_are_bitwise_unchanged_by_tying():
    student, tied, copied = _student_and_teachers()
    _perturb_trainables(student)  # a mid-training student, so λ and the VR target are non-trivial
    batch, cfg, distance = tiny_batch(), AsymFlowVRConfig(), TinyConvDistance()
    results = []
    for teacher in (tied, copied):
        student.zero_grad(set_to_none=True)
        loss, metrics = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(5), cfg, distance)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics, grads))
    (loss_t, metrics_t, grads_t), (loss_c, metrics_c, grads_c) = results
    assert torch.equal(loss_t, loss_c)
    assert all(torch.equal(metrics_t[k], metrics_c[k]) for k in metrics_c)
    assert grads_t.keys() == grads_c.keys() and all(torch.equal(grads_t[k], grads_c[k]) for k in grads_c)
    assert metrics_t["vr_lambda_mean"] > 0


def test_training_with_a_tied_teacher_keeps_the_teacher_at_init():
    student, tied, copied = _student_and_teachers()
    probe = _probe()
    optimizer = torch.optim.AdamW(param_groups(student, lr=1e-3), betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(3):
        loss, _ = asymflow_vr_step(student, tied, tiny_batch(), torch.Generator().manual_seed(step), AsymFlowVRConfig())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert torch.equal(tied(*probe), copied(*probe))


def test_teacher_memory_is_the_fully_trained_modules_only():
    student, tied, copied = _student_and_teachers()
    full_bytes = sum(p.numel() * p.element_size() for path in FULL_MODULES for p in student.get_submodule(path).parameters())
    copy_bytes = sum(p.numel() * p.element_size() for p in copied.parameters())
    assert tied.own_bytes() == full_bytes  # ≤ 1.05 × the trained modules' bytes (issue 12): exactly 1×
    assert list(tied.parameters()) == list(tied.frozen.parameters())  # the student is not a submodule
    base_bytes = sum(p.numel() * p.element_size() for n, p in student.named_parameters() if not p.requires_grad)
    assert copy_bytes == full_bytes + base_bytes  # a full copy holds the base again; the tied teacher does not
    assert not tied.training and not tied.train().training


def test_tying_after_lora_is_refused():
    student, _, _ = _student_and_teachers()
    with pytest.raises(ValueError, match="before LoRA"):
        TiedTeacher(student)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_a_projected_text_batch_gives_the_raw_step_bitwise(base_dtype):
    """A batch from a projected text cache (the base's context_embedder applied per sample ahead of time, as `prep
    cache --text-form projected` does) gives the raw batch's loss, metrics and gradients bit for bit: LoRA student,
    tied teacher, caption dropout drawing the negative prompt; fp32, and the recipe's bf16 base under bf16 autocast."""
    from asymflow.text import project_text

    student = convert_transformer(build_tiny_transformer(seed=0).to(base_dtype),
                                  random_basis(768, 128, seed=0, dtype=torch.float32), 1.3)
    tied = TiedTeacher(student)
    apply_trainable(student, "lora", LoRASettings(rank=8, alpha=8))
    student.train()
    _perturb_trainables(student)
    raw = tiny_batch()
    if base_dtype == torch.bfloat16:  # the loader ships text in bf16
        raw = {**raw, "text_embeds": raw["text_embeds"].bfloat16(), "negative_embeds": raw["negative_embeds"].bfloat16()}
    layer = build_tiny_transformer(seed=0).to(base_dtype).context_embedder  # the base model's, not the student's
    projected = {**raw}
    for key in ("text_embeds", "negative_embeds"):
        projected[key] = torch.cat([project_text(layer, row[None]) for row in raw[key]])
        assert projected[key].shape[-1] == student.inner_dim != raw[key].shape[-1]
    cfg = AsymFlowVRConfig(caption_dropout=0.5)
    results = []
    for batch, text_projected in ((raw, False), (projected, True)):
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base_dtype == torch.bfloat16):
            loss, metrics = asymflow_vr_step(student, tied, batch, torch.Generator().manual_seed(4), cfg,
                                             TinyConvDistance(), text_projected=text_projected)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics, grads))
    (loss_r, metrics_r, grads_r), (loss_p, metrics_p, grads_p) = results
    assert metrics_r["caption_dropped_frac"] == 0.5  # one row conditioned on its caption, one on the negative prompt
    assert metrics_r["vr_lambda_mean"] > 0 and torch.isfinite(loss_r)
    assert torch.equal(loss_r, loss_p)
    assert metrics_r.keys() == metrics_p.keys() and all(torch.equal(metrics_r[k], metrics_p[k]) for k in metrics_r)
    assert grads_r.keys() == grads_p.keys() and all(torch.equal(grads_r[k], grads_p[k]) for k in grads_r)
    assert all(bool(g.abs().sum() > 0) for g in grads_r.values())
