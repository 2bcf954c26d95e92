"""Time shifts and the training timestep sampler (spec §1.1, §1.2, §11.1)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


def warp(tau: torch.Tensor | float, shift: float | torch.Tensor) -> torch.Tensor:
    """σ = S·τ / (1 + (S − 1)·τ); S > 1 pushes mass toward noise."""
    tau = torch.as_tensor(tau)
    return shift * tau / (1 + (shift - 1) * tau)


def unwarp(sigma: torch.Tensor | float, shift: float | torch.Tensor) -> torch.Tensor:
    """Inverse of `warp`: τ = σ / (S + (1 − S)·σ)."""
    sigma = torch.as_tensor(sigma)
    return sigma / (shift + (1 - shift) * sigma)


@dataclass(frozen=True)
class DynamicShift:
    """Resolution-dependent shift S(L) between (L_b, S_b) and (L_m, S_m) (spec §1.2, §11.1).

    "exp":  log S linear in L.      "sqrt": S linear in √L.
    The released AsymFLUX.2 pipeline uses sqrt with L = H·W pixels, L_b = 1024², L_m = 2048², S 17 → 34.
    """

    kind: Literal["exp", "sqrt"] = "sqrt"
    base_len: float = 1024.0**2
    max_len: float = 2048.0**2
    base_shift: float = 17.0
    max_shift: float = 34.0

    def __call__(self, seq_len: float) -> float:
        if self.kind == "exp":
            lb, lm = math.log(self.base_shift), math.log(self.max_shift)
            return math.exp(lb + (seq_len - self.base_len) * (lm - lb) / (self.max_len - self.base_len))
        if self.kind == "sqrt":
            rb, rm = math.sqrt(self.base_len), math.sqrt(self.max_len)
            return self.base_shift + (math.sqrt(seq_len) - rb) * (self.max_shift - self.base_shift) / (rm - rb)
        raise ValueError(f"unknown dynamic shift kind {self.kind!r}; expected 'exp' or 'sqrt'")


def resolve_shift(shift: float | DynamicShift, seq_len: float | None) -> float:
    """A static shift, or the dynamic one evaluated at seq_len (which must then be given)."""
    if isinstance(shift, DynamicShift):
        if seq_len is None:
            raise ValueError("a dynamic shift needs the sequence length (H·W)")
        return shift(seq_len)
    return float(shift)


@dataclass(frozen=True)
class TimestepSampler:
    """Training σ sampler: τ = sigmoid(m + sd·n) (or U(0,1]), σ = warp(τ; S). One σ per sample."""

    logit_normal: bool = True
    mean: float = 0.0
    std: float = 1.0
    shift: float | DynamicShift = 17.0

    def sample(
        self, batch: int, generator: torch.Generator, seq_len: float | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """σ [batch] in fp32, drawn on CPU from `generator` (reproducible across devices), then moved."""
        if self.logit_normal:
            n = torch.randn(batch, generator=generator, dtype=torch.float64)
            tau = torch.sigmoid(self.mean + self.std * n)
        else:
            tau = 1.0 - torch.rand(batch, generator=generator, dtype=torch.float64)  # (0, 1]
        sigma = warp(tau, resolve_shift(self.shift, seq_len))
        return sigma.to(torch.float32).to(device)
