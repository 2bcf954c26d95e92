"""Prompt encoding per family (issue 15): families.text.encode_family_prompts gives, bit for bit, what each diffusers
pipeline's own encode_prompt gives — FluxPipeline, StableDiffusion3Pipeline, QwenImagePipeline and SanaPipeline built
from tiny text encoders/tokenizers of the released classes and the family's tiny transformer and VAE — for a batch of
two prompts of different lengths and for the negative prompts of true CFG; and sampling runs on what it encodes."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    QwenImagePipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
)

from asymflow.families import get_family
from asymflow.families.conversion import convert_family_transformer
from asymflow.families.sampling import sample_family
from asymflow.families.text import encode_family_prompts, sampling_inputs, sana_default_instruction
from asymflow.families.tiny import TINY_TEXT_WIDTH, build_tiny_family_transformer, build_tiny_family_vae
from asymflow.families.tiny_text import CLIP_MAX_LENGTH, build_tiny_text_components
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)
from tests.asymflow.test_families_convert import image_size

PIPELINES = {"flux1": FluxPipeline, "sd3": StableDiffusion3Pipeline, "qwen_image": QwenImagePipeline,
             "sana": SanaPipeline}
PROMPTS = ["a red cat sleeping on a sunny street", "dog"]  # 8 and 1 words of the tiny word-level vocabulary
NEGATIVES = ["blurry", "ugly low quality photo"]  # 1 and 4 words
QWEN_SUFFIX = 5  # "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n" after the prompt in Qwen-Image's template


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def family_pipeline(request):
    """(name, text components, the family's real diffusers pipeline built on them, its tiny transformer and VAE)."""
    name = request.param
    components = build_tiny_text_components(name)
    scheduler = (DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
                 if name == "sana" else FlowMatchEulerDiscreteScheduler())
    pipe = PIPELINES[name](transformer=build_tiny_family_transformer(name), vae=build_tiny_family_vae(name),
                           scheduler=scheduler, **components)
    return name, components, pipe


@torch.no_grad()  # as the pipelines' __call__ runs it: autograd mode changes CPU attention kernels' last bits
def pipeline_encoding(name: str, pipe, prompts: list[str], negatives: list[str]) -> tuple[dict, dict]:
    """The pipeline's encode_prompt outputs under the transformer's argument names (conditional, negative)."""
    if name == "flux1":  # FluxPipeline.__call__ encodes the negative prompt with encode_prompt as well
        embeds, pooled, _ = pipe.encode_prompt(prompts, None)
        neg_embeds, neg_pooled, _ = pipe.encode_prompt(negatives, None)
        return ({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled})
    if name == "sd3":
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, negative_prompt=negatives)
        return ({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled})
    if name == "qwen_image":  # __call__'s max_sequence_length 512; a None mask means no padding
        out = [pipe.encode_prompt(p, max_sequence_length=512) for p in (prompts, negatives)]
        return tuple({"encoder_hidden_states": embeds, **({} if mask is None else {"encoder_hidden_states_mask": mask})}
                     for embeds, mask in out)
    embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
        prompts, negative_prompt=negatives, complex_human_instruction=sana_default_instruction())
    return ({"encoder_hidden_states": embeds, "encoder_attention_mask": mask},
            {"encoder_hidden_states": neg_embeds, "encoder_attention_mask": neg_mask})


def assert_bitwise(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def test_encoding_is_the_pipelines_encode_prompt(family_pipeline) -> None:
    name, components, pipe = family_pipeline
    ours = encode_family_prompts(name, components, PROMPTS)
    negative = encode_family_prompts(name, components, NEGATIVES, negative=True)
    theirs, theirs_negative = pipeline_encoding(name, pipe, PROMPTS, NEGATIVES)
    assert_bitwise(ours, theirs)
    assert_bitwise(negative, theirs_negative)
    # a pipeline's components dict works as text_components too
    assert_bitwise(encode_family_prompts(name, pipe.components, PROMPTS), theirs)
    if name == "sd3":  # clip_skip picks an earlier CLIP layer for prompts, never for the negatives
        with torch.no_grad():
            skipped, skipped_negative, _, _ = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=NEGATIVES,
                                                                 clip_skip=1)
        ours = encode_family_prompts(name, components, PROMPTS, clip_skip=1)
        assert torch.equal(ours["encoder_hidden_states"], skipped)
        assert not torch.equal(skipped, theirs["encoder_hidden_states"])
        assert torch.equal(encode_family_prompts(name, components, NEGATIVES, negative=True, clip_skip=1)
                           ["encoder_hidden_states"], skipped_negative)


def test_mixed_dtypes_are_cast_as_the_pipeline_casts(family_pipeline) -> None:
    """Encoders in other dtypes (FLUX.1: bf16 T5, fp32 CLIP; SD3: bf16 CLIP-L and T5, fp32 CLIP-G; a bf16 LLM): the
    outputs' dtypes and values are the pipeline's (SD3 casts both CLIP states to CLIP-L's dtype, not the pooled)."""
    name, components, pipe = family_pipeline
    components = copy.deepcopy(components)
    half = {"flux1": ("text_encoder_2",), "sd3": ("text_encoder", "text_encoder_3")}.get(name, ("text_encoder",))
    for key in half:
        components[key].to(torch.bfloat16)
    mixed = PIPELINES[name](transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, **components)
    theirs, theirs_negative = pipeline_encoding(name, mixed, PROMPTS, NEGATIVES)
    assert_bitwise(encode_family_prompts(name, components, PROMPTS), theirs)
    assert_bitwise(encode_family_prompts(name, components, NEGATIVES, negative=True), theirs_negative)
    # SD3: CLIP-G's fp32 states cast to CLIP-L's bf16 before joining bf16 T5; bf16 ‖ fp32 pooled promotes to fp32
    assert theirs["encoder_hidden_states"].dtype == torch.bfloat16
    if name in ("flux1", "sd3"):
        assert theirs["pooled_projections"].dtype == torch.float32


def test_layout_follows_the_family_convention(family_pipeline) -> None:
    """Shapes, padding and masks by each pipeline's documented steps, counted from the prompts' words."""
    name, components, _ = family_pipeline
    ours = encode_family_prompts(name, components, PROMPTS)
    negative = encode_family_prompts(name, components, NEGATIVES, negative=True)
    states = ours["encoder_hidden_states"]
    if name == "flux1":  # T5 padded to 512; pooled = CLIP width = transformer pooled_projection_dim
        assert states.shape == (2, 512, TINY_TEXT_WIDTH) and ours["pooled_projections"].shape == (2, 16)
    elif name == "sd3":  # 77 CLIP tokens (8 + 16 = 24 wide, zero-padded to T5's 32) then 256 T5 tokens
        assert states.shape == (2, CLIP_MAX_LENGTH + 256, TINY_TEXT_WIDTH)
        assert torch.count_nonzero(states[:, :CLIP_MAX_LENGTH, 24:]) == 0
        assert torch.count_nonzero(states[:, :CLIP_MAX_LENGTH, :24] == 0) == 0
        ids = components["tokenizer_3"](PROMPTS, padding="max_length", max_length=256, return_tensors="pt").input_ids
        with torch.no_grad():
            t5 = components["text_encoder_3"](ids).last_hidden_state
        assert torch.equal(states[:, CLIP_MAX_LENGTH:], t5)
        assert ours["pooled_projections"].shape == (2, 8 + 8)
    elif name == "qwen_image":  # system prefix dropped: prompt words + the template's 5 closing tokens, right-padded
        lengths = [len(p.split()) + QWEN_SUFFIX for p in PROMPTS]
        assert ours["encoder_hidden_states_mask"].sum(1).tolist() == lengths
        assert states.shape == (2, max(lengths), TINY_TEXT_WIDTH)
        assert torch.count_nonzero(states[1, lengths[1]:]) == 0 and torch.count_nonzero(states[1, : lengths[1]]) > 0
        assert negative["encoder_hidden_states_mask"].sum(1).tolist() == [len(p.split()) + QWEN_SUFFIX
                                                                           for p in NEGATIVES]
        single = encode_family_prompts(name, components, PROMPTS[:1])  # no padding: no mask, as the pipeline
        assert "encoder_hidden_states_mask" not in single and pipe_mask_is_none(family_pipeline[2])
    else:  # Sana: 300 tokens; kept: the first (<bos>) and the last 299 of instruction + prompt, i.e. the
        # instruction's last token ":" and the prompt's words; negatives without instruction: <bos> + words
        assert states.shape == (2, 300, TINY_TEXT_WIDTH)
        assert ours["encoder_attention_mask"].sum(1).tolist() == [1 + 1 + len(p.split()) for p in PROMPTS]
        assert negative["encoder_attention_mask"].sum(1).tolist() == [1 + len(p.split()) for p in NEGATIVES]
        plain = encode_family_prompts(name, components, PROMPTS, complex_human_instruction=[])
        assert plain["encoder_attention_mask"].sum(1).tolist() == [1 + len(p.split()) for p in PROMPTS]
        assert not torch.equal(plain["encoder_hidden_states"], states)  # the instruction conditions the states


@torch.no_grad()
def pipe_mask_is_none(pipe) -> bool:
    return pipe.encode_prompt(PROMPTS[:1], max_sequence_length=512)[1] is None


@torch.no_grad()
def test_flux2_is_the_klein_pipelines_encode_prompt() -> None:
    """FLUX.2 goes through asymflow.text.encode_prompts: Flux2KleinPipeline's encoding (negatives the same way)."""
    from diffusers import Flux2KleinPipeline

    from asymflow.tiny import (
        TINY_MAX_LENGTH,
        TINY_TEXT_HIDDEN,
        TINY_TEXT_LAYERS,
        build_tiny_text_encoder,
        build_tiny_tokenizer,
        build_tiny_transformer,
        build_tiny_vae,
    )

    components = {"tokenizer": build_tiny_tokenizer(), "text_encoder": build_tiny_text_encoder()}
    pipe = Flux2KleinPipeline(FlowMatchEulerDiscreteScheduler(), build_tiny_vae(), transformer=build_tiny_transformer(),
                              **components)
    options = dict(max_sequence_length=TINY_MAX_LENGTH, text_encoder_out_layers=TINY_TEXT_LAYERS)
    for prompts in (PROMPTS, ["", ""]):
        theirs, _ = pipe.encode_prompt(prompts, **options)
        ours = encode_family_prompts("flux2", components, prompts, **options)
        assert_bitwise(ours, {"encoder_hidden_states": theirs})
        assert theirs.shape == (2, TINY_MAX_LENGTH, len(TINY_TEXT_LAYERS) * TINY_TEXT_HIDDEN)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="flux1"):
        encode_family_prompts("sdxl", {}, PROMPTS)
    with pytest.raises(ValueError, match="no prompts"):
        encode_family_prompts("sd3", {}, [])
    flux1 = build_tiny_text_components("flux1")
    del flux1["text_encoder_2"]
    with pytest.raises(ValueError, match="text_encoder_2"):
        encode_family_prompts("flux1", flux1, PROMPTS)
    with pytest.raises(ValueError, match="no option clip_skip; it takes max_sequence_length"):
        encode_family_prompts("flux1", flux1, PROMPTS, clip_skip=1)
    encoded = {"encoder_hidden_states": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        sampling_inputs(encoded, {"encoder_hidden_states": torch.zeros(1, 3, 4)})


def test_sampling_from_encoded_prompts(family_pipeline) -> None:
    """sample_family runs on the encoded prompts with the family's true CFG; another prompt gives another image.
    SD3: the sample from our tensors is the sample from the tensors the pipeline's encode_prompt gave."""
    name, components, pipe = family_pipeline
    family = get_family(name)
    latent = build_tiny_family_transformer(name)
    pixel = convert_family_transformer(family, latent, random_basis(family.pixel_dim, family.latent_dim), 1.0)
    H, W = image_size(name)
    run = dict(height=H, width=W, num_inference_steps=2, guidance_scale=2.0, seed=0)
    negative = encode_family_prompts(name, components, NEGATIVES, negative=True)
    images = sample_family(pixel, **sampling_inputs(encode_family_prompts(name, components, PROMPTS), negative), **run)
    assert images.shape == (2, 3, H, W) and torch.isfinite(images).all()
    swapped = sample_family(pixel, **sampling_inputs(encode_family_prompts(name, components, PROMPTS[::-1]),
                                                     negative), **run)
    assert not torch.equal(images[0], swapped[0])
    if name == "sd3":
        theirs, theirs_negative = pipeline_encoding(name, pipe, PROMPTS, NEGATIVES)
        assert torch.equal(images, sample_family(pixel, **sampling_inputs(theirs, theirs_negative), **run))
