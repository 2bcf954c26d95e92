"""The call arguments of diffusers' Flux2KleinPipeline on ours (latents, sigmas, callback_on_step_end,
max_sequence_length, attention_kwargs, reference images) and the DiffusionPipeline.from_pretrained round trip."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from asymflow.convert import convert_transformer
from asymflow.oklab import oklab_encode
from asymflow.pipeline import AsymFlux2KleinPipeline
from asymflow.scheduler import FlowAdapterScheduler
from asymflow.tiny import (
    TINY_MAX_LENGTH,
    TINY_TEXT_LAYERS,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    build_tiny_transformer,
)
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

STEPS = 3
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def pipe() -> AsymFlux2KleinPipeline:
    transformer = convert_transformer(build_tiny_transformer(), random_basis(dtype=torch.float32).contiguous(), 1.3)
    return AsymFlux2KleinPipeline(transformer.eval(), FlowAdapterScheduler(), build_tiny_text_encoder(),
                                  build_tiny_tokenizer(), text_hidden_layers=TINY_TEXT_LAYERS,
                                  max_sequence_length=TINY_MAX_LENGTH)


def _run(pipe, **kwargs):
    kwargs = {"height": 32, "width": 32, "num_inference_steps": STEPS, "progress": False, "output_type": "latent",
              "generator": torch.Generator().manual_seed(1), **kwargs}
    return pipe(PROMPTS, **kwargs).images


def _record_calls(pipe, **kwargs) -> tuple[list[dict], torch.Tensor]:
    calls: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        out = _run(pipe, **kwargs)
    finally:
        handle.remove()
    return calls, out


def test_latents_are_the_starting_noise(pipe) -> None:
    noise = randn_tensor((2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    assert torch.equal(_run(pipe, latents=noise, generator=None), _run(pipe))  # same noise the generator draws
    assert not torch.equal(_run(pipe, latents=noise + 0.5, generator=None), _run(pipe))


def test_sigmas_replace_the_schedule(pipe) -> None:
    calls, _ = _record_calls(pipe, sigmas=[1.0, 0.6, 0.25, 0.1], num_inference_steps=None, guidance_scale=1.0)
    assert [float(c["sigma"][0]) for c in calls] == pytest.approx([1.0, 0.6, 0.25, 0.1])
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.6, 0.25, 0.1, 0.0])
    with pytest.raises(ValueError, match="decrease"):
        _run(pipe, sigmas=[0.5, 0.7], num_inference_steps=None)


def test_callback_on_step_end_sees_and_replaces_latents(pipe) -> None:
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, float(t), tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else {}

    out = _run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    sigmas = pipe.scheduler.sigmas
    assert [s[0] for s in seen] == list(range(STEPS))
    assert [s[1] for s in seen] == pytest.approx([1000 * float(x) for x in sigmas[:-1]])
    assert all(s[2] == (2, 3, 32, 32) and s[3][:2] == (2, TINY_MAX_LENGTH) for s in seen)
    assert torch.equal(out, torch.zeros_like(out))  # the last step's replacement is what comes out
    with pytest.raises(ValueError, match="noise_pred"):
        _run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_max_sequence_length_and_text_layers(pipe) -> None:
    calls, _ = _record_calls(pipe, max_sequence_length=12, guidance_scale=1.0)
    assert all(c["encoder_hidden_states"].shape[1] == 12 for c in calls)
    calls, _ = _record_calls(pipe, text_encoder_out_layers=(1, 2, 3), guidance_scale=1.0)
    assert calls[0]["encoder_hidden_states"].shape[1] == TINY_MAX_LENGTH


class _Probe:
    """An attention processor that records the `probe` keyword it receives, then runs the original processor."""

    def __init__(self, inner, seen: list) -> None:
        self.inner, self.seen = inner, seen

    def __call__(self, attn, hidden_states, *args, probe=None, **kwargs):
        # The blocks call their processor positionally (double and single stream differ): pass those through.
        self.seen.append(probe)
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_attention_kwargs_reach_the_attention_processors(pipe) -> None:
    originals = dict(pipe.transformer.attn_processors)
    n_blocks = len(originals)  # 2 double + 2 single stream
    seen: list = []
    pipe.transformer.set_attn_processor({name: _Probe(p, seen) for name, p in originals.items()})
    try:
        probed = _run(pipe, attention_kwargs={"probe": 7}, guidance_scale=1.0)
    finally:
        pipe.transformer.set_attn_processor(dict(originals))  # set_attn_processor pops from the dict it gets
    assert n_blocks == 4 and seen == [7] * (STEPS * n_blocks)
    torch.testing.assert_close(probed, _run(pipe, guidance_scale=1.0), rtol=0, atol=0)


def test_reference_images_reach_the_model_oklab_encoded(pipe) -> None:
    ref = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(2))  # [C,H,W] in [0,1], like diffusers
    calls, out = _record_calls(pipe, image=ref, height=None, width=None)
    assert out.shape == (2, 3, 48, 64)  # height/width default to the reference's size
    (cond,) = calls[0]["condition_images"]
    torch.testing.assert_close(cond, oklab_encode((ref * 2 - 1)[None]), rtol=0, atol=1e-6)
    two, _ = _record_calls(pipe, image=[ref, ref[:, :32, :32]])
    assert [tuple(c.shape) for c in two[0]["condition_images"]] == [(1, 3, 48, 64), (1, 3, 32, 32)]
    assert not torch.equal(_run(pipe, image=ref), _run(pipe))  # the reference conditions the sample


def test_diffusion_pipeline_from_pretrained_round_trip(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_asymflow", "AsymFlux2KleinPipeline"]
    assert index["transformer"] == ["asymflow.model", "AsymFlux2Transformer2DModel"]
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers' own rule for custom pipeline code
        DiffusionPipeline.from_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is AsymFlux2KleinPipeline and isinstance(loaded.scheduler, FlowAdapterScheduler)
    assert torch.equal(_run(loaded), _run(pipe))
    assert torch.equal(_run(AsymFlux2KleinPipeline.from_pretrained(tmp_path)), _run(pipe))  # our class trusts our shim
    (tmp_path / "pipeline_asymflow.py").write_text("import os  # not ours\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AsymFlux2KleinPipeline.from_pretrained(tmp_path)
