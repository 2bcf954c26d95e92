"""AsymFlowFamilyPipeline (FLUX.1, SD3, Qwen-Image, Sana): its images are `sample_family` on the prompts encoded as the
family's diffusers pipeline encodes them, Oklab-decoded (bit for bit), with the family's CFG convention, and they
survive a save / diffusers `DiffusionPipeline.from_pretrained` round trip."""
from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from asymflow.families import get_family
from asymflow.families.conversion import convert_family_transformer
from asymflow.families.pipeline import AsymFlowFamilyPipeline
from asymflow.families.sampling import sample_family
from asymflow.families.text import encode_family_prompts, sampling_inputs
from asymflow.families.tiny import build_tiny_family_transformer
from asymflow.families.tiny_text import build_tiny_text_components
from tests.asymflow.family_pipelines import FAMILIES, image_side, random_subspace
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

PROMPTS = ["a red cat", "a small dog on a street"]
NEGATIVE = "blurry low quality"
STEPS = 2


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request):
    name = request.param
    basis, scale = random_subspace(name)
    pixel = convert_family_transformer(get_family(name), build_tiny_family_transformer(name), basis, scale).eval()
    return name, AsymFlowFamilyPipeline(pixel, **build_tiny_text_components(name))


def run(pipe, name: str, seed: int = 5, **kwargs) -> torch.Tensor:
    side = image_side(name)
    call = dict(negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(seed))
    return pipe(PROMPTS, **{**call, **kwargs}).images


def reference(pipe, name: str, seed: int = 5, guidance_scale=None, decode: bool = True, **kwargs) -> torch.Tensor:
    """sample_family on encode_family_prompts' tensors (negatives encoded as the family's pipeline does for true
    CFG), then diffusers' VaeImageProcessor.denormalize written out: (x/2 + 1/2).clamp(0, 1)."""
    text = {k: v for k, v in pipe.components.items() if k != "transformer"}
    encoded = encode_family_prompts(name, text, PROMPTS)
    negative = encode_family_prompts(name, text, [NEGATIVE] * len(PROMPTS), negative=True)
    side = image_side(name)
    images = sample_family(pipe.transformer, **sampling_inputs(encoded, negative), height=side, width=side,
                           num_inference_steps=STEPS, guidance_scale=guidance_scale, seed=seed, decode=decode,
                           **kwargs)
    return (images / 2 + 0.5).clamp(0, 1) if decode else images


def test_pipeline_is_sample_family_on_encoded_prompts(family_pipe) -> None:
    """Bit for bit, with the family's default guidance and with true CFG 2 (FLUX.1 too, as FluxPipeline's
    true_cfg_scale), decoded and as the final Oklab sample; a seed's noise is sample_family's for that seed."""
    name, pipe = family_pipe
    assert torch.equal(run(pipe, name), reference(pipe, name))
    assert torch.equal(run(pipe, name, guidance_scale=2.0), reference(pipe, name, guidance_scale=2.0))
    assert torch.equal(run(pipe, name, output_type="latent"), reference(pipe, name, decode=False))
    assert not torch.equal(run(pipe, name, seed=6), run(pipe, name))
    side = image_side(name)
    out = pipe(PROMPTS[0], height=side, width=side, num_inference_steps=STEPS)
    assert out.images[0].size == (side, side) and out.nfe == STEPS and out.sigmas[-1] == 0.0
    per_prompt = pipe(PROMPTS[0], num_images_per_prompt=2, height=side, width=side, num_inference_steps=STEPS,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images
    listed = pipe([PROMPTS[0]] * 2, height=side, width=side, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images
    # the same up to the text encoders' fp32 rounding for batch 1 vs 2 (the pipeline repeats one encoding)
    torch.testing.assert_close(per_prompt, listed, rtol=0, atol=1e-5)
    assert not torch.equal(per_prompt[0], per_prompt[1])  # one noise draw per image


def test_cfg_convention_of_the_family(family_pipe) -> None:
    """SD3, Qwen-Image and Sana run true CFG by default (the negative prompt and the scale change the image);
    FLUX.1 (guidance-distilled, like FLUX.1-dev) runs without it by default and takes its guidance as input."""
    name, pipe = family_pipe
    defaults = get_family(name).sampler
    default = run(pipe, name)
    other_negative = run(pipe, name, negative_prompt="ugly")
    if name == "flux1":
        assert defaults.cfg_scale == 1.0
        assert torch.equal(other_negative, default)  # no negative branch: FluxPipeline's true_cfg_scale = 1
        assert not torch.equal(run(pipe, name, embedded_guidance=1.0), default)
        assert torch.equal(run(pipe, name, embedded_guidance=defaults.embedded_guidance), default)
    else:
        assert defaults.cfg_scale > 1.0
        assert not torch.equal(other_negative, default)  # the negative branch is used
        assert not torch.equal(run(pipe, name, guidance_scale=1.0), default)
        assert torch.equal(run(pipe, name, guidance_scale=defaults.cfg_scale), default)


def test_diffusers_from_pretrained_round_trip(family_pipe, tmp_path) -> None:
    """save_pretrained → diffusers' own DiffusionPipeline.from_pretrained: the same class, tensors and text encoding,
    images = sample_family on the loaded model bit for bit, and equal to the original's once the weights sit in
    ordinary (aligned) memory (loaded ones are memory-mapped from safetensors, which can move fp32 rounding)."""
    name, pipe = family_pipe
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers' own rule for custom pipeline code
        DiffusionPipeline.from_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "AsymFlowFamilyPipeline" and loaded.family.name == name
    assert type(loaded.transformer) is type(pipe.transformer)
    original, restored = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    for negative in (False, True):
        a, b = pipe.encode_prompt(PROMPTS, negative), loaded.encode_prompt(PROMPTS, negative)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(run(loaded, name), reference(loaded, name))
    with torch.no_grad():
        for p in loaded.transformer.parameters():
            p.data = p.data.clone()
    assert torch.equal(run(loaded, name), run(pipe, name))
    assert type(AsymFlowFamilyPipeline.from_pretrained(tmp_path)) is AsymFlowFamilyPipeline  # trusts our own shim


def test_refuses_other_models_and_components(family_pipe) -> None:
    name, pipe = family_pipe
    with pytest.raises(TypeError, match="AsymFlux2KleinPipeline"):  # a latent model is not a pixel model
        AsymFlowFamilyPipeline(build_tiny_family_transformer(name))
    if name in ("qwen_image", "sana"):
        with pytest.raises(ValueError, match="has no text component text_encoder_2"):
            AsymFlowFamilyPipeline(pipe.transformer, text_encoder_2=pipe.text_encoder)
    side = image_side(name)
    with pytest.raises(ValueError, match="multiples of the .* pixel patch"):
        pipe(PROMPTS[0], height=side + 8, width=side, num_inference_steps=STEPS)
