"""Latent transformer of any registered family → its pixel AsymFlow model, by the family's weight surgery."""
from __future__ import annotations

from os import PathLike
from typing import Any

import torch

from asymflow.convert import (
    ConversionReport,
    add_subspace_buffers,
    buffer_dtype,
    subspace_fp64,
    transfer_tensors,
)
from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2, check_basis

from .core import ModelFamily, surgery_rules


def load_family_transformer(
    family: ModelFamily, latent_model: Any, torch_dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, bool]:
    """The family's latent transformer itself, or loaded from a local diffusers directory / hub id (owned: True)."""
    cls = family.transformer_type()
    if isinstance(latent_model, cls):
        return latent_model, False
    if isinstance(latent_model, (str, PathLike)):
        return cls.from_pretrained(latent_model, torch_dtype=torch_dtype), True
    raise TypeError(f"latent_model must be a {cls.__name__} or a path, got {type(latent_model).__name__}")


def convert_family_transformer_with_report(
    family: ModelFamily,
    latent_model: Any,
    basis: torch.Tensor,
    scale: float | torch.Tensor,
    sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
    share_weights: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, ConversionReport]:
    """Pixel model with û_a = B·G(Bᵀ·k·x_t, kσ) at init (spec §5.3) and the report; B [3·p², C_lat·q²] relates
    channel-first pixel and latent tokens (as `fit.fit_family_subspace` fits it). FLUX.2 goes through
    `asymflow.convert` unchanged; other families through `surgery_rules`, with the same accounting and checks.
    """
    if family.name == "flux2":
        from asymflow.convert import convert_transformer_with_report

        return convert_transformer_with_report(latent_model, basis, scale, sigma_min, share_weights, torch_dtype)
    latent, owned = load_family_transformer(family, latent_model, torch_dtype)
    pixel_class = family.pixel_class()
    config = pixel_class.from_latent_config(latent.config, sigma_min=sigma_min)
    check_basis(basis, dim=family.pixel_dim, rank=config["base_rank"])
    basis64, scale64 = subspace_fp64(basis, scale)

    with torch.device("meta"):
        expected = pixel_class.from_config(config).state_dict()
    pixel_sd, report = transfer_tensors(
        expected, latent.state_dict(), surgery_rules(family), basis64, share_weights or owned
    )
    add_subspace_buffers(pixel_sd, report, basis64, scale64, buffer_dtype(latent.dtype))
    with torch.device("meta"):  # no random init of a large model: the state dict becomes its storage
        model = pixel_class.from_config(config)
    model.load_state_dict(pixel_sd, strict=True, assign=True)
    model.rebuild_unsaved_state()
    model.train(latent.training)
    model.conversion_report = report
    return model, report


def convert_family_transformer(family: ModelFamily, latent_model: Any, basis: torch.Tensor,
                               scale: float | torch.Tensor, **kwargs: Any) -> torch.nn.Module:
    """`convert_family_transformer_with_report` returning only the model (report kept as `.conversion_report`)."""
    return convert_family_transformer_with_report(family, latent_model, basis, scale, **kwargs)[0]
