"""The AsymFlowVR step on a non-FLUX.2 family (issue 15): a tiny FLUX.1 pixel model (guidance-distilled, like
FLUX.1-dev) with its pooled CLIP projection as extra text conditioning."""
from __future__ import annotations

import inspect

import pytest
import torch

from asymflow.families import get_family
from asymflow.families.conversion import convert_family_transformer
from asymflow.families.tiny import build_tiny_family_transformer
from asymflow.objective import AsymFlowVRConfig, _extras_with_dropout, asymflow_vr_step
from asymflow.perceptual import TinyConvDistance
from asymflow.teacher import TiedTeacher
from asymflow.trainable import LoRASettings, apply_trainable, build_teacher

from .helpers import random_basis
from .test_teacher import _perturb_trainables
from .test_trainable import one_thread  # noqa: F401  (autouse fixture)

FLUX1 = get_family("flux1")


def _student_and_teachers():
    """A converted FLUX.1 LoRA student (mid-training) with a tied teacher and an independent full copy."""
    latent = build_tiny_family_transformer("flux1", seed=0)
    assert latent.config.guidance_embeds  # the tiny model is guidance-distilled, like FLUX.1-dev
    student = convert_family_transformer(FLUX1, latent, random_basis(768, 64, seed=0, dtype=torch.float32), 1.3)
    copied = build_teacher(student, share_base=False, own_modules=FLUX1.full_modules)
    tied = TiedTeacher(student)  # the family's full modules, found from the model
    assert tied._paths == FLUX1.full_modules
    apply_trainable(student, "lora", LoRASettings(rank=4, alpha=4.0, targets=FLUX1.lora_targets), FLUX1.full_modules)
    _perturb_trainables(student)  # a mid-training student, so λ and the VR target are non-trivial
    return student.train(), tied, copied


def _batch(seed: int = 0) -> dict:
    """Two 32×32 images, latent grids [2,64,2,2], T5-like states [2,8,32] + pooled [2,16] and the empty prompt's."""
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "latents": torch.randn(2, 64, 2, 2, generator=g),
        "text_embeds": torch.randn(2, 8, 32, generator=g),
        "text_extras": {"pooled_projections": torch.randn(2, 16, generator=g)},
        "negative_embeds": torch.randn(1, 8, 32, generator=g),
        "negative_extras": {"pooled_projections": torch.randn(1, 16, generator=g)},
    }


@pytest.fixture(scope="module")
def models():
    return _student_and_teachers()


def _step(student, teacher, batch, cfg, guidance=3.5, seed=5):
    return asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(seed), cfg, TinyConvDistance(),
                            guidance=guidance)


def test_tied_teacher_equals_the_copied_teacher_bitwise(models):
    student, tied, copied = models
    cfg = AsymFlowVRConfig(caption_dropout=0.5)
    results = []
    for teacher in (tied, copied):
        student.zero_grad(set_to_none=True)
        loss, metrics = _step(student, teacher, _batch(), cfg, seed=6)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics, grads))
    (loss_t, metrics_t, grads_t), (loss_c, metrics_c, grads_c) = results
    assert torch.equal(loss_t, loss_c)
    assert all(torch.equal(metrics_t[k], metrics_c[k]) for k in metrics_c)
    assert grads_t.keys() == grads_c.keys() and all(torch.equal(grads_t[k], grads_c[k]) for k in grads_c)
    assert any(n.startswith("x_embedder") for n in grads_t) and any("lora_" in n for n in grads_t)
    assert metrics_t["vr_lambda_mean"] > 0 and 0 < metrics_t["caption_dropped_frac"] < 1  # seed 6 drops one row of two


def test_caption_dropout_replaces_the_pooled_projection_too(models):
    """Every row dropped (p = 1) is the step on the empty prompt: its states AND its pooled projection. The mask is
    drawn whatever p is, so the generators stay aligned between the two configs."""
    student, tied, _ = models
    batch = _batch()
    with torch.no_grad():
        dropped, _ = _step(student, tied, batch, AsymFlowVRConfig(caption_dropout=1.0))
        negative = {**batch, "text_embeds": batch["negative_embeds"].expand(2, -1, -1),
                    "text_extras": {"pooled_projections": batch["negative_extras"]["pooled_projections"].expand(2, -1)}}
        empty, _ = _step(student, tied, negative, AsymFlowVRConfig())
        states_only = {**batch, "text_embeds": negative["text_embeds"]}  # pooled left as the caption's
        half, _ = _step(student, tied, states_only, AsymFlowVRConfig())
    assert torch.equal(dropped, empty)
    assert not torch.equal(dropped, half)


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
