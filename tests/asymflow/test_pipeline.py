"""AsymFlux2KleinPipeline end to end on tiny components: outputs, seeding, guidance passes, save/load, shared loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asymflow.convert import convert_transformer
from asymflow.pipeline import AsymFlux2KleinPipeline, sample_images
from asymflow.scheduler import FlowAdapterScheduler
from asymflow.tiny import (
    TINY_MAX_LENGTH,
    TINY_TEXT_LAYERS,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    build_tiny_transformer,
)

STEPS = 3
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def pipe() -> AsymFlux2KleinPipeline:
    g = torch.Generator().manual_seed(0)
    # Contiguous B: a transposed (QR) layout picks other matmul kernels than the reloaded copy (1e-6 drift).
    basis = torch.linalg.qr(torch.randn(768, 128, generator=g, dtype=torch.float64))[0].float().contiguous()
    transformer = convert_transformer(build_tiny_transformer(), basis, 1.3).eval()
    return AsymFlux2KleinPipeline(
        transformer,
        FlowAdapterScheduler(),
        build_tiny_text_encoder(),
        build_tiny_tokenizer(),
        text_hidden_layers=TINY_TEXT_LAYERS,
        max_sequence_length=TINY_MAX_LENGTH,
    )


def _run(pipe: AsymFlux2KleinPipeline, seed: int = 1, **kwargs):
    kwargs = {"height": 32, "width": 32, "num_inference_steps": STEPS, "progress": False, **kwargs}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_pil_images_have_the_requested_size_floored_to_16(pipe) -> None:
    images = _run(pipe, height=47, width=32)  # 47 → 32 (warns)
    assert len(images) == len(PROMPTS)
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    wide = _run(pipe, height=16, width=48, num_images_per_prompt=2)
    assert len(wide) == 2 * len(PROMPTS) and all(im.size == (48, 16) for im in wide)  # PIL size is (W, H)


def test_output_types(pipe) -> None:
    pt = _run(pipe, output_type="pt")
    assert pt.shape == (2, 3, 32, 32) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    np_images = _run(pipe, output_type="np")
    assert np_images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    oklab = _run(pipe, output_type="latent")
    assert oklab.shape == (2, 3, 32, 32)


def test_same_seed_same_images_other_seed_other_images(pipe) -> None:
    a, b, c = (np.stack([np.asarray(im) for im in _run(pipe, seed=s)]) for s in (1, 1, 2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def _batch_sizes_per_call(pipe: AsymFlux2KleinPipeline, **kwargs) -> list[int]:
    sizes: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: sizes.append(kw["x_t"].shape[0]), with_kwargs=True
    )
    try:
        _run(pipe, **kwargs)
    finally:
        handle.remove()
    return sizes


def test_uncond_pass_runs_only_where_guidance_applies(pipe) -> None:
    b = len(PROMPTS)
    # cond and uncond share one batched call per step; without guidance the uncond half is dropped.
    assert _batch_sizes_per_call(pipe, guidance_scale=4.0) == [2 * b] * STEPS
    assert _batch_sizes_per_call(pipe, guidance_scale=1.0) == [b] * STEPS
    # Shift 17, 3 steps: σ = 1, 0.971, 0.895; the interval [0, 0.9] guides only the last step.
    assert _batch_sizes_per_call(pipe, guidance_scale=4.0, guidance_interval=(0.0, 0.9)) == [b, b, 2 * b]


def test_pipeline_is_sample_images_on_encoded_prompts(pipe) -> None:
    """One loop: training-time sampling from cached embeddings reproduces the pipeline bit for bit."""
    embeds, negative = pipe.encode_prompt(PROMPTS), pipe.encode_prompt([""])
    from_pipe = _run(pipe, output_type="pt", prompt_embeds=embeds, negative_prompt_embeds=negative.expand(2, -1, -1))
    assert torch.equal(from_pipe, _run(pipe, output_type="pt"))  # same as encoding the prompts inside
    images = sample_images(
        pipe.transformer,
        embeds,
        negative,  # batch 1 broadcasts over the prompts
        height=32,
        width=32,
        num_inference_steps=STEPS,
        scheduler=FlowAdapterScheduler(),
        generator=torch.Generator().manual_seed(1),
    )
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), from_pipe, rtol=0, atol=1e-6)


def test_save_and_load_round_trip(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path)
    loaded = AsymFlux2KleinPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, FlowAdapterScheduler)
    assert tuple(loaded.config.text_hidden_layers) == TINY_TEXT_LAYERS
    assert loaded.config.max_sequence_length == TINY_MAX_LENGTH
    assert torch.equal(_run(loaded, output_type="pt"), _run(pipe, output_type="pt"))


def test_missing_inputs_fail_with_a_clear_message(pipe) -> None:
    embeds = pipe.encode_prompt(PROMPTS)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample_images(pipe.transformer, embeds, None, height=32, width=32, num_inference_steps=1)
    bare = AsymFlux2KleinPipeline(pipe.transformer, FlowAdapterScheduler())
    with pytest.raises(ValueError, match="prompt_embeds"):
        bare("a cat", height=32, width=32, num_inference_steps=1, progress=False)
    # Without guidance no negative embedding is needed at all.
    out = bare(prompt_embeds=embeds, guidance_scale=1.0, height=32, width=32, num_inference_steps=1, progress=False)
    assert len(out.images) == 2
