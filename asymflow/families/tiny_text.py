"""Tiny random text encoders and tokenizers of the non-FLUX.2 families, built in code (tests; no downloads).

Same model classes as the released checkpoints (transformers CLIPTextModel / CLIPTextModelWithProjection,
T5EncoderModel, Qwen2_5_VLForConditionalGeneration, Gemma2Model), so the family pipelines' `encode_prompt` runs on
them unchanged. Tokenizers are `PreTrainedTokenizerFast` on one word-level vocabulary (words, punctuation and "\\n"
are tokens; spaces are dropped) with each family's special tokens, padding and added tokens (CLIP: bos … eos, padded
to 77; T5: … </s>, pad id 0; Qwen: no specials, padded to the longest; Gemma: bos …). With it the Qwen-Image system
prefix is 34 tokens, as with Qwen's real tokenizer, so the pipeline's fixed drop of 34 tokens leaves the user prompt.
`build_tiny_text_components(family)` returns them under the diffusers pipeline's component names, in widths that
match `tiny.TINY_TRANSFORMER_CONFIGS` (text width 32, pooled width 16).
"""
from __future__ import annotations

from typing import Any

import torch

from .tiny import TINY_POOLED_WIDTH, TINY_TEXT_WIDTH

CLIP_MAX_LENGTH = 77  # CLIPTokenizer.model_max_length: FluxPipeline/StableDiffusion3Pipeline pad CLIP input to it
UNK = "<unk>"
_WORDS = (
    # QwenImagePipeline's system prompt (34 tokens with Qwen's chat specials and "\n"), a few prompt words
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background a an photo red blue green cat dog on in at with small large sleeping "
    "fluffy white sunny street city painting portrait ugly blurry low quality User Prompt Enhanced prompt "
    ", . : ; ! ? - ' ( ) \n"
).split(" ")
_PRE_TOKENIZER_PATTERN = r"\n|[^\s\w]|\w+"


def _word_tokenizer(specials: dict[str, str], template: str | None, model_max_length: int, **kwargs: Any):
    """A word-level fast tokenizer: `specials` (role → token, e.g. {"bos_token": "<s>"}) first in the vocabulary,
    then the words; `template` ("<s> $A </s>") adds the special tokens around every sequence."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    extra = kwargs.get("additional_special_tokens", [])
    for token in [*specials.values(), *extra, UNK, *_WORDS, *(w.lower() for w in _WORDS)]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_PRE_TOKENIZER_PATTERN), behavior="isolated"),
    ])
    if template is not None:
        used = {tok for tok in template.split() if tok in vocab}
        core.post_processor = processors.TemplateProcessing(single=template,
                                                            special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, model_max_length=model_max_length,
                                   **specials, **kwargs)


def build_tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's convention: <|startoftext|> … <|endoftext|>, max length 77 (SD3's CLIP-G tokenizer pads with "!")."""
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token}
    return _word_tokenizer(specials, "<|startoftext|> $A <|endoftext|>", CLIP_MAX_LENGTH)


def build_tiny_t5_tokenizer():
    """T5's convention: pad id 0, … </s>, no bos."""
    return _word_tokenizer({"pad_token": "<pad>", "eos_token": "</s>"}, "$A </s>", 512)


def build_tiny_qwen_tokenizer():
    """Qwen2's convention: no added tokens, <|endoftext|> pads; chat specials are single tokens."""
    specials = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    return _word_tokenizer(specials, None, 32768, additional_special_tokens=["<|im_start|>"], padding_side="right")


def build_tiny_gemma_tokenizer():
    """Gemma's convention: <bos> …, <pad> id 0, padded on the right by SanaPipeline."""
    specials = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}
    return _word_tokenizer(specials, "<bos> $A", 8192, padding_side="right")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def build_tiny_clip(tokenizer, hidden_size: int, projection_dim: int | None = None, seed: int = 0):
    """CLIPTextModel (pooled output = hidden_size wide), or CLIPTextModelWithProjection with `projection_dim`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=projection_dim or hidden_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return _seeded(seed, lambda: cls(config))


def build_tiny_t5(tokenizer, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=TINY_TEXT_WIDTH, d_kv=16, d_ff=64, num_layers=2,
                      num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return _seeded(seed, lambda: T5EncoderModel(config))


def build_tiny_qwen25_vl(tokenizer, seed: int = 0):
    """Qwen2_5_VLForConditionalGeneration (QwenImagePipeline's text encoder class) with a 1-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **ids)  # sections: head_dim/2 = 8
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TINY_TEXT_WIDTH,
                  fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))


def build_tiny_gemma2(tokenizer, seed: int = 0):
    """Gemma2Model (SanaPipeline's text encoder: the base model, whose first output is the last hidden state)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_WIDTH, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _seeded(seed, lambda: Gemma2Model(config))


def build_tiny_text_components(family: str, seed: int = 0) -> dict[str, Any]:
    """The family's tokenizers and text encoders under its diffusers pipeline's component names."""
    if family == "flux1":  # FluxPipeline: CLIP pooled (width = transformer pooled_projection_dim) + T5
        clip, t5 = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
        return {"tokenizer": clip, "text_encoder": build_tiny_clip(clip, TINY_POOLED_WIDTH, seed=seed),
                "tokenizer_2": t5, "text_encoder_2": build_tiny_t5(t5, seed=seed + 1)}
    if family == "sd3":  # CLIP-L + CLIP-G with projections (pooled 8 + 8), widths 8 + 16 padded to T5's 32
        clip_l, clip_g = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer(pad_token="!")
        t5 = build_tiny_t5_tokenizer()
        half = TINY_POOLED_WIDTH // 2
        return {"tokenizer": clip_l, "text_encoder": build_tiny_clip(clip_l, 8, half, seed=seed),
                "tokenizer_2": clip_g, "text_encoder_2": build_tiny_clip(clip_g, 16, half, seed=seed + 1),
                "tokenizer_3": t5, "text_encoder_3": build_tiny_t5(t5, seed=seed + 2)}
    if family == "qwen_image":
        tokenizer = build_tiny_qwen_tokenizer()
        return {"tokenizer": tokenizer, "text_encoder": build_tiny_qwen25_vl(tokenizer, seed=seed)}
    if family == "sana":
        tokenizer = build_tiny_gemma_tokenizer()
        return {"tokenizer": tokenizer, "text_encoder": build_tiny_gemma2(tokenizer, seed=seed)}
    raise ValueError(f"no tiny text components for family {family!r}; have flux1, qwen_image, sana, sd3")
