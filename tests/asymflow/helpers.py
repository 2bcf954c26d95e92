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


def seamless_errors_from_outputs(
    x_t: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, u: torch.Tensor, z0: torch.Tensor,
    basis: torch.Tensor, scale: float, p: int,
) -> tuple[float, float]:
    """Spec §5.3 item 1 from a pixel model's outputs: (‖x̂_0 − s·B·ẑ_0‖, ‖P⊥x̂_0‖) relative to ‖s·B·ẑ_0‖, worst sample.

    x_t, x0 (predict_x0) and u (velocity) are images [B,3,H,W]; z0 = ẑ_0 latent tokens [B,N,r]; x̂_0 is checked both
    as the x0 output and as x_t − σ·û.
    """
    from asymflow.patching import patchify

    batch = x_t.shape[0]
    basis64 = basis.to(torch.float64)
    expected = (scale * z0.to(torch.float64)) @ basis64.T
    x0 = patchify(x0, p).to(torch.float64)
    x0_from_u = patchify(x_t, p).to(torch.float64) - sigma.to(torch.float64).view(batch, 1, 1) * patchify(u, p)

    def rel(a: torch.Tensor) -> float:
        return (a.flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)).max().item()

    return max(rel(x0 - expected), rel(x0_from_u - expected)), rel(x0 - x0 @ basis64 @ basis64.T)


def saved_for_backward_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, leaving out those of `exclude`
    (e.g. a frozen network's weights); a storage saved by several ops counts once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())
