"""Model-family registry (issue 15): family facts, detection from diffusers files, token orders, FLUX.2 unchanged."""
from __future__ import annotations

import json

import pytest
import torch

from asymflow.convert import convert_transformer
from asymflow.families import FAMILIES, detect_family, get_family
from asymflow.families.conversion import convert_family_transformer
from asymflow.families.core import basis_in_order, order_index
from asymflow.families.tiny import build_tiny_family_transformer
from asymflow.model import AsymFlux2Transformer2DModel
from asymflow.patching import patchify
from asymflow.tiny import build_tiny_transformer
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize(
    ("name", "patch", "dim", "rank"),
    [("flux2", 16, 768, 128), ("flux1", 16, 768, 64), ("sd3", 16, 768, 64), ("qwen_image", 16, 768, 64),
     ("sana", 32, 3072, 32)],
)
def test_geometry(name: str, patch: int, dim: int, rank: int) -> None:
    """p = VAE factor × latent patch (8 × 2, Sana's DC-AE 32 × 1); D = 3·p²; r = latent channels × q²."""
    family = get_family(name)
    assert (family.pixel_patch, family.pixel_dim, family.latent_dim) == (patch, dim, rank)


def test_timestep_conventions() -> None:
    assert get_family("flux1").timestep_scale == get_family("flux2").timestep_scale == 1.0
    assert get_family("qwen_image").timestep_scale == 1.0
    assert get_family("sd3").timestep_scale == get_family("sana").timestep_scale == 1000.0


def test_flux2_entry_is_the_existing_conversion() -> None:
    """FLUX.2 through the registry is `convert_transformer` itself: same class, same tensors bit for bit."""
    family = get_family("flux2")
    assert family.pixel_class() is AsymFlux2Transformer2DModel
    latent, basis = build_tiny_transformer(), random_basis(dtype=torch.float32)
    via_family = convert_family_transformer(family, latent, basis, 0.7)
    direct = convert_transformer(latent, basis, 0.7)
    assert type(via_family) is AsymFlux2Transformer2DModel
    assert via_family.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(t, direct.state_dict()[n]) for n, t in via_family.state_dict().items())


@pytest.mark.parametrize("order", ["channel_first", "channel_last"])
def test_basis_in_order_maps_tokens_in_that_order(order: str) -> None:
    """If z = Bᵀx for channel-first tokens, then z_o = B_oᵀ·x_o for the same patches flattened in `order`."""
    family = get_family("sd3")
    basis = random_basis(768, 64)
    gen = torch.Generator().manual_seed(0)
    x_img = torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    z_cf = patchify(x_img, 16, "channel_first") @ basis  # [1, 4, 64]
    z_img = z_cf.reshape(1, 2, 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 4, 4)  # unpatchify, by hand
    b_o = basis_in_order(family, basis, order)
    assert torch.allclose(patchify(x_img, 16, order) @ b_o, patchify(z_img, 2, order), atol=1e-12)
    assert torch.equal(order_index(3, 16, "channel_first"), torch.arange(768))
    # channel-last feature (i·p + j)·C + c holds channel-first feature c·p² + i·p + j
    assert order_index(16, 2, "channel_last")[(1 * 2 + 0) * 16 + 5].item() == 5 * 4 + 1 * 2 + 0


def write_json(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("pipeline", "transformer", "expected"),
    [
        ("FluxPipeline", "FluxTransformer2DModel", "flux1"),
        ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "sd3"),
        ("Flux2KleinPipeline", "Flux2Transformer2DModel", "flux2"),
        ("QwenImagePipeline", "QwenImageTransformer2DModel", "qwen_image"),
        ("SanaPipeline", "SanaTransformer2DModel", "sana"),
    ],
)
def test_detect_from_pipeline_directory(tmp_path, pipeline: str, transformer: str, expected: str) -> None:
    write_json(tmp_path / "model_index.json", {"_class_name": pipeline, "transformer": ["diffusers", transformer]})
    assert detect_family(tmp_path) is FAMILIES[expected]
    assert detect_family(str(tmp_path)) is FAMILIES[expected]


def test_detect_from_transformer_config(tmp_path) -> None:
    latent = build_tiny_family_transformer("sd3")
    latent.save_config(tmp_path / "transformer")  # diffusers' own config.json
    assert detect_family(tmp_path / "transformer").name == "sd3"
    assert detect_family(tmp_path / "transformer" / "config.json").name == "sd3"
    assert detect_family(json.loads((tmp_path / "transformer" / "config.json").read_text())).name == "sd3"
    assert detect_family(latent).name == "sd3"
    assert detect_family(build_tiny_transformer()).name == "flux2"
    flux1 = build_tiny_family_transformer("flux1")
    pixel = convert_family_transformer(get_family("flux1"), flux1, random_basis(768, 64), 1)
    assert detect_family(pixel).name == "flux1"


def test_detect_refuses_unknown_models(tmp_path) -> None:
    write_json(tmp_path / "zimage" / "model_index.json",
               {"_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"]})
    with pytest.raises(ValueError, match=r"ZImageTransformer2DModel.*supported families: flux2 .*flux1 .*sd3 .*sana "):
        detect_family(tmp_path / "zimage")
    with pytest.raises(ValueError, match="supported families"):
        detect_family({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="neither model_index.json nor config.json"):
        detect_family(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        detect_family(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a readable JSON file"):
        detect_family(tmp_path / "bad")


def test_get_family_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'zimage'; supported families: flux2"):
        get_family("zimage")


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("flux1", {"in_channels": 32}, "in_channels=32; the flux1 family needs 64"),
        ("flux1", {"patch_size": 2, "in_channels": 16}, "patch_size=2; the flux1 family needs 1"),
        ("sd3", {"patch_size": 1}, "patch_size=1; the sd3 family needs 2"),
        ("sd3", {"out_channels": 8}, "out_channels=8; the sd3 family needs None or 16"),
        ("qwen_image", {"out_channels": None}, "out_channels=None; the qwen_image family needs 16"),
    ],
)
def test_rejects_latent_geometry_of_another_family(name: str, overrides: dict, message: str) -> None:
    latent = build_tiny_family_transformer(name, **overrides)
    with pytest.raises(ValueError, match=message):
        convert_family_transformer(get_family(name), latent, random_basis(768, 64), 1.0)


def test_rejects_wrong_model_class_and_basis() -> None:
    with pytest.raises(TypeError, match="must be a FluxTransformer2DModel"):
        sd3 = build_tiny_family_transformer("sd3")
        convert_family_transformer(get_family("flux1"), sd3, random_basis(768, 64), 1.0)
    latent = build_tiny_family_transformer("flux1")
    with pytest.raises(ValueError, match="rank 128 but 64"):
        convert_family_transformer(get_family("flux1"), latent, random_basis(768, 128), 1.0)
    with pytest.raises(ValueError, match="scale"):
        convert_family_transformer(get_family("flux1"), latent, random_basis(768, 64), -1.0)


def test_flux2_latent_tokens_are_the_cached_latents_packed() -> None:
    """FLUX.2's latent tokens for the fit are asymflow.latents' normalised packed grid (what the cache stores), on the
    grid of the 16×16 pixel patches."""
    from asymflow.families.fit import latent_tokens, pixel_tokens
    from asymflow.latents import encode_latents
    from asymflow.patching import pack
    from asymflow.tiny import build_tiny_vae

    family, vae = get_family("flux2"), build_tiny_vae()
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = latent_tokens(family, vae, images)
    assert torch.equal(z, pack(encode_latents(vae, images)))
    assert z.shape == (2, 6, 128) and pixel_tokens(family, images).shape == (2, 6, 768)
