"""AsymFlowVR objective (spec §8, §14 #11): VR coefficient, ρ, targets, perceptual distances and the step seam."""
import math

import pytest
import torch
from pydantic import ValidationError

from asymflow.objective import (
    AsymFlowVRConfig,
    asymflow_vr_step,
    loss_shift_ratio,
    low_rank_twin,
    perceptual_gate,
    vr_coefficient,
    vr_target,
)
from asymflow.oklab import oklab_decode, oklab_encode
from asymflow.patching import pack, patchify, unpatchify_unpacked_channels
from asymflow.perceptual import LPIPSDistance, TinyConvDistance, build_image_distance
from asymflow.timesteps import TimestepSampler

from .helpers import random_basis
from .test_trainable import one_thread, tiny_batch, tiny_pair  # noqa: F401  (one_thread: autouse fixture)

P = 16


def _gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _per_patch(alpha: torch.Tensor) -> torch.Tensor:
    """[B,C,1,h,w] per-patch values -> [B,C,H,W] image constant inside each patch."""
    return unpatchify_unpacked_channels(alpha.expand(-1, -1, P * P, -1, -1), P)


# ---------------------------------------------------------------- VR coefficient (spec §14 #11)


def test_vr_coefficient_recovers_per_patch_alpha():
    d_low = _gaussian(2, 3, 32, 48)
    alpha = torch.rand(2, 3, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = vr_coefficient(_per_patch(alpha) * d_low, d_low, P)
    assert lam.shape == (2, 3, 1, 2, 3) and lam.dtype == torch.float64
    torch.testing.assert_close(lam, alpha, rtol=0, atol=1e-12)


def test_vr_coefficient_clamps_and_is_finite_for_zero_teacher_error():
    d_low = _gaussian(1, 3, 32, 32)
    alpha = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 1, 2, 2)
    lam = vr_coefficient(_per_patch(alpha) * d_low, d_low, P)
    assert torch.equal(lam[:, 0], torch.ones_like(lam[:, 0]))
    assert torch.equal(lam[:, 1], torch.zeros_like(lam[:, 1]))
    torch.testing.assert_close(lam[:, 2], torch.full_like(lam[:, 2], 0.5), rtol=0, atol=1e-12)
    zero = vr_coefficient(d_low, torch.zeros_like(d_low), P)
    assert torch.isfinite(zero).all() and torch.equal(zero, torch.zeros_like(zero))
    # The 1e-4 floor: a tiny teacher error (mean square 1e-8) gives λ = α·1e-8/1e-4, not α.
    tiny = 1e-4 * torch.sign(d_low)
    torch.testing.assert_close(vr_coefficient(0.5 * tiny, tiny, P), torch.full((1, 3, 1, 2, 2), 0.5e-4, dtype=torch.float64))


def test_vr_coefficient_is_fp32_for_low_precision_inputs():
    d = _gaussian(1, 3, 16, 16, dtype=torch.bfloat16)
    assert vr_coefficient(d, d, P).dtype == torch.float32


def test_vr_target_identities():
    x_0 = _gaussian(2, 3, 32, 32, seed=3)
    d_low = _gaussian(2, 3, 32, 32, seed=4)
    alpha = torch.rand(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    d_full = _per_patch(alpha) * d_low
    lam = vr_coefficient(d_full, d_low, P)
    # ρ = 1: no variance reduction, the target is x_0 itself.
    assert torch.equal(vr_target(x_0, d_low, lam, torch.tensor(1.0, dtype=torch.float64), P), x_0)
    # ρ = 0 and a student error fully explained by the teacher's: target == student prediction x_0 − d_full.
    torch.testing.assert_close(vr_target(x_0, d_low, lam, torch.tensor(0.0, dtype=torch.float64), P), x_0 - d_full)


def test_perceptual_gate_is_channel_rms_repeated_over_patch():
    lam = torch.tensor([0.0, 0.6, 0.8]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 2, 3)
    gate = perceptual_gate(lam, P)
    assert gate.shape == (1, 1, 32, 48)
    torch.testing.assert_close(gate, torch.full_like(gate, math.sqrt((0.36 + 0.64) / 3)))


# ---------------------------------------------------------------- shifted signal ratio ρ (spec §8 step 7)


def test_loss_shift_ratio_values():
    s_l = 0.3
    sigma = torch.tensor([0.0, 0.5, 1 / (1 + s_l), 0.9, 0.95, 1.0], dtype=torch.float64)
    rho = loss_shift_ratio(sigma, s_l)
    expected = [1.0, 0.25 / (0.25 + 0.15**2), 0.5, 0.01 / (0.01 + 0.27**2), 0.0025 / (0.0025 + 0.285**2), 0.0]
    torch.testing.assert_close(rho, torch.tensor(expected, dtype=torch.float64))
    assert rho[1].item() == pytest.approx(0.917, abs=1e-3)  # spec: ρ(0.5) = 0.92
    assert 1 / (1 + s_l) == pytest.approx(0.769, abs=1e-3)  # spec: ρ = 0.5 at σ ≈ 0.769
    assert rho[3].item() == pytest.approx(0.12, abs=5e-3) and rho[4].item() == pytest.approx(0.03, abs=5e-3)
    assert torch.equal(loss_shift_ratio(sigma, None), torch.zeros_like(sigma))


def test_default_sampler_quantiles_match_spec():
    sigma = AsymFlowVRConfig().sampler.sample(4000, torch.Generator().manual_seed(0)).double()
    # Exact: median = warp(1/2; 17) = 8.5/9; 5 % quantile = warp(sigmoid(−1.645); 17) ≈ 0.767.
    # Standard error of the sample median ≈ 1e-3 at n = 4000; tolerances are ~5 standard errors.
    assert sigma.median().item() == pytest.approx(8.5 / 9, abs=5e-3)
    assert torch.quantile(sigma, 0.05).item() == pytest.approx(0.767, abs=0.02)
    assert (sigma < 0.5).float().mean().item() < 0.01


# ---------------------------------------------------------------- low-rank twin and config


def test_low_rank_twin_maps_latent_tokens_through_scaled_basis():
    basis = random_basis(768, 128, seed=2, dtype=torch.float32)
    z = _gaussian(2, 128, 2, 3, seed=6, dtype=torch.float32)
    x_low = low_rank_twin(z, basis, 2.5, P)
    assert x_low.shape == (2, 3, 32, 48) and x_low.dtype == torch.float32
    torch.testing.assert_close(patchify(x_low, P) @ basis, 2.5 * pack(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent tokens"):
        low_rank_twin(z[:, :64], basis, 1.0, P)


def test_config_defaults_and_forbids_unknown_keys():
    cfg = AsymFlowVRConfig()
    assert (cfg.w_mse, cfg.w_perceptual, cfg.loss_shift, cfg.sigma_min_loss, cfg.vr_eps) == (10.0, 1.0, 0.3, 5e-2, 1e-4)
    assert cfg.sampler == TimestepSampler(True, 0.0, 1.0, 17.0) and cfg.caption_dropout == 0.0
    assert AsymFlowVRConfig(sampler={"shift": {"kind": "sqrt"}}).sampler.shift(1024.0**2) == pytest.approx(17.0)
    with pytest.raises(ValidationError, match="w_msee"):
        AsymFlowVRConfig(w_msee=1.0)
    with pytest.raises(ValidationError, match="caption_dropout"):
        AsymFlowVRConfig(caption_dropout=1.5)
    with pytest.raises(ValidationError, match="latent_patch"):
        AsymFlowVRConfig(patch_size=15)


# ---------------------------------------------------------------- perceptual distances


def test_tiny_conv_distance_map_properties():
    a = _gaussian(2, 3, 32, 32, seed=7, dtype=torch.float32).clamp(-1, 1)
    b = _gaussian(2, 3, 32, 32, seed=8, dtype=torch.float32).clamp(-1, 1).requires_grad_(True)
    dist = TinyConvDistance(seed=0)
    m = dist(b, a)
    assert m.shape == (2, 1, 32, 32) and m.dtype == torch.float32 and (m >= 0).all()
    assert torch.equal(m, TinyConvDistance(seed=0)(b, a))  # deterministic in the seed
    assert not torch.equal(m, TinyConvDistance(seed=1)(b, a))
    assert dist(a, a).abs().max().item() == 0.0
    m.mean().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dist.parameters())


def _lpips_style_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the lpips package's own key names (net.sliceN.i.*, linK.model.1.weight)."""
    slices = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
    where = {i: n for n, idx in slices.items() for i in idx}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in LPIPSDistance().state_dict().items():
        rand = (0.05 * torch.randn(value.shape, generator=g)).abs().half()
        if key.startswith("trunk.features."):
            i = int(key.split(".")[2])
            state[f"net.slice{where[i]}.{i}.{key.split('.')[-1]}"] = rand
        elif key.startswith("lins."):
            state[f"lin{key.split('.')[1]}.model.1.weight"] = rand
    return state


def test_lpips_from_local_weights(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPSDistance.from_local_weights(tmp_path / "missing.safetensors")
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(_lpips_style_state(), str(path))
    dist = build_image_distance("lpips", path)
    a = _gaussian(1, 3, 32, 32, seed=9, dtype=torch.float32).clamp(-1, 1)
    b = _gaussian(1, 3, 32, 32, seed=10, dtype=torch.float32).clamp(-1, 1)
    m = dist(a, b)
    assert m.shape == (1, 1, 32, 32) and (m >= 0).all() and m.sum() > 0
    assert dist(a, a).abs().max().item() == 0.0
    bad = tmp_path / "bad.safetensors"
    save_file({"foo": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not an LPIPS-VGG weight file"):
        LPIPSDistance.from_local_weights(bad)


def test_build_image_distance_kinds():
    assert build_image_distance("none") is None
    assert isinstance(build_image_distance("tiny"), TinyConvDistance)
    with pytest.raises(ValueError, match="weights_path"):
        build_image_distance("lpips")
    with pytest.raises(ValueError, match="unknown"):
        build_image_distance("vgg")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the step seam with the real converted tiny model


def test_seam_is_deterministic_in_the_generator_and_leaves_global_rng_alone():
    student, teacher = tiny_pair()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B so that LoRA dropout actually changes the output
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch, cfg, dist = tiny_batch(), AsymFlowVRConfig(), TinyConvDistance()
    probe = dict(x_t=torch.randn(1, 3, 32, 32, generator=g), sigma=torch.tensor([0.5]), encoder_hidden_states=batch["text_embeds"][:1])
    with torch.no_grad():
        assert not torch.equal(student(**probe), student(**probe))  # dropout is live in train mode
    rng_before = torch.get_rng_state()
    loss_a, m_a = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(7), cfg, dist)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.rand(3)  # a different global RNG state must not matter (LoRA dropout is seeded from the generator)
    loss_b, m_b = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(7), cfg, dist)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(m_a[k], m_b[k]) for k in m_a)
    loss_c, _ = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(8), cfg, dist)
    assert not torch.equal(loss_a, loss_c)
    expected = {"loss", "loss_mse", "loss_perceptual", "vr_lambda_mean", "sigma_mean", "rho_mean"}
    assert expected <= m_a.keys()
    assert all(v.ndim == 0 and v.dtype == torch.float32 and not v.requires_grad for v in m_a.values())
    assert 0.0 <= m_a["vr_lambda_mean"].item() <= 1.0 and m_a["loss_perceptual"].item() > 0


def test_seam_without_vr_is_plain_weighted_x0_mse_with_the_documented_draw_order():
    student, teacher = tiny_pair()
    student.eval()  # no LoRA dropout, so the manual student call below matches the seam's
    batch, cfg = tiny_batch(), AsymFlowVRConfig(use_vr=False)
    loss, metrics = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(3), cfg)
    g = torch.Generator().manual_seed(3)
    sigma = cfg.sampler.sample(2, g, seq_len=32 * 32)
    eps = torch.randn(2, 3, 32, 32, generator=g)
    x_0 = oklab_encode(batch["images"])
    sig = sigma.view(2, 1, 1, 1)
    x_t = (1 - sig) * x_0 + sig * eps
    with torch.no_grad():
        x_0_hat = x_t - sig * student(x_t=x_t, sigma=sigma, encoder_hidden_states=batch["text_embeds"])
    expected = 10.0 * 0.5 * ((x_0_hat - x_0) ** 2 / sig.clamp_min(0.05) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert metrics["loss_perceptual"].item() == 0.0 and metrics["vr_lambda_mean"].item() == 0.0
    torch.testing.assert_close(metrics["sigma_mean"], sigma.mean())


def test_seam_vr_terms_match_a_manual_recomputation():
    student, teacher = tiny_pair()
    student.eval()
    batch, cfg, dist = tiny_batch(), AsymFlowVRConfig(), TinyConvDistance()
    loss, metrics = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(4), cfg, dist)
    g = torch.Generator().manual_seed(4)
    sigma = cfg.sampler.sample(2, g, seq_len=32 * 32)
    eps = torch.randn(2, 3, 32, 32, generator=g)
    sig = sigma.view(2, 1, 1, 1)
    x_0 = oklab_encode(batch["images"])
    x_0_low = low_rank_twin(batch["latents"], teacher.proj_buffer, teacher.scale_buffer, P)
    x_t, x_t_low = (1 - sig) * x_0 + sig * eps, (1 - sig) * x_0_low + sig * eps
    text = batch["text_embeds"]
    with torch.no_grad():
        d_low = x_0_low - (x_t_low - sig * teacher(x_t=x_t_low, sigma=sigma, encoder_hidden_states=text))
        x_0_hat = x_t - sig * student(x_t=x_t, sigma=sigma, encoder_hidden_states=text)
    lam = vr_coefficient(x_0 - x_0_hat, d_low, P)
    rho, sc2 = loss_shift_ratio(sig), sig.clamp_min(0.05) ** 2
    mse = 5.0 * ((x_0_hat - vr_target(x_0, d_low, lam, rho, P)) ** 2 / sc2).mean()
    perc = (dist(oklab_decode(x_0_hat), oklab_decode(x_0)) * perceptual_gate(lam, P) * rho / sc2).mean()
    torch.testing.assert_close(metrics["loss_mse"], mse, rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["loss_perceptual"], perc, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.detach(), mse + perc, rtol=1e-5, atol=0)


def test_seam_caption_dropout_uses_negative_embeds():
    student, teacher = tiny_pair()
    batch = tiny_batch()
    dropped, _ = asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(1), AsymFlowVRConfig(caption_dropout=1.0))
    swapped = {**batch, "text_embeds": batch["negative_embeds"].expand(2, -1, -1)}
    manual, _ = asymflow_vr_step(student, teacher, swapped, torch.Generator().manual_seed(1), AsymFlowVRConfig())
    assert torch.equal(dropped, manual)
    without = {k: v for k, v in batch.items() if k != "negative_embeds"}
    with pytest.raises(KeyError, match="negative_embeds"):
        asymflow_vr_step(student, teacher, without, torch.Generator().manual_seed(1), AsymFlowVRConfig(caption_dropout=1.0))


def test_seam_rejects_bad_batches_and_a_training_teacher():
    student, teacher = tiny_pair()
    batch, cfg, gen = tiny_batch(), AsymFlowVRConfig(), torch.Generator().manual_seed(0)
    with pytest.raises(KeyError, match="latents"):
        asymflow_vr_step(student, teacher, {"images": batch["images"], "text_embeds": batch["text_embeds"]}, gen, cfg)
    with pytest.raises(ValueError, match="latent token grid"):
        asymflow_vr_step(student, teacher, {**batch, "latents": batch["latents"][..., :1]}, gen, cfg)
    with pytest.raises(RuntimeError, match="eval mode"):
        asymflow_vr_step(student, teacher.train(), batch, gen, cfg)
