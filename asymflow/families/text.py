"""Prompt encoding per model family: the text conditioning each family's transformer takes, as its diffusers
pipeline's `encode_prompt` builds it (issue 15). Written from the pipelines' source (cited per family), not copied;
tests/asymflow/test_families_text.py checks bitwise equality with each pipeline's own `encode_prompt`.

`encode_family_prompts(family, text_components, prompts)` returns the transformer's keyword arguments:
  flux2:      encoder_hidden_states [B,L,3·H] (asymflow.text.encode_prompts: Qwen3 layers, chat template);
  flux1:      encoder_hidden_states (T5, padded to 512) + pooled_projections (CLIPTextModel's pooled output);
  sd3:        encoder_hidden_states (CLIP-L ‖ CLIP-G penultimate states zero-padded to T5's width, then T5 states
              along the sequence: 77 + 256 tokens) + pooled_projections (CLIP-L ‖ CLIP-G projected pooled);
  qwen_image: encoder_hidden_states (Qwen2.5-VL last states of the templated prompt, system prefix dropped, padded to
              the longest) + encoder_hidden_states_mask (absent when no token is padding, as the pipeline's None);
  sana:       encoder_hidden_states (Gemma-2 last states, 300 tokens) + encoder_attention_mask.
`negative=True` encodes negative prompts the way the pipeline does for true CFG (Sana: without the complex human
instruction; the other families: as prompts). `text_components` maps the pipeline's component names ("tokenizer",
"text_encoder", "tokenizer_2", …) to objects, e.g. a pipeline's `.components`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Components = Mapping[str, Any]
Encoded = dict[str, torch.Tensor]

# QwenImagePipeline.__init__ (diffusers/pipelines/qwenimage/pipeline_qwenimage.py): prompt_template_encode and
# prompt_template_encode_start_idx, the number of leading tokens (the system turn) dropped from the states.
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_DROP = 34
QWEN_IMAGE_TOKENIZER_MAX = 1024  # QwenImagePipeline.tokenizer_max_length


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _clip(tokenizer, encoder, prompts: list[str], layer: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """CLIP on prompts padded to the tokenizer's model_max_length (77), no attention mask: (hidden_states[layer], or
    None without a layer; the pooled eos state — CLIPTextModelWithProjection's projected text_embeds)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(_device(encoder)), output_hidden_states=layer is not None)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return (None if layer is None else out.hidden_states[layer]), pooled


def _t5(tokenizer, encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    """T5 last hidden states of prompts padded to max_length, no attention mask (FluxPipeline, SD3)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(_device(encoder)))[0].to(encoder.dtype)


def _flux2(c: Components, prompts: list[str], negative: bool, max_sequence_length: int = 512,
           text_encoder_out_layers: Sequence[int] = (9, 18, 27)) -> Encoded:
    # diffusers/pipelines/flux2/pipeline_flux2_klein.py: Flux2KleinPipeline._get_qwen3_prompt_embeds (negatives,
    # "" by default, the same way); asymflow.text.encode_prompts is that encoding
    from asymflow.text import encode_prompts

    encoder = c["text_encoder"]
    return {"encoder_hidden_states": encode_prompts(encoder, c["tokenizer"], prompts, text_encoder_out_layers,
                                                    max_sequence_length, dtype=encoder.dtype)}


def _flux1(c: Components, prompts: list[str], negative: bool, max_sequence_length: int = 512) -> Encoded:
    # diffusers/pipelines/flux/pipeline_flux.py: FluxPipeline._get_clip_prompt_embeds (pooler_output, cast to the
    # CLIP encoder's dtype) and _get_t5_prompt_embeds; negatives for true CFG go through encode_prompt the same way
    _, pooled = _clip(c["tokenizer"], c["text_encoder"], prompts)
    return {"encoder_hidden_states": _t5(c["tokenizer_2"], c["text_encoder_2"], prompts, max_sequence_length),
            "pooled_projections": pooled.to(c["text_encoder"].dtype)}


def _sd3(c: Components, prompts: list[str], negative: bool, max_sequence_length: int = 256,
         clip_skip: int | None = None) -> Encoded:
    # diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py: StableDiffusion3Pipeline.encode_prompt
    # (_get_clip_prompt_embeds for clip_model_index 0 and 1, _get_t5_prompt_embeds); the negative branch always
    # takes the penultimate layer (clip_skip None)
    skip = 0 if negative or clip_skip is None else clip_skip
    states, pooled = [], []
    for index in ("", "_2"):
        hidden, pool = _clip(c["tokenizer" + index], c["text_encoder" + index], prompts, layer=-(skip + 2))
        states.append(hidden.to(c["text_encoder"].dtype))  # both cast to CLIP-L's dtype, as the pipeline does
        pooled.append(pool)
    t5 = _t5(c["tokenizer_3"], c["text_encoder_3"], prompts, max_sequence_length)
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}


def _qwen_image(c: Components, prompts: list[str], negative: bool, max_sequence_length: int = 512) -> Encoded:
    # diffusers/pipelines/qwenimage/pipeline_qwenimage.py: QwenImagePipeline._get_qwen_prompt_embeds and
    # encode_prompt (max_sequence_length: __call__'s default 512); negatives are encoded the same way
    tokenizer, encoder = c["tokenizer"], c["text_encoder"]
    texts = [QWEN_IMAGE_TEMPLATE.format(p) for p in prompts]
    tokens = tokenizer(texts, max_length=QWEN_IMAGE_TOKENIZER_MAX + QWEN_IMAGE_DROP, padding=True, truncation=True,
                       return_tensors="pt").to(_device(encoder))
    last = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                   output_hidden_states=True).hidden_states[-1]
    keep = tokens.attention_mask.bool()
    per_prompt = [last[i][keep[i]][QWEN_IMAGE_DROP:] for i in range(len(prompts))]  # real tokens, template dropped
    width = max(len(states) for states in per_prompt)
    embeds = last.new_zeros(len(prompts), width, last.shape[-1])
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=last.device)
    for i, states in enumerate(per_prompt):
        embeds[i, : len(states)] = states
        mask[i, : len(states)] = 1
    embeds, mask = embeds.to(encoder.dtype)[:, :max_sequence_length], mask[:, :max_sequence_length]
    encoded = {"encoder_hidden_states": embeds}
    if not mask.all():  # the pipeline passes no mask when every token is real
        encoded["encoder_hidden_states_mask"] = mask
    return encoded


def sana_default_instruction() -> list[str]:
    """SanaPipeline.__call__'s default complex_human_instruction, read from its signature (never a stale copy)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def _sana(c: Components, prompts: list[str], negative: bool, max_sequence_length: int = 300,
          complex_human_instruction: Sequence[str] | None = None) -> Encoded:
    # diffusers/pipelines/sana/pipeline_sana.py: SanaPipeline._get_gemma_prompt_embeds and encode_prompt with
    # clean_caption=False (lower-cased, stripped prompts). The instruction is prepended to prompts (not negatives),
    # the window widened by its length − 2, and the first token plus the last max_sequence_length − 1 are kept.
    tokenizer, encoder = c["tokenizer"], c["text_encoder"]
    tokenizer.padding_side = "right"  # the pipeline sets it too
    texts = [p.lower().strip() for p in prompts]
    if complex_human_instruction is None:
        complex_human_instruction = sana_default_instruction()
    instruction = "\n".join(complex_human_instruction) if complex_human_instruction and not negative else ""
    length = max_sequence_length
    if instruction:
        texts = [instruction + t for t in texts]
        length = len(tokenizer.encode(instruction)) + max_sequence_length - 2
    tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(_device(encoder))
    embeds = encoder(tokens.input_ids.to(_device(encoder)), attention_mask=mask)[0].to(encoder.dtype)
    if not negative:
        keep = [0, *range(-max_sequence_length + 1, 0)]
        embeds, mask = embeds[:, keep], mask[:, keep]
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


_ONE = ("tokenizer", "text_encoder")
_TWO = (*_ONE, "tokenizer_2", "text_encoder_2")
REQUIRED: dict[str, tuple[str, ...]] = {  # the pipeline's component names each encoding reads
    "flux2": _ONE, "flux1": _TWO, "sd3": (*_TWO, "tokenizer_3", "text_encoder_3"), "qwen_image": _ONE, "sana": _ONE,
}
ENCODERS: dict[str, Callable[..., Encoded]] = {
    "flux2": _flux2, "flux1": _flux1, "sd3": _sd3, "qwen_image": _qwen_image, "sana": _sana,
}


@torch.no_grad()
def encode_family_prompts(family: str, text_components: Components, prompts: str | Sequence[str], *,
                          negative: bool = False, **options: Any) -> Encoded:
    """Prompts → the family's text conditioning (see the module docstring). `options`: the pipeline's encoding
    arguments — max_sequence_length (all families; each pipeline's __call__ default), clip_skip (sd3),
    complex_human_instruction (sana; [] turns it off), text_encoder_out_layers (flux2)."""
    from .registry import get_family

    name = get_family(family).name
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    encoder = ENCODERS[name]
    accepted = list(inspect.signature(encoder).parameters)[3:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{name} prompt encoding has no option {', '.join(unknown)}; it takes {', '.join(accepted)}")
    missing = [key for key in REQUIRED[name] if text_components.get(key) is None]
    if missing:
        raise ValueError(f"{name} prompt encoding needs text components {', '.join(missing)} "
                         f"(the {get_family(name).title} pipeline's names); got {sorted(text_components)}")
    return encoder(text_components, prompts, negative, **options)


def sampling_inputs(encoded: Encoded, negative: Encoded | None = None) -> dict[str, Any]:
    """`families.sampling.sample_family` keyword arguments from encoded prompts (and negatives for true CFG)."""
    if negative is not None and len(negative["encoder_hidden_states"]) != len(encoded["encoder_hidden_states"]):
        raise ValueError(f"{len(negative['encoder_hidden_states'])} negative prompts for "
                         f"{len(encoded['encoder_hidden_states'])} prompts: encode one negative per prompt")
    rest = dict(encoded)
    inputs: dict[str, Any] = {"prompt_embeds": rest.pop("encoder_hidden_states"), "conditioning": rest}
    if negative is not None:
        neg_rest = dict(negative)
        inputs.update(negative_prompt_embeds=neg_rest.pop("encoder_hidden_states"), negative_conditioning=neg_rest)
    return inputs


__all__ = [
    "ENCODERS", "QWEN_IMAGE_TEMPLATE", "REQUIRED", "encode_family_prompts", "sampling_inputs",
    "sana_default_instruction",
]
