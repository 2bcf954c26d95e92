"""A family's text conditioning in one fixed shape per sample, as a `prep cache` stores it, so that a trainer can
stack any samples' text tensors.

`encode_family_prompts` returns what the family's pipeline passes its transformer. For most families that is already
fixed in shape (FLUX.1: T5 padded to max_sequence_length; SD3: 77 CLIP + T5 tokens; Sana: Gemma padded to
max_sequence_length with its mask), but Qwen-Image pads to the longest prompt of the batch and passes no mask when
nothing is padded. `fixed_length_text` pads the token sequence of a family with a `text_mask` to `length` with zeros
(the value the pipeline pads with) and always includes the mask (0 on the padding). Padding is invisible to the
transformer where it honours the mask (tests/data_prep/test_family_cache.py checks Qwen-Image's).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .core import ModelFamily

STATES = "encoder_hidden_states"  # the token sequence the mask covers (every family's name for it)


def fixed_length_text(family: ModelFamily, encoded: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """`encoded` (encode_family_prompts' output for `family`) → every tensor of `family.text_inputs`, in that order,
    with the token sequence and mask of a masked family padded to `length` and the mask present (pipeline dtype,
    torch.long). Families without a mask are returned as they are. ValueError for names the family does not take or
    a sequence already longer than `length`."""
    unknown = sorted(set(encoded) - set(family.text_inputs))
    if unknown:
        raise ValueError(f"{family.name} text has no input {', '.join(unknown)}; it takes {', '.join(family.text_inputs)}")
    out = dict(encoded)
    if family.text_mask is not None:
        states = out[STATES]
        batch, tokens = states.shape[:2]
        if tokens > length:
            raise ValueError(f"{family.name} text has {tokens} tokens, more than the fixed length {length}")
        mask = out.get(family.text_mask)
        if mask is None:  # the pipeline omits the mask when every token is real
            mask = torch.ones(batch, tokens, dtype=torch.long, device=states.device)
        out[STATES] = torch.nn.functional.pad(states, (0, 0, 0, length - tokens))
        out[family.text_mask] = torch.nn.functional.pad(mask, (0, length - tokens))
    missing = [name for name in family.text_inputs if name not in out]
    if missing:
        raise ValueError(f"{family.name} text lacks {', '.join(missing)}")
    return {name: out[name] for name in family.text_inputs}
