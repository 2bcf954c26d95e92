"""Prompt embeddings as FLUX.2 klein builds them: Qwen3 hidden states of several layers, stacked per token."""
from __future__ import annotations

from collections.abc import Sequence

import torch

KLEIN_HIDDEN_LAYERS = (9, 18, 27)
KLEIN_MAX_LENGTH = 512


@torch.no_grad()
def encode_prompts(
    text_encoder: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    hidden_layers: Sequence[int] = KLEIN_HIDDEN_LAYERS,
    max_length: int = KLEIN_MAX_LENGTH,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """prompts -> [B, max_length, len(hidden_layers)·hidden] (layer-major per token, as FLUX.2 klein).

    Each prompt is wrapped in the tokenizer's chat template (user turn, generation prompt, thinking off)
    and padded to max_length, exactly like the diffusers FLUX.2 klein pipeline.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for p in prompts
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
    device = next(text_encoder.parameters()).device
    out = text_encoder(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    n_states = len(out.hidden_states)
    bad = [k for k in hidden_layers if not 0 <= k < n_states]
    if bad:
        raise ValueError(f"hidden layers {bad} do not exist: the text encoder returns {n_states} hidden states")
    stacked = torch.stack([out.hidden_states[k] for k in hidden_layers], dim=1)  # [B, n, L, H]
    b, n, length, hidden = stacked.shape
    embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, n * hidden)  # einops 'b n l h -> b l (n h)'
    return embeds.to(dtype) if dtype is not None else embeds


@torch.no_grad()
def project_text(context_embedder: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """[B, L, joint_attention_dim] -> [B, L, inner]: the transformer's first op on its text, done ahead of time.

    Exactly what `AsymFlux2Transformer2DModel._backbone` computes (a cast to the layer's dtype, then a call of the
    module), so a model given this output with `text_projected=True` sees the very tensor it would have computed.
    Valid only while the layer is frozen (LoRA training: it is neither a LoRA target nor fully trained).
    """
    dtype = next(context_embedder.parameters()).dtype
    return context_embedder(embeds.to(dtype))
