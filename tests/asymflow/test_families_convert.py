"""Other latent families (issue 15): seamless-init identity (spec §5.3) of FLUX.1, SD3, Qwen-Image and Sana on tiny
random instances of the real diffusers classes, with B and s fitted from each family's real VAE class, the save/load
round trip, LoRA targets."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, QwenImagePipeline
from safetensors.torch import load_file

from asymflow.families import detect_family, get_family
from asymflow.families.conversion import convert_family_transformer, convert_family_transformer_with_report
from asymflow.families.fit import fit_family_subspace
from asymflow.families.tiny import (
    TINY_POOLED_WIDTH,
    TINY_TEXT_WIDTH,
    build_tiny_family_transformer,
    build_tiny_family_vae,
)
from asymflow.parameterisation import calibrate
from asymflow.patching import patchify, unpatchify
from tests.asymflow.helpers import random_basis, seamless_errors_from_outputs
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

FAMILIES = ("flux1", "sd3", "qwen_image", "sana")
L = 5  # text tokens
SIGMAS = (0.05, 0.3, 0.77, 1.0)
GUIDANCE = 3.5


def conditioning(family: str, batch: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, L, TINY_TEXT_WIDTH, generator=gen, dtype=torch.float64).to(dtype)
    if family in ("qwen_image", "sana"):  # a text mask, no pooled projections; the last sample's prompt is shorter
        mask = torch.ones(batch, L, dtype=torch.bool)
        mask[-1, L - 2 :] = False
        return text, {"encoder_hidden_states_mask" if family == "qwen_image" else "encoder_attention_mask": mask}
    extra = {"pooled_projections": torch.randn(batch, TINY_POOLED_WIDTH, generator=gen, dtype=torch.float64).to(dtype)}
    if family == "flux1":
        extra["guidance"] = torch.full((batch,), GUIDANCE, dtype=dtype)
    return text, extra


def image_size(name: str) -> tuple[int, int]:
    """H, W of a 2×3 grid of pixel patches."""
    p = get_family(name).pixel_patch
    return 2 * p, 3 * p


def latent_velocity(family: str, latent, z: torch.Tensor, sigma_cal: torch.Tensor, text, extra) -> torch.Tensor:
    """G(z, σ̃) as channel-first latent tokens [B,N,r]: the latent model called the way its own pipeline calls it,
    on the latent image whose q×q channel-first patches are the tokens z."""
    dtype, spec, (H, W) = latent.dtype, get_family(family), image_size(family)
    image = unpatchify(z, spec.latent_patch, H // spec.vae_factor, W // spec.vae_factor, "channel_first").to(dtype)
    kwargs = {name: value.to(dtype) if value.is_floating_point() else value for name, value in extra.items()}
    batch = z.shape[0]
    if family == "qwen_image":  # QwenImagePipeline: packed tokens, timestep t/1000 = σ, one frame of h×w tokens
        out = latent(
            hidden_states=QwenImagePipeline._pack_latents(image, batch, 16, H // 8, W // 8),
            encoder_hidden_states=text.to(dtype),
            timestep=sigma_cal.to(dtype),
            img_shapes=[[(1, H // 16, W // 16)]] * batch,
            return_dict=False,
            **kwargs,
        )[0]
        out = QwenImagePipeline._unpack_latents(out, H, W, vae_scale_factor=8)[:, :, 0]
    elif family == "flux1":  # FluxPipeline: packed tokens, σ (scaled ×1000 inside), ids from its own helpers
        batch = z.shape[0]
        out = latent(
            hidden_states=FluxPipeline._pack_latents(image, batch, 16, H // 8, W // 8),
            encoder_hidden_states=text.to(dtype),
            timestep=sigma_cal.to(dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, H // 16, W // 16, z.device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, dtype=dtype),
            return_dict=False,
            **kwargs,
        )[0]
        out = FluxPipeline._unpack_latents(out, H, W, vae_scale_factor=8)
    else:  # StableDiffusion3Pipeline, SanaPipeline: the latent image and t = 1000·σ (Sana's timestep_scale is 1)
        out = latent(hidden_states=image, encoder_hidden_states=text.to(dtype), timestep=1000 * sigma_cal.to(dtype),
                     return_dict=False, **kwargs)[0]
    return patchify(out, spec.latent_patch, "channel_first")


def sample_images(count: int = 6, size: int = 128) -> torch.Tensor:
    """skimage's bundled photos, resized to size², in [−1,1]."""
    import skimage.data

    images = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")[:count]:
        pixels = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy()).permute(2, 0, 1)[None]
        rgb = pixels.double() / 127.5 - 1
        images.append(F.interpolate(rgb, size=(size, size), mode="area"))
    return torch.cat(images).float()


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    """(family name, latent model, B and s fitted from the family's VAE on skimage photos)."""
    name = request.param
    basis, scale = fit_family_subspace(get_family(name), build_tiny_family_vae(name), [sample_images()])
    return name, build_tiny_family_transformer(name), basis, scale


def seamless_errors(name: str, latent, basis: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[float, float]:
    """(‖x̂_0^pix − s·B·(y_z − σ̃·G(y_z, σ̃))‖, ‖P⊥x̂_0^pix‖) relative to ‖x̂_0‖, worst over SIGMAS, checking both the
    x0 form and x_t − σ·û of the velocity form (as test_convert does for FLUX.2)."""
    pixel = convert_family_transformer(get_family(name), latent, basis, scale).eval()
    batch, (H, W), p = len(SIGMAS), image_size(name), get_family(name).pixel_patch
    x_t = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    text, extra = conditioning(name, batch, dtype)
    sigma = torch.tensor(SIGMAS, dtype=dtype)
    with torch.no_grad():
        x0, u = pixel.predict_x0(x_t, sigma, text, **extra), pixel(x_t, sigma, text, **extra)
        k, sigma_cal = calibrate(sigma, scale)
        y_z = k.view(batch, 1, 1) * (patchify(x_t, p) @ basis.to(dtype))
        z0 = y_z - sigma_cal.view(batch, 1, 1) * latent_velocity(name, latent, y_z, sigma_cal, text, extra).to(dtype)
    return seamless_errors_from_outputs(x_t, sigma, x0, u, z0, basis, scale, p)


def test_seamless_init_fp32_with_fitted_subspace(family_setup) -> None:
    name, latent, basis, scale = family_setup
    rel, comp = seamless_errors(name, latent, basis.to(torch.float32), scale, torch.float32)
    assert rel <= 1e-4 and comp <= 1e-4


@pytest.mark.parametrize("scale", (0.7, 2.3))
def test_seamless_init_fp64(family_setup, scale: float) -> None:
    """Exact up to fp64 rounding: a wrong token order at either end (e.g. SD3's channel-last read-out) is O(1)."""
    name, latent, _, _ = family_setup
    family = get_family(name)
    basis = random_basis(family.pixel_dim, family.latent_dim)
    rel, comp = seamless_errors(name, latent.to(torch.float64), basis, scale, torch.float64)
    latent.to(torch.float32)
    assert rel < 1e-10 and comp < 1e-10


def test_fitted_subspace_is_the_procrustes_solution(family_setup) -> None:
    """B maximises tr(Bᵀ·XᵀZ) over orthonormal [D, r] (its value is the nuclear norm of XᵀZ) and s² is the
    energy ratio tr(BᵀXᵀXB)/Σ‖z‖² (spec §4.2), for the family's own latent tokens paired with Oklab pixel tokens."""
    from asymflow.families.fit import latent_tokens, pixel_tokens

    name, _, basis, scale = family_setup
    family = get_family(name)
    images = sample_images()
    z = latent_tokens(family, build_tiny_family_vae(name), images).flatten(0, 1).double()
    x = pixel_tokens(family, images).flatten(0, 1).double()
    tokens = 6 * (128 // family.pixel_patch) ** 2  # six 128² photos
    assert z.shape == (tokens, family.latent_dim) and x.shape == (tokens, family.pixel_dim)
    assert torch.allclose(basis.T @ basis, torch.eye(family.latent_dim, dtype=torch.float64), atol=1e-10)
    cross = x.T @ z  # [D, r]
    assert torch.trace(basis.T @ cross).item() == pytest.approx(torch.linalg.svdvals(cross).sum().item(), rel=1e-9)
    assert scale**2 == pytest.approx((torch.trace(basis.T @ x.T @ x @ basis) / (z * z).sum()).item(), rel=1e-9)


def test_report_accounts_for_every_tensor(family_setup) -> None:
    name, latent, basis, scale = family_setup
    family = get_family(name)
    pixel, report = convert_family_transformer_with_report(family, latent, basis, scale)
    pixel_keys, latent_keys = set(pixel.state_dict()), set(latent.state_dict())
    assert set(report.copied) | set(report.reprojected) | set(report.created) == pixel_keys
    assert set(report.copied) | set(report.reprojected) | set(report.dropped) == latent_keys
    assert set(report.reprojected) == {
        f"{family.read_in.module}.weight", f"{family.read_out.module}.weight", f"{family.read_out.module}.bias"
    }
    assert set(report.created) == {"proj_buffer", "scale_buffer"} and not report.dropped
    # Copies, not aliases, unless asked.
    name0 = report.copied[0]
    assert pixel.state_dict()[name0].data_ptr() != latent.state_dict()[name0].data_ptr()


def test_save_load_round_trip(tmp_path, family_setup) -> None:
    """save_pretrained → from_pretrained of the pixel class gives the same model (outputs bit for bit), B and s
    stay fp32 when loaded in bf16, and the saved directory is detected as its family."""
    name, latent, basis, scale = family_setup
    family = get_family(name)
    pixel = convert_family_transformer(family, latent, basis, scale).eval()
    pixel.save_pretrained(tmp_path / "pixel")
    loaded = family.pixel_class().from_pretrained(tmp_path / "pixel").eval()
    x_t = torch.randn(2, 3, *image_size(name), generator=torch.Generator().manual_seed(4))
    text, extra = conditioning(name, 2, torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x_t, torch.tensor([0.2, 0.9]), text, **extra),
                           pixel(x_t, torch.tensor([0.2, 0.9]), text, **extra))
    assert loaded.config.base_rank == family.latent_dim and loaded.config.patch_size == family.pixel_patch
    half = family.pixel_class().from_pretrained(tmp_path / "pixel", torch_dtype=torch.bfloat16)
    assert half.proj_buffer.dtype == half.scale_buffer.dtype == torch.float32
    assert torch.equal(half.proj_buffer, basis.to(torch.float32))
    assert detect_family(tmp_path / "pixel") is family


def test_converts_from_a_local_directory(tmp_path, family_setup) -> None:
    name, latent, basis, scale = family_setup
    family = get_family(name)
    latent.save_pretrained(tmp_path / "latent")
    assert detect_family(tmp_path / "latent") is family
    from_dir = convert_family_transformer(family, tmp_path / "latent", basis, scale).eval()
    from_obj = convert_family_transformer(family, latent, basis, scale).eval()
    x_t = torch.randn(2, 3, *image_size(name), generator=torch.Generator().manual_seed(4))
    text, extra = conditioning(name, 2, torch.float32)
    with torch.no_grad():
        assert torch.equal(from_dir(x_t, 0.5, text, **extra), from_obj(x_t, 0.5, text, **extra))



def owned_by(name: str, module: str) -> bool:
    """The parameter `name` is `module` itself or lies inside it, counted from the model's root (written out here,
    not asymflow.trainable's in_module, so that the tests check it)."""
    return name == module or name.startswith(module + ".")


def lora_student(name: str, latent, basis: torch.Tensor, scale: float):
    """(converted model before LoRA, the same model with the family's LoRA targets + full modules trainable)."""
    from asymflow.trainable import LoRASettings, apply_trainable

    family = get_family(name)
    pixel = convert_family_transformer(family, latent, basis, scale).eval()
    settings = LoRASettings(rank=4, alpha=8.0, targets=family.lora_targets)
    student = apply_trainable(convert_family_transformer(family, latent, basis, scale), "lora", settings,
                              family.full_modules)
    return pixel, student.eval()


def test_lora_targets_and_full_modules(family_setup) -> None:
    """The family's LoRA targets each adapt some layer of the real model, its full modules train, and at init
    (lora_B = 0) the adapted model computes exactly what the converted one does."""
    import re

    name, latent, basis, scale = family_setup
    family = get_family(name)
    pixel, student = lora_student(name, latent, basis, scale)
    adapted = {n.split(".lora_A.")[0] for n, _ in student.named_parameters() if ".lora_A." in n}
    assert all(any(re.fullmatch(target, module) for module in adapted) for target in family.lora_targets)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert {m for m in family.full_modules for n in trainable if owned_by(n, m)} == set(family.full_modules)
    x_t = torch.randn(2, 3, *image_size(name), generator=torch.Generator().manual_seed(5))
    text, extra = conditioning(name, 2, torch.float32)
    with torch.no_grad():
        assert torch.equal(student(x_t, 0.6, text, **extra), pixel(x_t, 0.6, text, **extra))


# Modules that share a full module's last name deeper in the tree: they belong to the frozen base, not to the fully
# trained read-in/read-out (a match at any depth once trained every FLUX.1 single block's proj_out and every Sana
# block's scale_shift_table in full).
NESTED_NAMESAKES = {
    "flux1": ("single_transformer_blocks.0.proj_out.weight", "single_transformer_blocks.0.proj_out.bias"),
    "sana": ("transformer_blocks.0.scale_shift_table", "transformer_blocks.1.scale_shift_table"),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_only_lora_and_full_modules_train(name: str) -> None:
    family = get_family(name)
    basis = random_basis(family.pixel_dim, family.latent_dim)
    _, student = lora_student(name, build_tiny_family_transformer(name), basis, 1.0)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or any(owned_by(n, m) for m in family.full_modules) for n in trainable)
    base = {n.replace(".base_layer.", "."): p for n, p in student.named_parameters()}  # FLUX.1's carry a LoRA
    for nested in NESTED_NAMESAKES.get(name, ()):
        assert not base[nested].requires_grad, nested


@pytest.mark.parametrize("name", sorted(NESTED_NAMESAKES))
def test_full_module_names_are_root_paths_in_groups_and_teacher(name: str) -> None:
    """The proj_out learning-rate multiplier and the shared-base teacher's own copies take the root module only."""
    from asymflow.trainable import apply_trainable, build_teacher, param_groups

    family = get_family(name)
    pixel = convert_family_transformer(family, build_tiny_family_transformer(name),
                                       random_basis(family.pixel_dim, family.latent_dim), 1.0)
    teacher = build_teacher(pixel, share_base=True, own_modules=family.full_modules)
    shared = {id(p) for p in teacher.parameters()}
    params = dict(pixel.named_parameters())
    for nested in NESTED_NAMESAKES[name]:
        assert id(params[nested]) in shared, nested  # the base's tensor, not a copy
    assert not any(id(p) in shared for n, p in params.items() if any(owned_by(n, m) for m in family.full_modules))

    apply_trainable(pixel, "full", full_modules=family.full_modules)
    groups = {g["name"]: g for g in param_groups(pixel, 1e-4, {"proj_out": 10.0, family.full_modules[-1]: 2.0})}
    idn = {id(p): n for n, p in pixel.named_parameters()}
    assert sorted(idn[id(p)] for p in groups["proj_out"]["params"]) == ["proj_out.bias", "proj_out.weight"]
    assert groups["proj_out"]["lr"] == pytest.approx(1e-3)
    last = family.full_modules[-1]
    assert all(owned_by(idn[id(p)], last) for p in groups[last]["params"])
    default = {idn[id(p)] for p in groups["default"]["params"]}
    assert set(NESTED_NAMESAKES[name]) <= default


def test_adapter_export_round_trip(tmp_path, family_setup) -> None:
    """A 'trained' LoRA student (lora_B and the full modules moved) exported in asymflow's adapter format and loaded
    onto the family's latent base gives the same outputs bit for bit; the LoRA matters; peft's config names the
    family's full modules; another base is refused by name."""
    from asymflow.families.adapter import export_family_adapter, full_tensor_names, load_family_adapter

    name, latent, basis, scale = family_setup
    family = get_family(name)
    _, student = lora_student(name, latent, basis, scale)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param_name, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = export_family_adapter(student.eval(), tmp_path / "adapter")
    assert set(full_tensor_names(student)) <= set(load_file(out / "diffusion_pytorch_model.safetensors"))
    assert set(json.loads((out / "adapter_config.json").read_text())["modules_to_save"]) == set(family.full_modules)
    loaded = load_family_adapter(out, latent)
    x_t = torch.randn(2, 3, *image_size(name), generator=torch.Generator().manual_seed(7))
    text, extra = conditioning(name, 2, torch.float32)
    with torch.no_grad():
        reference = student(x_t, 0.4, text, **extra)
        assert torch.equal(loaded(x_t, 0.4, text, **extra), reference)
        loaded.disable_adapters()
        assert not torch.allclose(loaded(x_t, 0.4, text, **extra), reference, atol=1e-3)
    with pytest.raises(ValueError, match="does not fit this latent base: num_layers"):
        load_family_adapter(out, build_tiny_family_transformer(name, num_layers=latent.config.num_layers + 1))


def test_from_pretrained_refuses_an_adapter_directory(tmp_path, family_setup) -> None:
    from asymflow.families.adapter import export_family_adapter

    name, latent, basis, scale = family_setup
    _, student = lora_student(name, latent, basis, scale)  # frozen base: the export holds LoRA + full modules only
    out = export_family_adapter(student, tmp_path / "adapter")
    with pytest.raises(ValueError, match="it is an adapter; load it with asymflow.families.adapter.load_family_adapter"):
        get_family(name).pixel_class().from_pretrained(out)
