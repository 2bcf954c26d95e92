"""The shipped tiny base (assets/tiny_base/): weights load, its recorded autoencoder PSNR and sample statistics
reproduce, and its pixel-space conversion starts exactly where the latent model is (seamless initialisation)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from asymflow.components import BUNDLED_PATH, BaseModelConfig, load_base_components
from asymflow.convert import convert_transformer
from asymflow.latents import decode_latents, encode_latents
from asymflow.parameterisation import calibrate
from asymflow.patching import image_position_ids, pack, patchify, text_position_ids
from asymflow.subspace import ProcrustesFit
from asymflow.text import encode_prompts
from asymflow.tiny import TINY_MAX_LENGTH, TINY_TEXT_LAYERS
from data_prep.subspace_job import pixel_tokens
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_base.py"
P = 16  # pixels per latent token: 8× VAE × 2×2 packing


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_tiny_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((BUNDLED_PATH / "stats.json").read_text())


@pytest.fixture(scope="module")
def base():
    return load_base_components(BaseModelConfig(kind="bundled"))


@pytest.fixture(scope="module")
def images(train_script) -> torch.Tensor:
    return train_script.load_photos()


@pytest.fixture(scope="module")
def text(base, train_script) -> torch.Tensor:
    captions = [train_script.caption(n) for n in train_script.PHOTOS]
    return encode_prompts(base.text_encoder, base.tokenizer, captions, TINY_TEXT_LAYERS, TINY_MAX_LENGTH).float()


def test_weights_load(base, train_script) -> None:
    assert base.transformer.dtype == torch.float32 and base.vae.dtype == torch.float32
    for key, value in train_script.TRANSFORMER_CONFIG.items():
        if value is not None:
            got = base.transformer.config[key]
            assert (tuple(got) if isinstance(got, list) else got) == value, key
    assert tuple(base.vae.config.block_out_channels) == train_script.VAE_CONFIG["block_out_channels"]
    for model in (base.transformer, base.vae):
        assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    # Latent statistics filled from the training latents, not the identity of a fresh model.
    assert not torch.allclose(base.vae.bn.running_var, torch.ones_like(base.vae.bn.running_var))
    size = sum(f.stat().st_size for f in BUNDLED_PATH.rglob("*.safetensors"))
    assert size <= 25 * 2**20, f"shipped weights are {size / 2**20:.1f} MiB, over the 25 MiB budget"


def test_autoencoder_psnr_matches_card(base, images, stats, train_script) -> None:
    z_0 = torch.cat([encode_latents(base.vae, x) for x in images.split(10)])
    recon = torch.cat([decode_latents(base.vae, z) for z in z_0.split(10)])
    assert train_script.psnr(recon, images).mean().item() >= stats["ae_psnr_mean"] - 0.05


def test_latent_samples_reproduce_recorded_statistics(base, text, stats, train_script) -> None:
    z = train_script.euler_sample(base.transformer, text, (8, 8))
    mean, std = z.flatten(1).mean(1), z.flatten(1).std(1)
    torch.testing.assert_close(mean, torch.tensor(stats["per_sample_latent_mean"]), atol=2e-3, rtol=0)
    torch.testing.assert_close(std, torch.tensor(stats["per_sample_latent_std"]), atol=2e-3, rtol=1e-3)
    assert z.mean().item() == pytest.approx(stats["latent_mean"], abs=1e-3)
    assert z.std().item() == pytest.approx(stats["latent_std"], abs=1e-3)


def test_conversion_at_step0_samples_the_latent_sample_through_sB(base, images, text) -> None:
    """Procrustes subspace fitted on the base's own latents; the converted pixel model, before any training, samples
    (Euler from ε) exactly s·B·(the latent model's Euler sample from Bᵀε over the calibrated times σ̃_i) (spec §5.3)."""
    z_0 = torch.cat([encode_latents(base.vae, x) for x in images.split(10)])
    fit = ProcrustesFit()
    for z, image in zip(z_0, images):
        fit.update(pack(z[None])[0], pixel_tokens(image, "oklab", "channel_first"))
    basis, scale = fit.solve()
    basis = basis.float()
    pixel = convert_transformer(base.transformer, basis, scale).eval()

    batch, steps = 4, 4
    eps = torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    cond = text[:batch]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    _, sigmas_cal = calibrate(sigmas, scale)
    x, y = eps, patchify(eps, P) @ basis
    with torch.no_grad():
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * pixel(x, sigmas[i].expand(batch), cond)
            u_z = base.transformer(
                hidden_states=y, encoder_hidden_states=cond, timestep=sigmas_cal[i].expand(batch),
                img_ids=image_position_ids(8, 8), txt_ids=text_position_ids(cond.shape[1]), return_dict=False,
            )[0]
            y = y + (sigmas_cal[i + 1] - sigmas_cal[i]) * u_z
    tokens = patchify(x, P).double()
    expected = scale * y.double() @ basis.double().T
    rel = ((tokens - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)).max().item()
    assert rel < 1e-4, f"converted model's sample is {rel:.2e} (relative) away from s·B·(latent sample)"


def test_bundled_fingerprint_follows_the_weights(tmp_path):
    """Caches are keyed by the model fingerprint: regenerated weights must change it, a copy must not."""
    import shutil

    from asymflow.components import BUNDLED_PATH, BaseModelConfig

    copy = tmp_path / "base"
    shutil.copytree(BUNDLED_PATH, copy)
    same = BaseModelConfig(kind="bundled", path=str(copy)).fingerprint()
    assert same.split(":")[1] == BaseModelConfig(kind="bundled").fingerprint().split(":")[1]
    weights = next(copy.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert BaseModelConfig(kind="bundled", path=str(copy)).fingerprint() != same
