"""Oklab colour codec, the "pixel VAE" of AsymFLUX.2 (spec §10); images in [−1,1], [B,3,H,W]."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .precision import fp32_algebra

M1 = (
    (0.4122214708, 0.5363325363, 0.0514459929),
    (0.2119034982, 0.6806995451, 0.1073969566),
    (0.0883024619, 0.2817188376, 0.6299787005),
)
M2 = (
    (0.2104542553, 0.7936177850, -0.0040720468),
    (1.9779984951, -2.4285922050, 0.4505937099),
    (0.0259040371, 0.7827717662, -0.8086757660),
)
OKLAB_MEAN = (0.56, 0.0, 0.01)  # AsymFLUX.2 normalisation
OKLAB_STD = 0.16
# Below this a fractional power is replaced by a linear extension so its gradient stays finite at 0
# (d/dx x^{1/3} is infinite at 0; inf·0 would turn into NaN in the perceptual loss backward).
_EPS = 1e-8


def _matrix(rows: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).to(like.dtype if like.is_floating_point() else torch.float32).to(like.device)


def _apply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel 3×3 colour transform of [B,3,...]: einsum('ij,bj...->bi...')."""
    return torch.einsum("ij,bj...->bi...", m, x)


def _safe_pow(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x^e for x ≥ 0 with a finite gradient at 0: linear below _EPS, matched in value at _EPS."""
    x = x.clamp_min(0.0)
    safe = torch.where(x > _EPS, x, torch.full_like(x, _EPS))
    return torch.where(x > _EPS, safe.pow(exponent), x * (_EPS ** (exponent - 1.0)))


def _stats(mean: Sequence[float], std: float, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    m = torch.tensor(mean, dtype=like.dtype, device=like.device).view(1, 3, *([1] * (like.ndim - 2)))
    return m, float(std)


def _check_image(img: torch.Tensor) -> None:
    if img.ndim < 3 or img.shape[1] != 3:
        raise ValueError(f"expected images [B,3,...], got shape {tuple(img.shape)}")


@fp32_algebra
def oklab_encode(img: torch.Tensor, mean: Sequence[float] = OKLAB_MEAN, std: float = OKLAB_STD) -> torch.Tensor:
    """sRGB image in [−1,1] -> normalised Oklab (lab − mean)/std, same shape."""
    _check_image(img)
    x = img if img.dtype == torch.float64 else img.float()
    rgb = x / 2 + 0.5
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, _safe_pow((rgb + 0.055) / 1.055, 2.4))
    lms = _apply(_matrix(M1, x), lin).clamp_min(0.0)
    lab = _apply(_matrix(M2, x), _safe_pow(lms, 1.0 / 3.0))
    m, s = _stats(mean, std, x)
    return (lab - m) / s


@fp32_algebra
def oklab_decode(x: torch.Tensor, mean: Sequence[float] = OKLAB_MEAN, std: float = OKLAB_STD) -> torch.Tensor:
    """Normalised Oklab -> sRGB image in [−1,1] (linear light clamped to [0,1])."""
    _check_image(x)
    x = x if x.dtype == torch.float64 else x.float()
    m, s = _stats(mean, std, x)
    lab = x * s + m
    m2_inv = torch.linalg.inv(_matrix(M2, x))
    m1_inv = torch.linalg.inv(_matrix(M1, x))
    lms = _apply(m2_inv, lab) ** 3
    lin = _apply(m1_inv, lms).clamp(0.0, 1.0)
    rgb = torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * _safe_pow(lin, 1.0 / 2.4) - 0.055)
    return 2 * rgb - 1
