"""The AsymFlowVR step on the families beside FLUX.2 (issue 15): tiny pixel models of FLUX.1 (guidance-distilled, like
FLUX.1-dev, with its pooled CLIP projection), SD3 (conv read-in, pooled projection), Qwen-Image (text mask over joint
attention) and Sana (conv read-in at patch 32, text mask over cross-attention, its output modulation a parameter
trained in full)."""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

from asymflow.families import get_family
from asymflow.families.conversion import convert_family_transformer
from asymflow.families.tiny import TINY_POOLED_WIDTH, TINY_TEXT_WIDTH, build_tiny_family_transformer
from asymflow.objective import AsymFlowVRConfig, _extras_with_dropout, asymflow_vr_step
from asymflow.perceptual import TinyConvDistance
from asymflow.teacher import TiedTeacher
from asymflow.trainable import LoRASettings, apply_trainable, build_teacher

from .helpers import random_basis
from .test_teacher import _perturb_trainables
from .test_trainable import one_thread  # noqa: F401  (autouse fixture)

FLUX1 = get_family("flux1")
FAMILIES = ("flux1", "sd3", "qwen_image", "sana")
TEXT_LEN = 8


@functools.cache
def _student_and_teachers(name: str = "flux1"):
    """A converted LoRA student of the family (mid-training) with a tied teacher and an independent full copy."""
    family = get_family(name)
    latent = build_tiny_family_transformer(name, seed=0)
    assert bool(getattr(latent.config, "guidance_embeds", False)) == (name == "flux1")  # FLUX.1-dev-like only
    basis = random_basis(family.pixel_dim, family.latent_dim, seed=0, dtype=torch.float32)
    student = convert_family_transformer(family, latent, basis, 1.3)
    copied = build_teacher(student, share_base=False, own_modules=family.full_modules)
    tied = TiedTeacher(student)  # the family's full modules, found from the model
    assert tied._paths == family.full_modules
    apply_trainable(student, "lora", LoRASettings(rank=4, alpha=4.0, targets=family.lora_targets), family.full_modules)
    _perturb_trainables(student)  # a mid-training student, so λ and the VR target are non-trivial
    return student.train(), tied, copied


def _batch(name: str = "flux1", seed: int = 0) -> dict:
    """Two images of 2×2 pixel patches with their latent grids [2,r,2,2], T5/Gemma-like states [2,8,32] and the
    family's other text tensors as a cache stores them: a pooled projection [2,16] (FLUX.1, SD3) or an int64 mask
    [2,8] (Qwen-Image, Sana; the second prompt is two tokens shorter), and the empty prompt's (its mask covers only
    its first two tokens, so a mask left as the prompt's would let the model see the rest)."""
    family = get_family(name)
    g = torch.Generator().manual_seed(seed)
    side = 2 * family.pixel_patch
    batch = {
        "images": torch.rand(2, 3, side, side, generator=g) * 2 - 1,
        "latents": torch.randn(2, family.latent_dim, 2, 2, generator=g),
        "text_embeds": torch.randn(2, TEXT_LEN, TINY_TEXT_WIDTH, generator=g),
        "negative_embeds": torch.randn(1, TEXT_LEN, TINY_TEXT_WIDTH, generator=g),
    }
    if family.text_mask is None:
        batch["text_extras"] = {"pooled_projections": torch.randn(2, TINY_POOLED_WIDTH, generator=g)}
        batch["negative_extras"] = {"pooled_projections": torch.randn(1, TINY_POOLED_WIDTH, generator=g)}
    else:
        mask = torch.ones(2, TEXT_LEN, dtype=torch.int64)
        mask[1, -2:] = 0
        negative = torch.zeros(1, TEXT_LEN, dtype=torch.int64)
        negative[0, :2] = 1
        batch["text_extras"] = {family.text_mask: mask}
        batch["negative_extras"] = {family.text_mask: negative}
    return batch


@pytest.fixture(scope="module")
def models():
    return _student_and_teachers("flux1")


def _step(student, teacher, batch, cfg, guidance=3.5, seed=5):
    return asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(seed), cfg, TinyConvDistance(),
                            guidance=guidance)


def _cfg(name: str, **kwargs) -> AsymFlowVRConfig:
    """The objective at the family's patch sizes (RunConfig's family defaults)."""
    family = get_family(name)
    return AsymFlowVRConfig(patch_size=family.pixel_patch, latent_patch=family.latent_patch, **kwargs)


def _guidance(name: str) -> float | None:
    return FLUX1.sampler.embedded_guidance if name == "flux1" else None  # the others have no guidance embedding


@pytest.mark.parametrize("name", FAMILIES)
def test_tied_teacher_equals_the_copied_teacher_bitwise(name):
    student, tied, copied = _student_and_teachers(name)
    family = get_family(name)
    cfg = _cfg(name, caption_dropout=0.5)
    own = {path: _held(student, path) for path in family.full_modules}
    results = []
    for teacher in (tied, copied):
        student.zero_grad(set_to_none=True)
        loss, metrics = _step(student, teacher, _batch(name), cfg, guidance=_guidance(name), seed=6)
        loss.backward()
        # None: a LoRA on a layer whose output never reaches the image (Qwen-Image's last block's text MLP)
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((loss.detach(), metrics, grads))
    (loss_t, metrics_t, grads_t), (loss_c, metrics_c, grads_c) = results
    assert torch.equal(loss_t, loss_c)
    assert all(torch.equal(metrics_t[k], metrics_c[k]) for k in metrics_c)
    assert grads_t.keys() == grads_c.keys() and all(torch.equal(grads_t[k], grads_c[k]) for k in grads_c)
    # every fully trained module (Sana's scale_shift_table: a parameter) and the LoRA got gradients
    assert all(any(n == m or n.startswith(f"{m}.") for n in grads_t) for m in family.full_modules)
    assert any("lora_" in n for n in grads_t)
    assert metrics_t["vr_lambda_mean"] > 0 and 0 < metrics_t["caption_dropped_frac"] < 1  # seed 6 drops one row of two
    # The swaps are undone: the student holds its own (trained) modules and parameters again.
    assert all(_held(student, path) is held for path, held in own.items())


def _held(model, path: str):
    """The module or parameter at `path`."""
    from asymflow.teacher import is_parameter_path

    return model.get_parameter(path) if is_parameter_path(model, path) else model.get_submodule(path)


@pytest.mark.parametrize("name", FAMILIES)
def test_caption_dropout_replaces_every_named_text_tensor(name):
    """Every row dropped (p = 1) is the step on the empty prompt: its states AND each of its other named tensors
    (pooled projection, text mask); leaving any one of them as the prompt's gives another loss. The mask is drawn
    whatever p is, so the generators stay aligned between the two configs."""
    student, tied, _ = _student_and_teachers(name)
    batch, guidance = _batch(name), _guidance(name)
    negative_extras = {k: v.expand(2, *v.shape[1:]) for k, v in batch["negative_extras"].items()}
    negative = {**batch, "text_embeds": batch["negative_embeds"].expand(2, -1, -1), "text_extras": negative_extras}
    with torch.no_grad():
        dropped, _ = _step(student, tied, batch, _cfg(name, caption_dropout=1.0), guidance=guidance)
        empty, _ = _step(student, tied, negative, _cfg(name), guidance=guidance)
        assert torch.equal(dropped, empty)
        for kept in batch["text_extras"]:  # that one left as the prompt's
            half = {**negative, "text_extras": {**negative_extras, kept: batch["text_extras"][kept]}}
            other, _ = _step(student, tied, half, _cfg(name), guidance=guidance)
            assert not torch.equal(dropped, other), kept


def test_caption_dropout_keeps_an_integer_mask_integer():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.int64)
    batch = {"text_extras": {"encoder_attention_mask": mask},
             "negative_extras": {"encoder_attention_mask": torch.tensor([[1, 0, 0]], dtype=torch.int64)}}
    out = _extras_with_dropout(batch, torch.tensor([False, True]))["encoder_attention_mask"]
    assert out.dtype == torch.int64 and out.tolist() == [[1, 1, 0], [1, 0, 0]]
    out = _extras_with_dropout(batch, torch.tensor([True, False]))["encoder_attention_mask"]
    assert out.tolist() == [[1, 0, 0], [1, 0, 0]]
    with pytest.raises(KeyError, match="negative_extras.*lacks"):
        _extras_with_dropout({"text_extras": {"encoder_attention_mask": mask}}, torch.tensor([True, False]))


def test_guidance_reaches_both_models(models):
    """The guidance value is an input of the guidance-distilled model: another value is another loss, and without
    one the model refuses to run (the step must pass it to the teacher and to the student)."""
    from diffusers import FluxPipeline

    student, tied, _ = models
    cfg = AsymFlowVRConfig()
    with torch.no_grad():
        at_default, _ = _step(student, tied, _batch(), cfg, guidance=3.5)
        at_other, _ = _step(student, tied, _batch(), cfg, guidance=1.0)
        assert not torch.equal(at_default, at_other)
        with pytest.raises(ValueError, match="guidance-distilled: pass guidance"):
            _step(student, tied, _batch(), cfg, guidance=None)
        # The teacher alone sees it too: its VR twin error d_low changes with the guidance (x0_mse_teacher).
        _, m_default = _step(student, tied, _batch(), cfg, guidance=3.5)
        _, m_other = _step(student, tied, _batch(), cfg, guidance=1.0)
    assert m_default["x0_mse_teacher"] != m_other["x0_mse_teacher"]
    # The training default is the value FluxPipeline samples FLUX.1-dev with (its __call__'s guidance_scale).
    assert FLUX1.sampler.embedded_guidance == inspect.signature(FluxPipeline.__call__).parameters["guidance_scale"].default


def test_every_training_family_has_data_prep_and_an_integration_run():
    """TRAINING_FAMILIES grows with the families whose cache exists and whose tiny run is in the integration suite."""
    from asymflow.components import DATA_PREP_FAMILIES, TRAINING_FAMILIES
    from tests.orchestration.test_family_train import FAMILIES

    assert set(TRAINING_FAMILIES) <= set(DATA_PREP_FAMILIES)
    assert {p.values[0][0] for p in FAMILIES} == set(TRAINING_FAMILIES) - {"flux2"}
