"""EMA of the trainable parameters with the Karras power schedule (spec §9)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def karras_beta(t: int | float, gamma: float = 7.0) -> float:
    """β(t) = (1 − 1/t)^(γ+1) for t ≥ 1: β(1) = 0 (copy), β(1000) ≈ 0.9920, β(14900) ≈ 0.99946 with γ = 7."""
    if t < 1:
        raise ValueError(f"EMA schedule time t must be ≥ 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class EMA:
    """fp32 shadow copy θ_ema of named tensors.

    update(step, θ): before `start_iter` θ_ema = θ; afterwards θ_ema ← β·θ_ema + (1−β)·θ with
    β = karras_beta(max(step + 1 − start_iter, 1), γ). Names in `copy_keys` (e.g. buffers) are always copied.
    The caller passes full (gathered) tensors; nothing here knows about sharding.
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        start_iter: int = 100,
        gamma: float = 7.0,
        copy_keys: Iterable[str] = (),
    ):
        self.start_iter = int(start_iter)
        self.gamma = float(gamma)
        self.copy_keys = frozenset(copy_keys)
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().float().clone() for k, v in params.items()}

    def beta(self, step: int) -> float:
        """Decay used at `step` (0 before start_iter, i.e. a plain copy)."""
        if step < self.start_iter:
            return 0.0
        return karras_beta(max(step + 1 - self.start_iter, 1), self.gamma)

    @torch.no_grad()
    def update(self, step: int, params: Mapping[str, torch.Tensor]) -> float:
        """Fold the current tensors into the shadow; returns the β used. Names must match the constructor's."""
        if params.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise KeyError(f"EMA update names differ from the tracked ones: missing {missing[:5]}, unexpected {extra[:5]}")
        beta = self.beta(step)
        for name, value in params.items():
            shadow = self.shadow[name]
            value = value.detach().to(shadow.device, torch.float32)
            if beta == 0.0 or name in self.copy_keys:
                shadow.copy_(value)
            else:
                shadow.lerp_(value, 1.0 - beta)  # θ_ema + (1−β)(θ − θ_ema) = β·θ_ema + (1−β)·θ
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors (contiguous fp32, safetensors-ready); the schedule is a function of the step only."""
        return {k: v.detach().clone().contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the shadow; names and shapes must match exactly."""
        if state.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - state.keys()), sorted(state.keys() - self.shadow.keys())
            raise KeyError(f"EMA state names differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name!r} has shape {tuple(value.shape)}, expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value.to(torch.float32))
