"""AsymFlux2Transformer2DModel: config, dtype rules for B and s, save/load round trip, input checks, checkpointing."""
from __future__ import annotations

import json

import pytest
import torch

from asymflow.convert import convert_transformer
from asymflow.model import AsymFlux2Transformer2DModel
from asymflow.parameterisation import ideal_output, recover_velocity
from asymflow.patching import patchify
from asymflow.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

H, W, L = 32, 48, 5


@pytest.fixture(scope="module")
def pixel() -> AsymFlux2Transformer2DModel:
    return convert_transformer(build_tiny_transformer(), random_basis(dtype=torch.float32), 0.7).eval()


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, H, W, generator=gen)
    sigma = torch.rand(batch, generator=gen)
    text = torch.randn(batch, L, 96, generator=gen)
    return x_t, sigma, text


def test_config_from_latent() -> None:
    config = AsymFlux2Transformer2DModel.from_latent_config(TINY_TRANSFORMER_CONFIG)
    model = AsymFlux2Transformer2DModel.from_config(config)
    assert model.config.patch_size == 16 and model.config.in_channels == 3
    assert model.config.base_rank == 128 and model.config.sigma_min == 1e-4 and model.config.num_timesteps == 1
    assert model.config.num_layers == TINY_TRANSFORMER_CONFIG["num_layers"]
    assert model.x_embedder.in_features == model.proj_out.out_features == 3 * 16 * 16
    assert model.x_embedder.bias is None and model.proj_out.bias is None
    # Fresh buffers: B = [I_r; 0], s = 1.
    assert torch.equal(model.proj_buffer, torch.eye(768, 128))
    assert model.scale_buffer.shape == () and model.scale_buffer.item() == 1.0
    assert {"proj_buffer", "scale_buffer"} <= set(model.state_dict())


def test_forward_shapes_and_dtype(pixel) -> None:
    x_t, sigma, text = inputs()
    with torch.no_grad():
        u = pixel(x_t=x_t, sigma=sigma, encoder_hidden_states=text)
        assert u.shape == x_t.shape and u.dtype == torch.float32
        assert torch.equal(pixel(x_t, sigma, text, return_dict=True).sample, u)
        # A scalar σ broadcasts over the batch.
        assert torch.equal(pixel(x_t, 0.5, text), pixel(x_t, torch.full((2,), 0.5), text))


def test_forward_is_recovery_of_backbone_output() -> None:
    """With proj_out ≡ 0 the backbone output is û_a = 0, so forward is recover_velocity(0, x_t, σ) (spec §3.4)."""
    pixel = convert_transformer(build_tiny_transformer(), random_basis(dtype=torch.float32), 2.3).eval()
    torch.nn.init.zeros_(pixel.proj_out.weight)
    x_t, sigma, text = inputs()
    tokens = patchify(x_t, 16)
    with torch.no_grad():
        u = patchify(pixel(x_t, sigma, text), 16)
    expected = recover_velocity(torch.zeros_like(tokens), tokens, sigma, pixel.proj_buffer, 2.3, sigma_min=1e-4)
    assert torch.allclose(u, expected, rtol=1e-6, atol=1e-6)


def test_sigma_min_depends_on_mode() -> None:
    """At σ = 0 the complement divides by σ_min: 1e-6 in training mode, config.sigma_min (1e-4) in eval mode."""
    pixel = AsymFlux2Transformer2DModel.from_config(AsymFlux2Transformer2DModel.from_latent_config(TINY_TRANSFORMER_CONFIG))
    torch.nn.init.zeros_(pixel.proj_out.weight)  # û_a = 0, s = 1: û = P⊥x_t / σ_c
    x_t, _, text = inputs()
    tokens = patchify(x_t, 16)
    comp = (tokens - tokens @ pixel.proj_buffer @ pixel.proj_buffer.T).abs().max()
    sigma = torch.zeros(2)
    with torch.no_grad():
        u_eval = patchify(pixel.eval()(x_t, sigma, text), 16).abs().max()
        u_train = patchify(pixel.train()(x_t, sigma, text), 16).abs().max()
    assert u_eval == pytest.approx(comp.item() / 1e-4, rel=1e-5)
    assert u_train == pytest.approx(comp.item() / 1e-6, rel=1e-5)


def test_save_load_round_trip(tmp_path, pixel) -> None:
    pixel.save_pretrained(tmp_path)
    loaded = AsymFlux2Transformer2DModel.from_pretrained(tmp_path).eval()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "AsymFlux2Transformer2DModel"
    assert loaded.config.keys() >= pixel.config.keys()
    assert json.loads(loaded.to_json_string()) | {"_name_or_path": None} == json.loads(pixel.to_json_string()) | {"_name_or_path": None}
    for name, tensor in pixel.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x_t, sigma, text = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x_t, sigma, text), pixel(x_t, sigma, text))
        assert torch.equal(loaded.predict_x0(x_t, sigma, text), pixel.predict_x0(x_t, sigma, text))
    # Loading in bf16 keeps B and s in fp32, exactly as saved.
    half = AsymFlux2Transformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.x_embedder.weight.dtype == torch.bfloat16
    assert half.proj_buffer.dtype == half.scale_buffer.dtype == torch.float32
    assert torch.equal(half.proj_buffer, pixel.proj_buffer) and torch.equal(half.scale_buffer, pixel.scale_buffer)


def test_buffers_stay_fp32_under_casts(pixel) -> None:
    basis, scale = pixel.proj_buffer.clone(), pixel.scale_buffer.clone()
    model = convert_transformer(build_tiny_transformer(), basis, scale).eval()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(model)
        assert model.dtype != torch.float32
        assert model.proj_buffer.dtype == model.scale_buffer.dtype == torch.float32
        assert torch.equal(model.proj_buffer, basis) and torch.equal(model.scale_buffer, scale)
    model.to(torch.bfloat16)
    x_t, sigma, text = inputs()
    with torch.no_grad():
        u = model(x_t, sigma, text)
        ref = pixel(x_t, sigma, text)
    assert u.dtype == torch.float32
    assert (u - ref).norm() / ref.norm() < 5e-2  # bf16 backbone, fp32 algebra
    # fp64 is allowed (it loses nothing), and casting back down re-rounds once to fp32.
    model.to(torch.float64)
    assert model.proj_buffer.dtype == torch.float64
    model.to(torch.bfloat16)
    assert torch.equal(model.proj_buffer, basis)


def test_ideal_backbone_output_gives_true_velocity() -> None:
    """If F returned u_a* = Pε − x_0/s, forward would return ε − x_0: checked through the public recovery."""
    basis = random_basis(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x_0, eps = torch.randn(2, 6, 768, generator=gen, dtype=torch.float64), torch.randn(2, 6, 768, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.9], dtype=torch.float64)
    x_t = (1 - sigma.view(2, 1, 1)) * x_0 + sigma.view(2, 1, 1) * eps
    u = recover_velocity(ideal_output(x_0, eps, basis, 2.3), x_t, sigma, basis, 2.3, sigma_min=1e-4)
    assert (u - (eps - x_0)).abs().max() < 1e-10


def test_input_errors(pixel) -> None:
    x_t, sigma, text = inputs()
    with pytest.raises(ValueError, match="40x48"):
        pixel(torch.randn(2, 3, 40, 48), sigma, text)
    bad = x_t.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="x_t"):
        pixel(bad, sigma, text)
    with pytest.raises(ValueError, match="sigma"):
        pixel(x_t, torch.tensor([0.5, float("inf")]), text)
    with pytest.raises(ValueError, match="sigma"):
        pixel(x_t, torch.rand(3), text)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        pixel(torch.randn(2, 4, H, W), sigma, text)
    with pytest.raises(ValueError, match="prediction"):
        pixel(x_t, sigma, text, prediction="eps")
    with pytest.raises(ValueError, match="base_rank"):
        AsymFlux2Transformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "patch_size": 16, "in_channels": 3, "base_rank": 769})


def test_gradient_checkpointing_matches(pixel) -> None:
    model = convert_transformer(build_tiny_transformer(), pixel.proj_buffer, pixel.scale_buffer).train()
    x_t, sigma, text = inputs()

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        u = model(x_t, sigma, text)
        u.square().mean().backward()
        return u.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    u_plain, grads_plain = run()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    u_ckpt, grads_ckpt = run()
    assert torch.equal(u_plain, u_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == len(list(model.parameters()))
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_text_gives_the_raw_forward_bitwise(pixel, dtype) -> None:
    """Context that is already context_embedder's output (a projected text cache) skips that layer and nothing else:
    the same op on the same input, so the same bits, in fp32 and in bf16, for both predictions."""
    model = convert_transformer(build_tiny_transformer(), pixel.proj_buffer, pixel.scale_buffer).to(dtype).eval()
    x_t, sigma, text = inputs()
    text = text.to(dtype)
    with torch.no_grad():
        projected = model.context_embedder(text.to(model.dtype))  # what the parent's forward computes first
        assert projected.shape == (2, L, model.inner_dim) and projected.dtype == dtype
        raw_out = {}
        for prediction in ("velocity", "x0"):
            raw_out[prediction] = model(x_t, sigma, text, prediction=prediction)
            got = model(x_t, sigma, projected, prediction=prediction, text_projected=True)
            assert torch.equal(got, raw_out[prediction])
        # The layer is only skipped for the call: the model still takes raw text afterwards, with the same result.
        assert isinstance(model.context_embedder, torch.nn.Linear)
        assert torch.equal(model(x_t, sigma, text), raw_out["velocity"])
        with pytest.raises(ValueError, match=rf"\[B,L,{model.inner_dim}\] for projected"):
            model(x_t, sigma, text, text_projected=True)
        with pytest.raises(ValueError, match=r"\[B,L,96\] for raw"):
            model(x_t, sigma, projected)
