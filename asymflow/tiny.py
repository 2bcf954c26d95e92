"""Tiny FLUX.2-klein-shaped models built in code from fixed seeds: transformer, VAE, Qwen3 text encoder, tokenizer.

Same classes as the real models (diffusers Flux2Transformer2DModel / AutoencoderKLFlux2, transformers
Qwen3ForCausalLM, a byte-level BPE fast tokenizer), so every code path that loads real weights is exercised;
nothing is downloaded. Used by tests, the demo and `configs/tiny.yaml`.
"""
from __future__ import annotations

import torch

TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = (1, 2, 3)  # hidden states stacked like klein's (9, 18, 27)
TINY_MAX_LENGTH = 32

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=128,  # 32 latent channels × 2×2 packing, as in FLUX.2
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=TINY_TEXT_HIDDEN * len(TINY_TEXT_LAYERS),
    timestep_guidance_channels=64,
    mlp_ratio=3.0,
    axes_dims_rope=(8, 8, 8, 8),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 16, 16, 16),  # 8× down, like FLUX.2's VAE
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=8,
    mid_block_add_attention=False,
)

TINY_TEXT_CONFIG = dict(
    hidden_size=TINY_TEXT_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")



def build_tiny_transformer(seed: int = 0, **overrides) -> "torch.nn.Module":
    """A random FLUX.2-klein-shaped latent transformer (2 double + 2 single blocks), deterministic in seed."""
    from diffusers import Flux2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flux2Transformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides})
    return model.eval()


def build_tiny_vae(seed: int = 0, **overrides) -> "torch.nn.Module":
    """A random AutoencoderKLFlux2 (8× down, 32 latent channels) with identity latent statistics."""
    from diffusers import AutoencoderKLFlux2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(**{**TINY_VAE_CONFIG, **overrides})
    return vae.eval()


def build_tiny_tokenizer():
    """A byte-level BPE fast tokenizer (256 byte tokens + Qwen chat specials) with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_text_encoder(seed: int = 0, vocab_size: int | None = None) -> "torch.nn.Module":
    """A random 3-layer Qwen3ForCausalLM whose vocabulary matches `build_tiny_tokenizer()`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if vocab_size is None:
        vocab_size = len(build_tiny_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, **TINY_TEXT_CONFIG))
    return model.eval()
