"""Small fixtures shared by asymflow tests: random orthonormal bases and flow samples."""
from __future__ import annotations

import torch


def random_basis(d: int = 768, r: int = 128, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal [d, r] from the QR of a Gaussian."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return q.to(dtype)


def flow_sample(b: int, n: int, d: int, sigma: float, seed: int = 1, dtype: torch.dtype = torch.float64):
    """x_0, ε and x_t = (1−σ)x_0 + σε as tokens [b, n, d], and σ [b]."""
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    s = torch.full((b,), sigma, dtype=dtype)
    x_t = (1 - sigma) * x_0 + sigma * eps
    return x_0, eps, x_t, s
