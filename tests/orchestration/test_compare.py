"""orchestration.compare: PSNR/SSIM on inputs whose answer is known from their definitions, the grid layout, and the
step-0 check on a random latent model with s ≠ 1 (the seamless initialisation holds for any latent model)."""
from __future__ import annotations

import math

import pytest
import torch

from orchestration.compare import compare_columns, compare_grid, psnr, ssim, step0_tolerances

C1 = (0.01 * 2.0) ** 2  # SSIM's luminance constant (K1·L)² for data range L = 2


def test_psnr_identical_is_infinite_and_offset_is_exact() -> None:
    a = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1  # fp64: the offsets below are exact to ~1e-16
    assert torch.isinf(psnr(a, a)).all()
    # A constant offset c gives MSE = c², so PSNR = 10·log10(2²/c²): c = 0.02 → 10·log10(10⁴) = 40 dB.
    assert psnr(a + 0.02, a).tolist() == pytest.approx([40.0] * 3, abs=1e-9)
    # Per image, not pooled: offsets 0.2 and 0.02 → 20 dB and 40 dB.
    b = a.clone()
    b[0] += 0.2
    b[1:] += 0.02
    assert psnr(b, a).tolist() == pytest.approx([20.0, 40.0, 40.0], abs=1e-9)
    # Images in [0, 1] (data range 1): offset 0.1 → 10·log10(1/0.01) = 20 dB.
    assert psnr(a.abs() / 2 + 0.1, a.abs() / 2, data_range=1.0).tolist() == pytest.approx([20.0] * 3, abs=1e-9)


def test_ssim_identical_is_one_and_constant_images_give_the_luminance_term() -> None:
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # Flat images μx = 0.2, μy = 0.3: no variance, so SSIM = (2μxμy + C1) / (μx² + μy² + C1) exactly.
    x, y = (torch.full((1, 3, 32, 32), v, dtype=torch.float64) for v in (0.2, 0.3))
    expected = (2 * 0.2 * 0.3 + C1) / (0.2**2 + 0.3**2 + C1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-9)
    # The definition is symmetric in its two images.
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim(a, b).tolist() == pytest.approx(ssim(b, a).tolist(), abs=1e-12)


def test_step0_tolerances_follow_fp32_roundoff() -> None:
    tol = step0_tolerances(steps=20, token_dim=768, rank=128, magnitude=3.0)
    assert tol["oklab"] == pytest.approx(20 * (768 + 128) * 2.0**-24 * 3.0)
    assert tol["rgb"] == pytest.approx(0.5 * 2 / 255)  # half an 8-bit level in [−1,1] units


def test_compare_grid_layout() -> None:
    cols = [torch.full((3, 3, 16, 16), v) for v in (-1.0, -0.5, 0.5, 1.0)]
    grid = compare_grid(cols, rows_per_block=2, label_height=10)
    # 2 blocks (rows 0-1, row 2 + padding) of 4 columns × 16 px, an 8-px gap between them; header + 2 rows tall.
    assert grid.shape == (10 + 2 * 16, 2 * 4 * 16 + 8, 3)
    assert grid[10, 0, 0] == 0 and grid[10, 3 * 16, 0] == 255  # -1 → 0, +1 → 255
    assert grid[10, 16, 0] == round(0.25 * 255)  # -0.5 → 63.75 → 64 (rounded, not truncated)
    assert (grid[10 + 16:, 4 * 16 + 8:] == 255).all()  # the padded row of the second block is white


@pytest.fixture(scope="module")
def tiny_parts():
    from asymflow.components import BaseModelConfig, load_base_components

    return load_base_components(BaseModelConfig(kind="tiny", seed=0), ("transformer", "vae"))


def test_step0_column_is_sB_latent_sample_for_a_random_model(tiny_parts) -> None:
    """Random latent model, random orthonormal B and s = 1.7: the converted model's Euler sample on warp(τ; s) equals
    s·B·(latent Euler sample on τ from Bᵀε) to fp32 rounding (spec §5.3, invariant 7)."""
    from asymflow.tiny import TINY_MAX_LENGTH, TINY_TEXT_HIDDEN, TINY_TEXT_LAYERS

    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(768, 128, generator=gen, dtype=torch.float64))[0].float()
    scale, steps = 1.7, 6
    images = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    text = torch.randn(3, TINY_MAX_LENGTH, TINY_TEXT_HIDDEN * len(TINY_TEXT_LAYERS), generator=gen)
    finetuned = lambda x_t, sigma, encoder_hidden_states: torch.zeros_like(x_t)  # noqa: E731  (x̂_0 = x_t at each step)
    cols = compare_columns(tiny_parts, basis, scale, finetuned, images, text, steps=steps, seed=0, batch=2)

    for name in ("ae_reconstruction", "latent", "pixel_init", "pixel_finetuned"):
        assert cols[name].shape == images.shape and torch.isfinite(cols[name]).all(), name
    # The latent model runs on the calibrated grid, which for the pixel grid warp(τ; s) is τ itself.
    torch.testing.assert_close(cols["sigmas"]["latent"], torch.linspace(1, 0, steps + 1, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    diff = cols["step0_diff"]
    tol = step0_tolerances(steps, 768, 128, diff["magnitude"])
    assert diff["magnitude"] > 0.1  # a real sample, not zeros
    assert diff["oklab"] <= tol["oklab"], diff
    assert diff["rgb"] <= tol["rgb"], diff
    # With zero velocity Euler never moves: the "fine-tuned" column is the decoded noise itself, same for each batch.
    from asymflow.oklab import oklab_decode

    eps = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cols["pixel_finetuned"], oklab_decode(eps).clamp(-1, 1))
    assert math.isfinite(psnr(cols["latent"], images).mean().item())
