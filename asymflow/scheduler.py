"""FlowAdapter scheduler: diffusers UniPC or plain Euler driven by an external shifted flow schedule (spec §11.1)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .timesteps import DynamicShift, resolve_shift, warp

Solver = Literal["unipc", "euler"]

# UniPC works in log-SNR λ = log((1−σ)/σ); σ = 1 would give log(0) at the first step (spec §11.1).
UNIPC_MAX_SIGMA = 1.0 - 1e-4


def flow_sigmas(num_inference_steps: int, shift: float) -> torch.Tensor:
    """σ grid [n+1] in fp64: τ_i = linspace(1, 0, n, endpoint=False), σ_i = warp(τ_i; S), σ_n = 0.

    warp(τ; S) = S·τ / (1 + (S−1)·τ).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
    tau = 1.0 - torch.arange(num_inference_steps, dtype=torch.float64) / num_inference_steps
    return torch.cat([warp(tau, shift), tau.new_zeros(1)])


class FlowAdapterScheduler(SchedulerMixin, ConfigMixin):
    """Samples x_t = (1−σ)·x_0 + σ·ε from σ = 1 to 0 with velocity u = ε − x_0 passed through unchanged.

    solver="unipc": diffusers' UniPCMultistepScheduler in flow mode (its data prediction is x̂_0 = x_t − σ·u),
        created with prediction_type="flow_prediction", use_flow_sigmas=True, final_sigmas_type="zero",
        lower_order_final=True; its sigmas are overwritten with our grid clamped to ≤ 1 − 1e-4.
    solver="euler": x_{i+1} = x_i + (σ_{i+1} − σ_i)·u_i on the unclamped grid, written out because
        FlowMatchEulerDiscreteScheduler upcasts the sample to fp32 and builds its own shifted grid.

    Shift: static `shift`, or `dynamic_shift` (a `DynamicShift` or its dict; stored as a dict so the config is JSON)
    evaluated at seq_len = H·W pixels. `set_timesteps(..., shift=...)` overrides both for one run.
    Public state after `set_timesteps`: `sigmas` [n+1] fp64 (ends with 0, unclamped: the σ the model sees),
    `timesteps` [n] fp64 = 1000·σ_i.
    """

    config_name = "scheduler_config.json"
    order = 1  # one model evaluation per step (diffusers pipelines read this for progress accounting)

    @register_to_config
    def __init__(
        self,
        solver: Solver = "unipc",
        shift: float = 17.0,
        dynamic_shift: DynamicShift | dict[str, Any] | None = None,
        solver_order: int = 2,
    ) -> None:
        if solver not in ("unipc", "euler"):
            raise ValueError(f"unknown solver {solver!r}; expected 'unipc' or 'euler'")
        if isinstance(dynamic_shift, DynamicShift):
            # Keep the saved config JSON-serialisable; `shift_rule` rebuilds the dataclass.
            self.register_to_config(dynamic_shift=asdict(dynamic_shift))
        self.base: UniPCMultistepScheduler | None = None
        if solver == "unipc":
            # flow_shift=1 keeps the base's own warp an identity: the grid is ours, not the base's.
            self.base = UniPCMultistepScheduler(
                solver_order=solver_order,
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=1.0,
                final_sigmas_type="zero",
                lower_order_final=True,
            )
        self.init_noise_sigma = 1.0
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None

    @property
    def shift_rule(self) -> float | DynamicShift:
        """The configured shift: a static S or a DynamicShift S(seq_len)."""
        if self.config.dynamic_shift is not None:
            return DynamicShift(**self.config.dynamic_shift)
        return float(self.config.shift)

    @property
    def step_index(self) -> int | None:
        """Index of the next step to take (None before the first `step`)."""
        return self._step_index

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        seq_len: float | None = None,
        shift: float | DynamicShift | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Build σ_i = warp(τ_i; S(seq_len)) (see `flow_sigmas`) and reset the solver. `device` is accepted for
        diffusers compatibility and ignored: the grid stays on CPU in fp64 and step() moves scalars as needed.

        `sigmas`: a custom grid instead (as diffusers pipelines take it): n decreasing values in (0, 1], used as given
        (no shift) with σ = 0 appended; num_inference_steps, if given, must equal n.
        """
        if sigmas is not None:
            grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            if num_inference_steps is not None and num_inference_steps != len(grid):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(grid)} sigmas were given")
            if len(grid) == 0 or not bool(((grid > 0) & (grid <= 1)).all()) or not bool((grid[1:] < grid[:-1]).all()):
                raise ValueError(f"sigmas must decrease strictly within (0, 1], got {grid.tolist()}")
            self.sigmas = torch.cat([grid, grid.new_zeros(1)])
            num_inference_steps = len(grid)
        elif num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas")
        else:
            s = resolve_shift(self.shift_rule if shift is None else shift, seq_len)
            self.sigmas = flow_sigmas(num_inference_steps, s)
        self.timesteps = 1000.0 * self.sigmas[:-1]
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        if self.base is not None:
            # base.set_timesteps resets model_outputs, lower_order_nums, last_sample, step/begin index and
            # solver_p; with flow_shift=1 it returns our grid except σ_0 − 1e-6, which we overwrite anyway.
            self.base.set_timesteps(sigmas=self.sigmas[:-1].numpy())  # numpy: the base does array maths on it
            # fp32 like diffusers: UniPC moves single sigmas to the sample's device (fp64 fails on MPS).
            self.base.sigmas = self.sigmas.clamp(max=UNIPC_MAX_SIGMA).to(torch.float32)
            self.base.timesteps = self.timesteps.clone()
            self.base.timestep_list = [None] * self.base.config.solver_order  # not reset by the base
            self.base.set_begin_index(0)  # count steps, never look timesteps up by float equality

    def index_for(self, timestep_or_index: int | float | torch.Tensor) -> int:
        """A Python int is a step index; a float / tensor is a timestep (1000·σ) looked up in `timesteps`."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps() before step()")
        if isinstance(timestep_or_index, int):
            index = timestep_or_index
        else:
            t = torch.as_tensor(timestep_or_index, dtype=torch.float64).cpu().reshape(-1)[0]
            hits = torch.nonzero(torch.isclose(self.timesteps, t, rtol=0.0, atol=1e-4)).flatten()
            if len(hits) == 0:
                raise ValueError(f"timestep {float(t)} is not in this schedule")
            index = int(hits[0])
        if not 0 <= index < len(self.timesteps):
            raise IndexError(f"step index {index} outside [0, {len(self.timesteps)})")
        return index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Advance `sample` from σ_i to σ_{i+1} given the velocity u = model_output at σ_i."""
        index = self.index_for(timestep)
        if self.base is not None:
            # A multistep solver keeps a history of the previous outputs, so steps must come in order.
            expected = 0 if self._step_index is None else self._step_index
            if index != expected:
                raise ValueError(f"UniPC steps must be taken in order: expected step {expected}, got {index}")
            prev_sample = self.base.step(model_output, self.base.timesteps[index], sample).prev_sample
        else:
            dt = float(self.sigmas[index + 1] - self.sigmas[index])
            prev_sample = sample + dt * model_output.to(sample.dtype)
        self._step_index = index + 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Identity: flow models take x_t unscaled (present for diffusers compatibility)."""
        return sample


def released_pipeline_scheduler() -> FlowAdapterScheduler:
    """The scheduler of the released AsymFLUX.2 pipeline (spec §11.1, §11.5): UniPC with the sqrt dynamic shift,
    S = 17·√(H·W)/1024 — 17 at 1024², smaller below. What `asymflow sample` and exported pipelines use; a static 17
    at small sizes spends nearly every step at high noise (27 dB against 41 dB for 32 steps at 128²,
    bench/sampler.py)."""
    return FlowAdapterScheduler(dynamic_shift=DynamicShift())
