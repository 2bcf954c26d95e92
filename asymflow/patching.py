"""Patchify / unpatchify and pack / unpack in the two feature orders of spec §2."""
from __future__ import annotations

from typing import Literal

import torch

FeatureOrder = Literal["channel_first", "channel_last"]


def check_divisible(height: int, width: int, p: int, what: str = "image") -> None:
    """Raise a ValueError naming the sizes when an image cannot be cut into p×p patches."""
    if p <= 0:
        raise ValueError(f"patch size must be positive, got {p}")
    if height % p or width % p:
        raise ValueError(
            f"{what} size {height}x{width} is not divisible by the patch size {p}; "
            f"use sides that are multiples of {p}"
        )


def patchify(x: torch.Tensor, p: int, order: FeatureOrder = "channel_first") -> torch.Tensor:
    """[B,C,H,W] -> tokens [B,(H/p)(W/p),C·p²], tokens row-major.

    channel_first feature index: c·p² + i·p + j (FLUX.2, Procrustes);
    channel_last feature index: (i·p + j)·C + c (DiT / PCA tool).
    einops: 'b c (h i) (w j) -> b (h w) (c i j)' resp. '-> b (h w) (i j c)'.
    """
    if x.ndim != 4:
        raise ValueError(f"patchify expects [B,C,H,W], got shape {tuple(x.shape)}")
    b, c, height, width = x.shape
    check_divisible(height, width, p)
    h, w = height // p, width // p
    x = x.reshape(b, c, h, p, w, p)
    if order == "channel_first":
        x = x.permute(0, 2, 4, 1, 3, 5)  # b h w c i j
    elif order == "channel_last":
        x = x.permute(0, 2, 4, 3, 5, 1)  # b h w i j c
    else:
        raise ValueError(f"unknown feature order {order!r}; expected 'channel_first' or 'channel_last'")
    return x.reshape(b, h * w, c * p * p)


def unpatchify(
    tokens: torch.Tensor, p: int, height: int, width: int, order: FeatureOrder = "channel_first"
) -> torch.Tensor:
    """Exact inverse of `patchify`: tokens [B,N,C·p²] -> [B,C,H,W]."""
    if tokens.ndim != 3:
        raise ValueError(f"unpatchify expects tokens [B,N,D], got shape {tuple(tokens.shape)}")
    check_divisible(height, width, p)
    b, n, d = tokens.shape
    h, w = height // p, width // p
    if n != h * w:
        raise ValueError(f"{n} tokens do not tile a {height}x{width} image with patch {p} ({h * w} expected)")
    if d % (p * p):
        raise ValueError(f"token dim {d} is not a multiple of p²={p * p}")
    c = d // (p * p)
    if order == "channel_first":
        x = tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # b c h i w j
    elif order == "channel_last":
        x = tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    else:
        raise ValueError(f"unknown feature order {order!r}; expected 'channel_first' or 'channel_last'")
    return x.reshape(b, c, height, width)


def patchify_grid(x: torch.Tensor, p: int) -> torch.Tensor:
    """Channel-first patchify kept as a grid: [B,C,H,W] -> [B,C·p²,H/p,W/p] (FLUX.2 `_patchify_latents`)."""
    b, c, height, width = x.shape
    check_divisible(height, width, p)
    x = x.reshape(b, c, height // p, p, width // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, height // p, width // p)


def unpatchify_grid(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify_grid`: [B,C·p²,h,w] -> [B,C,h·p,w·p]."""
    b, d, h, w = x.shape
    c = d // (p * p)
    x = x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * p, w * p)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B,D,h,w] -> [B,h·w,D], tokens row-major (einops 'b d h w -> b (h w) d')."""
    b, d, h, w = x.shape
    return x.reshape(b, d, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B,h·w,D] -> [B,D,h,w] (einops 'b (h w) d -> b d h w')."""
    b, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens cannot be unpacked to a {h}x{w} grid")
    return tokens.permute(0, 2, 1).reshape(b, d, h, w)


def patchify_unpacked_channels(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,p²,H/p,W/p]: channel axis kept apart from the p² pixels of each patch (spec §2, §8)."""
    b, c, height, width = x.shape
    check_divisible(height, width, p)
    x = x.reshape(b, c, height // p, p, width // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c, p * p, height // p, width // p)


def unpatchify_unpacked_channels(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify_unpacked_channels`: [B,C,p²,h,w] -> [B,C,h·p,w·p]."""
    b, c, pp, h, w = x.shape
    if pp != p * p:
        raise ValueError(f"axis 2 has {pp} pixels, expected p²={p * p}")
    return x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)


def image_position_ids(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """FLUX.2 RoPE ids (t=0, row, col, l=0) of an h×w token grid: [h·w, 4]; same for latent and pixel grids."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def condition_position_ids(h: int, w: int, index: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE ids (t = 10·(index+1), row, col, l=0) of the index-th reference image's h×w token grid: [h·w, 4]
    (FLUX.2's `_prepare_image_ids`, spec §5.4): each reference sits at its own time offset after the target (t=0)."""
    ids = image_position_ids(h, w, device=device)
    ids[:, 0] = 10 * (index + 1)
    return ids


def text_position_ids(length: int, device: torch.device | None = None) -> torch.Tensor:
    """FLUX.2 RoPE ids of a text sequence (t=0, 0, 0, l): [L, 4]."""
    l = torch.arange(length, device=device)
    zeros = torch.zeros_like(l)
    return torch.stack([zeros, zeros, zeros, l], dim=-1)
