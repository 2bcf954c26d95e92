"""AsymFlow overhead: the converted pixel transformer's forward+backward vs the latent transformer at the same token
count, and the VAE decode a latent model pays at sampling (the pixel model pays none).

    .venv/bin/python bench/asymflow_overhead.py [--reps 7] [--tokens 1024]

Model: a FLUX.2-klein-shaped latent transformer somewhat larger than tiny so the matmuls dominate (4 heads × 64 =
256 wide, 2 double + 2 single blocks, 32 text tokens of width 96), random init, fp32, one CPU thread (stable on a
shared machine). Pixel model = `convert_transformer(latent, B, s)` with a random orthonormal B [768, 128].
Same token count: latent tokens [1, 1024, 128] (a 32×32 token grid) vs a 512×512 RGB image (32×32 patches of 16²).
The pixel model's extra work is its 768-wide in/out projections (vs 128), patchify/unpatchify and the recovery
algebra (calibration, projection onto B, division by σ). Both run in train mode with every parameter trainable;
loss = mean(output²); interleaved, median of --reps.
VAE decode: `asymflow.latents.decode_latents` with FLUX.2's real VAE architecture (AutoencoderKLFlux2 defaults:
128/256/512/512 channels, random init) on the same 1024-token latent grid → 512² image, and with the tiny test
VAE; ratio = decode / one latent-transformer forward at this (small) width.
"""
from __future__ import annotations

import argparse
import time

import common


def bench_model(width_heads: int = 4, head_dim: int = 64):
    from asymflow.tiny import build_tiny_transformer

    return build_tiny_transformer(0, num_attention_heads=width_heads, attention_head_dim=head_dim, num_layers=2,
                                  num_single_layers=2, axes_dims_rope=(16, 16, 16, 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=1024, help="a square number")
    ap.add_argument("--vae-reps", type=int, default=2)
    args = ap.parse_args()

    common.set_bench_environment()
    import torch

    from asymflow.convert import convert_transformer
    from asymflow.latents import decode_latents
    from asymflow.patching import image_position_ids, text_position_ids

    torch.set_num_threads(1)
    torch.manual_seed(0)
    side = int(args.tokens**0.5)
    assert side * side == args.tokens, "--tokens must be a square"
    latent = bench_model()
    basis, _ = torch.linalg.qr(torch.randn(768, 128, dtype=torch.float64))
    pixel = convert_transformer(latent, basis.float(), 1.5)
    for m in (latent, pixel):
        m.train().requires_grad_(True)
    text = torch.randn(1, 32, latent.config.joint_attention_dim)
    z = torch.randn(1, args.tokens, 128)
    x_t = torch.randn(1, 3, side * 16, side * 16)
    sigma = torch.tensor([0.7])
    img_ids, txt_ids = image_position_ids(side, side), text_position_ids(32)

    def latent_step(backward: bool = True) -> float:
        t0 = time.perf_counter()
        out = latent(hidden_states=z, encoder_hidden_states=text, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)[0]
        if backward:
            out.square().mean().backward()
            latent.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def pixel_step(backward: bool = True) -> float:
        t0 = time.perf_counter()
        out = pixel(x_t=x_t, sigma=sigma, encoder_hidden_states=text)
        if backward:
            out.square().mean().backward()
            pixel.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    latent_step(), pixel_step()  # warm-up (allocator, kernels)
    lat, pix = [], []
    for rep in range(args.reps):
        lat.append(latent_step())
        pix.append(pixel_step())
    with torch.no_grad():
        fwd = [latent_step(backward=False) for _ in range(3)]
    l, p = common.median(lat), common.median(pix)
    n_lat = sum(q.numel() for q in latent.parameters())
    n_pix = sum(q.numel() for q in pixel.parameters())
    config = {"latent": {"heads": 4, "head_dim": 64, "double": 2, "single": 2}, "tokens": args.tokens,
              "text_tokens": 32, "reps": args.reps, "threads": 1, "params_latent": n_lat, "params_pixel": n_pix}
    common.record("asymflow_overhead", "fwd_bwd_s_pixel_vs_latent", p, l, p / l,
                  "s per forward+backward, batch 1 (ratio = pixel/latent)", config=config,
                  overhead_pct=100 * (p / l - 1), per_rep_pixel=pix, per_rep_latent=lat)

    from diffusers import AutoencoderKLFlux2

    from asymflow.tiny import build_tiny_vae

    grid = torch.randn(1, 128, side, side)
    for name, vae in (("flux2_vae", AutoencoderKLFlux2().eval()), ("tiny_vae", build_tiny_vae(1))):
        decode_latents(vae, grid[:, :, :4, :4])  # warm-up
        times = []
        for _ in range(args.vae_reps):
            t0 = time.perf_counter()
            image = decode_latents(vae, grid)
            times.append(time.perf_counter() - t0)
        d = common.median(times)
        common.record("asymflow_overhead", f"vae_decode_s_{name}", d, common.median(fwd), d / common.median(fwd),
                      f"s per {image.shape[-1]}² decode (baseline: one latent-transformer forward at the bench width; "
                      "the pixel model decodes nothing)", config={**config, "vae_params": sum(q.numel() for q in vae.parameters())})


if __name__ == "__main__":
    main()
