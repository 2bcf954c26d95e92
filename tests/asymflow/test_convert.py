"""Weight surgery latent → pixel: seamless initialisation (spec §5.3, §14 items 6–7), input checks and the report."""
from __future__ import annotations

import pytest
import torch

from asymflow.convert import convert_transformer, convert_transformer_with_report
from asymflow.model import AsymFlux2Transformer2DModel
from asymflow.parameterisation import calibrate
from asymflow.patching import image_position_ids, patchify, text_position_ids
from asymflow.tiny import build_tiny_transformer
from tests.asymflow.helpers import random_basis, seamless_errors_from_outputs

P = 16
H, W, L = 32, 48, 5  # a 2×3 token grid, 5 text tokens
SCALES = (1.0, 0.7, 2.3)
SIGMAS = (0.05, 0.3, 0.77, 1.0)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: the tiny models' ops are microseconds, and on shared 2-core machines thread
    oversubscription makes them ~15× slower with 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def latent_velocity(latent, z: torch.Tensor, sigma_cal: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """G(z, σ̃): the latent model called directly on tokens [B,N,r] of the H×W image's token grid."""
    return latent(
        hidden_states=z.to(latent.dtype),
        encoder_hidden_states=text.to(latent.dtype),
        timestep=sigma_cal,
        img_ids=image_position_ids(H // P, W // P),
        txt_ids=text_position_ids(text.shape[1]),
        return_dict=False,
    )[0]


def inputs(dtype: torch.dtype, batch: int = len(SIGMAS), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, H, W, generator=gen, dtype=torch.float64).to(dtype)
    text = torch.randn(batch, L, 96, generator=gen, dtype=torch.float64).to(dtype)
    return x_t, text


@pytest.fixture(scope="module")
def latent64():
    return build_tiny_transformer().to(torch.float64)


def seamless_errors(latent, basis: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[float, float]:
    """(‖x̂_0^pix − s·B·(y_z − σ̃·G(y_z, σ̃))‖, ‖P⊥x̂_0^pix‖) relative to ‖x̂_0‖, worst over SIGMAS (one per sample).

    Checks both outputs of the pixel model: the x0 form and x_t − σ·û from the velocity form.
    """
    pixel = convert_transformer(latent, basis, scale).eval()
    x_t, text = inputs(dtype)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    batch = len(SIGMAS)
    with torch.no_grad():
        x0, u = pixel.predict_x0(x_t, sigma, text), pixel(x_t, sigma, text)
        k, sigma_cal = calibrate(sigma, scale)
        y_z = k.view(batch, 1, 1) * (patchify(x_t, P).to(sigma.dtype) @ basis.to(sigma.dtype))
        z0 = y_z - sigma_cal.view(batch, 1, 1) * latent_velocity(latent, y_z, sigma_cal, text).to(sigma.dtype)
    return seamless_errors_from_outputs(x_t, sigma, x0, u, z0, basis, scale, P)


@pytest.mark.parametrize("scale", SCALES)
def test_seamless_init_x0_fp64(latent64, scale: float) -> None:
    rel, comp = seamless_errors(latent64, random_basis(), scale, torch.float64)
    assert rel < 1e-10 and comp < 1e-10


def test_seamless_init_x0_fp32() -> None:
    rel, comp = seamless_errors(build_tiny_transformer(), random_basis(dtype=torch.float32), 0.7, torch.float32)
    assert rel <= 1e-4 and comp <= 1e-4


def test_seamless_init_x0_bf16() -> None:
    # Tokens and weights rounded to bf16 (8 mantissa bits, ~4e-3 relative) through 4 blocks; B·W_out rounded
    # to bf16 leaves the span of B by the same relative amount. Loose bound: ~3× the observed 3e-3.
    latent = build_tiny_transformer().to(torch.bfloat16)
    rel, comp = seamless_errors(latent, random_basis(dtype=torch.float32), 2.3, torch.float32)
    assert rel <= 1e-2 and comp <= 1e-2


@pytest.mark.parametrize(("scale", "steps"), [(1.0, 4), (0.7, 4), (2.3, 4), (2.3, 10)])
def test_euler_sampler_equivalence(latent64, scale: float, steps: int) -> None:
    """Euler on the pixel model from ε == s·B·(Euler on the latent model over σ̃_i from Bᵀε) (spec §5.3 item 3)."""
    basis = random_basis()
    pixel = convert_transformer(latent64, basis, scale).eval()
    eps, text = inputs(torch.float64, batch=2, seed=2)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    _, sigmas_cal = calibrate(sigmas, scale)
    x, z = eps, patchify(eps, P) @ basis
    with torch.no_grad():
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * pixel(x, sigmas[i].expand(2), text)
            z = z + (sigmas_cal[i + 1] - sigmas_cal[i]) * latent_velocity(latent64, z, sigmas_cal[i].expand(2), text)
    tokens = patchify(x, P)
    assert (tokens @ basis - scale * z).abs().max() < 1e-10
    assert (tokens - tokens @ basis @ basis.T).abs().max() < 1e-10


def test_rejects_bad_basis(latent64) -> None:
    basis = random_basis()
    with pytest.raises(ValueError, match="orthonormal"):
        convert_transformer(latent64, 1.5 * basis, 1.0)
    with pytest.raises(ValueError, match="rank"):
        convert_transformer(latent64, basis[:, :64], 1.0)
    with pytest.raises(ValueError, match="rows"):
        convert_transformer(latent64, basis[:700], 1.0)
    with pytest.raises(ValueError, match="matrix"):
        convert_transformer(latent64, basis[:, 0], 1.0)
    with pytest.raises(ValueError, match="scale"):
        convert_transformer(latent64, basis, -1.0)


def test_rejects_latent_patch_size() -> None:
    latent = build_tiny_transformer(patch_size=2, in_channels=32)
    with pytest.raises(ValueError, match="patch_size=2"):
        convert_transformer(latent, random_basis(), 1.0)


def test_rejects_shape_mismatch_by_name(latent64) -> None:
    # A latent checkpoint whose context embedder does not fit the config it claims.
    latent = build_tiny_transformer().to(torch.float64)
    latent.context_embedder = torch.nn.Linear(80, latent.inner_dim, bias=False).to(torch.float64)
    with pytest.raises(ValueError, match="context_embedder.weight"):
        convert_transformer(latent, random_basis(), 1.0)


def test_report_accounts_for_every_tensor(latent64) -> None:
    basis = random_basis()
    pixel, report = convert_transformer_with_report(latent64, basis, 0.7)
    pixel_keys, latent_keys = set(pixel.state_dict()), set(latent64.state_dict())
    assert set(report.copied) | set(report.reprojected) | set(report.created) == pixel_keys
    assert set(report.copied) | set(report.reprojected) | set(report.dropped) == latent_keys
    assert set(report.reprojected) == {"x_embedder.weight", "proj_out.weight"}
    assert set(report.created) == {"proj_buffer", "scale_buffer"}
    text = str(report)
    assert all(name in text for name in pixel_keys)
    assert pixel.conversion_report is not None
    assert convert_transformer(latent64, basis, 0.7).conversion_report.copied == report.copied


def test_surgery_values_and_dtypes() -> None:
    latent = build_tiny_transformer().to(torch.bfloat16)
    basis = random_basis()
    pixel = convert_transformer(latent, basis, 2.3)
    w_in = latent.x_embedder.weight.to(torch.float64)
    w_out = latent.proj_out.weight.to(torch.float64)
    assert torch.equal(pixel.x_embedder.weight, (w_in @ basis.T).to(torch.bfloat16))
    assert torch.equal(pixel.proj_out.weight, (basis @ w_out).to(torch.bfloat16))
    assert torch.equal(pixel.context_embedder.weight, latent.context_embedder.weight)
    assert pixel.proj_buffer.dtype == pixel.scale_buffer.dtype == torch.float32
    assert torch.equal(pixel.proj_buffer, basis.to(torch.float32))
    assert pixel.scale_buffer.item() == pytest.approx(2.3, rel=1e-7)
    # Copies, not aliases, unless asked: training the pixel model must not move the teacher.
    assert pixel.context_embedder.weight.data_ptr() != latent.context_embedder.weight.data_ptr()
    shared = convert_transformer(latent, basis, 2.3, share_weights=True)
    assert shared.context_embedder.weight.data_ptr() == latent.context_embedder.weight.data_ptr()


def test_convert_from_local_directory(tmp_path, latent64) -> None:
    latent64.save_pretrained(tmp_path / "latent")
    basis = random_basis()
    from_dir = convert_transformer(tmp_path / "latent", basis, 0.7, torch_dtype=torch.float64).eval()
    from_obj = convert_transformer(latent64, basis, 0.7).eval()
    assert isinstance(from_dir, AsymFlux2Transformer2DModel)
    x_t, text = inputs(torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(from_dir(x_t, sigma, text), from_obj(x_t, sigma, text))
