"""Train the bundled tiny FLUX.2-style base (autoencoder, then latent transformer) on skimage's photos; write assets/tiny_base/.

A plain single-process CPU job with fixed seeds. Each stage stops at the first of its step count and its wall-clock
budget; the steps actually done are recorded in `train_state.json` and MODEL_CARD.md together with the command
that reproduces them exactly (`--ae-stop-after K --dit-stop-after K`, same `--ae-steps/--dit-steps`, since those set
the cosine schedules' horizons, and the same `--threads`).

    nice -n 15 .venv/bin/python scripts/train_tiny_base.py --out assets/tiny_base --ae-minutes 10 --dit-minutes 25
    .venv/bin/python scripts/train_tiny_base.py --out assets/tiny_base --card-only   # samples + card from saved weights
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asymflow.components import BaseModelConfig, load_base_components  # noqa: E402
from asymflow.latents import LATENT_PATCH, decode_latents, encode_latents  # noqa: E402
from asymflow.patching import image_position_ids, pack, patchify_grid, text_position_ids, unpack  # noqa: E402
from asymflow.text import encode_prompts  # noqa: E402
from asymflow.tiny import TINY_MAX_LENGTH, TINY_TEXT_LAYERS  # noqa: E402
from data_prep.corpus import BASE_PHOTOS, BASE_RESOLUTION, base_caption, photo_crop  # noqa: E402

# The 16 named photos of data_prep plus 4 more that ship in the scikit-image wheel (no downloads).
PHOTOS = BASE_PHOTOS
RESOLUTION = BASE_RESOLUTION

VAE_CONFIG = dict(
    block_out_channels=(16, 32, 64, 64),  # 8× down; (32, 64, 64, 64) is ~6× slower per step at 128 px
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=16,
    mid_block_add_attention=False,
)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=128,  # 32 latent channels × 2×2 packing
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=8,
    joint_attention_dim=32 * len(TINY_TEXT_LAYERS),  # the tiny Qwen3's stacked hidden states
    timestep_guidance_channels=128,
    mlp_ratio=3.0,
    axes_dims_rope=(8, 8, 8, 8),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
# Conditioning: the same in-code tiny text encoder/tokenizer that `kind: bundled` builds (tiny seed 0).
TEXT_MODEL = BaseModelConfig(kind="tiny", seed=0)
SAMPLE_SEED, SAMPLE_STEPS = 0, 20


def caption(name: str) -> str:
    return base_caption(name)


def load_photos() -> torch.Tensor:
    """The photos as 128×128 centre crops (short side resized to 128) in [−1,1]: [N,3,128,128]; grey → 3 channels."""
    crops = [torch.from_numpy(photo_crop(name, RESOLUTION)).permute(2, 0, 1) for name in PHOTOS]
    return torch.stack(crops).float() / 127.5 - 1.0


def cosine_lr(step: int, horizon: int, peak: float, final: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [−1,1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def save_part(model: torch.nn.Module, out: Path, sub: str) -> None:
    """fp16 safetensors in diffusers' save_pretrained layout (weights rounded once; every consumer sees these)."""
    model.to(torch.float16).save_pretrained(out / sub, safe_serialization=True)
    model.to(torch.float32)


def round_fp16_(model: torch.nn.Module) -> torch.nn.Module:
    """Round weights through fp16 in place so what follows sees exactly the shipped weights."""
    return model.to(torch.float16).to(torch.float32)


def text_embeddings() -> torch.Tensor:
    parts = load_base_components(TEXT_MODEL, ("text_encoder", "tokenizer"))
    return encode_prompts(
        parts.text_encoder, parts.tokenizer, [caption(n) for n in PHOTOS], TINY_TEXT_LAYERS, TINY_MAX_LENGTH
    ).float()


def velocity(transformer, z_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, hw: tuple[int, int]):
    """u = transformer(z_t tokens, σ) for packed latent tokens [B,h·w,128]; the FLUX.2 transformer scales σ by 1000."""
    return transformer(
        hidden_states=z_t,
        encoder_hidden_states=text,
        timestep=sigma,
        img_ids=image_position_ids(*hw),
        txt_ids=text_position_ids(text.shape[1]),
        return_dict=False,
    )[0]


@torch.no_grad()
def euler_sample(transformer, text: torch.Tensor, hw: tuple[int, int], seed: int = SAMPLE_SEED,
                 steps: int = SAMPLE_STEPS) -> torch.Tensor:
    """Euler over σ = 1 → 0 (uniform) from ε ~ N(0, I) drawn with `seed`: normalised latent grids [B,128,h,w]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(text.shape[0], hw[0] * hw[1], TRANSFORMER_CONFIG["in_channels"], generator=gen)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        u = velocity(transformer, z, sigmas[i].expand(z.shape[0]), text, hw).float()
        z = z + (sigmas[i + 1] - sigmas[i]) * u
    return unpack(z, *hw)


def train_autoencoder(args, images: torch.Tensor, log) -> tuple[torch.nn.Module, int, float]:
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(args.seed)
    vae = AutoencoderKLFlux2(**VAE_CONFIG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    data = torch.cat([images, images.flip(-1)])  # centre crops + horizontal flips
    gen = torch.Generator().manual_seed(args.seed + 10)
    stop = min(args.ae_steps, args.ae_stop_after or args.ae_steps)
    t0, last_save, step = time.time(), time.time(), 0
    while step < stop and (args.ae_stop_after or time.time() - t0 < args.ae_minutes * 60):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.ae_steps, 1e-3, 1e-4, 20)
        x = data[torch.randint(len(data), (args.ae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-9 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"ae step {step} mse {mse.item():.5f} psnr~{10 * math.log10(4 / mse.item()):.2f} "
                f"{time.time() - t0:.0f}s")
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save_part(vae, args.out, "vae")
            write_state(args.out, ae_steps_done=step, ae_seconds=time.time() - t0)
            last_save = time.time()
    minutes = (time.time() - t0) / 60
    vae = round_fp16_(vae.eval())
    fill_latent_stats_(vae, data)
    save_part(vae, args.out, "vae")
    write_state(args.out, ae_steps_done=step, ae_seconds=minutes * 60)
    return vae, step, minutes


@torch.no_grad()
def fill_latent_stats_(vae, images: torch.Tensor) -> None:
    """FLUX.2 normalises 2×2-patchified latents by `vae.bn`'s running stats: set them to the training latents'."""
    latents = torch.cat([vae.encode(x).latent_dist.mode() for x in images.split(8)])
    grid = patchify_grid(latents, LATENT_PATCH)  # [N,128,h,w]
    vae.bn.running_mean.copy_(grid.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(grid.var(dim=(0, 2, 3)))
    vae.bn.num_batches_tracked.fill_(1)


def train_transformer(args, z_0: torch.Tensor, text: torch.Tensor, log) -> tuple[torch.nn.Module, int, float]:
    """Rectified flow on the normalised latent tokens: x_t = (1−σ)x_0 + σε, target ε − x_0, σ logit-normal."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(args.seed + 1)
    transformer = Flux2Transformer2DModel(**TRANSFORMER_CONFIG).train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.dit_lr, weight_decay=0.0)
    hw = tuple(z_0.shape[-2:])
    x_0_all = pack(z_0)  # [N, h·w, 128]
    gen = torch.Generator().manual_seed(args.seed + 20)
    stop = min(args.dit_steps, args.dit_stop_after or args.dit_steps)
    t0, last_save, step, ema_loss = time.time(), time.time(), 0, None
    while step < stop and (args.dit_stop_after or time.time() - t0 < args.dit_minutes * 60):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.dit_steps, args.dit_lr, args.dit_lr / 10, 50)
        idx = torch.randint(len(x_0_all), (args.dit_batch,), generator=gen)
        x_0 = x_0_all[idx]
        eps = torch.randn(x_0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal(0, 1)
        x_t = (1 - sigma.view(-1, 1, 1)) * x_0 + sigma.view(-1, 1, 1) * eps
        loss = F.mse_loss(velocity(transformer, x_t, sigma, text[idx], hw), eps - x_0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"dit step {step} loss {ema_loss:.4f} {time.time() - t0:.0f}s")
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save_part(transformer, args.out, "transformer")
            write_state(args.out, dit_steps_done=step, dit_seconds=time.time() - t0, dit_loss=ema_loss)
            last_save = time.time()
    minutes = (time.time() - t0) / 60
    transformer = round_fp16_(transformer.eval())
    save_part(transformer, args.out, "transformer")
    write_state(args.out, dit_steps_done=step, dit_seconds=minutes * 60, dit_loss=ema_loss)
    return transformer, step, minutes


def write_state(out: Path, **kw) -> None:
    path = out / "train_state.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    state.update({k: (round(v, 4) if k.endswith(("_seconds", "_loss")) else v) for k, v in kw.items()})
    path.write_text(json.dumps(state, indent=1) + "\n")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def evaluate_and_write_card(args, images: torch.Tensor) -> dict:
    """Reload the saved fp16 weights (as every consumer will), measure, write samples.png, stats.json, MODEL_CARD.md."""
    parts = load_base_components(BaseModelConfig(kind="bundled", path=str(args.out)))
    vae, transformer = parts.vae, parts.transformer
    z_0 = torch.cat([encode_latents(vae, x) for x in images.split(8)])
    recon = torch.cat([decode_latents(vae, z) for z in z_0.split(8)])
    recon_psnr = psnr(recon, images)
    text = encode_prompts(parts.text_encoder, parts.tokenizer, [caption(n) for n in PHOTOS],
                          TINY_TEXT_LAYERS, TINY_MAX_LENGTH).float()
    torch.testing.assert_close(text, text_embeddings())  # the loader builds the training conditioning
    hw = tuple(z_0.shape[-2:])
    z_s = euler_sample(transformer, text, hw)
    samples = torch.cat([decode_latents(vae, z) for z in z_s.split(8)])
    sample_psnr = psnr(samples, images)
    # Recognised: the sample's latent is nearest (MSE) to its own photo's latent among all 20.
    dist = ((z_s.flatten(1)[:, None] - z_0.flatten(1)[None]) ** 2).mean(-1)
    nearest = dist.argmin(1)
    recognised = [PHOTOS[i] for i in range(len(PHOTOS)) if int(nearest[i]) == i]
    stats = {
        "sampler": {"kind": "euler", "steps": SAMPLE_STEPS, "seed": SAMPLE_SEED,
                    "noise": "torch.randn([20, 64, 128], generator=torch.Generator().manual_seed(seed)) packed tokens",
                    "sigmas": "linspace(1, 0, steps + 1)"},
        "captions": [caption(n) for n in PHOTOS],
        "latent_mean": z_s.mean().item(),
        "latent_std": z_s.std().item(),
        "per_sample_latent_mean": [round(v, 5) for v in z_s.flatten(1).mean(1).tolist()],
        "per_sample_latent_std": [round(v, 5) for v in z_s.flatten(1).std(1).tolist()],
        "latent_mse_to_own_photo": [round(v, 5) for v in dist.diagonal().tolist()],
        "recognised": recognised,
        "ae_psnr_mean": recon_psnr.mean().item(),
        "ae_psnr_per_photo": dict(zip(PHOTOS, [round(v, 3) for v in recon_psnr.tolist()])),
        "sample_psnr_mean": sample_psnr.mean().item(),
        "sample_psnr_per_photo": dict(zip(PHOTOS, [round(v, 3) for v in sample_psnr.tolist()])),
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")

    # Grid: per block of 10 photos, rows original / autoencoder reconstruction / latent-model sample.
    rows = []
    for lo in range(0, len(PHOTOS), 10):
        for t in (images, recon, samples):
            rows.append(np.concatenate(list(to_uint8(t[lo:lo + 10])), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out / "samples.png", optimize=True)

    state = json.loads((args.out / "train_state.json").read_text())
    (args.out / "MODEL_CARD.md").write_text(model_card(state, stats))
    return stats


def model_card(state: dict, stats: dict) -> str:
    per_photo = "\n".join(
        f"| {n} | `{caption(n)}` | {stats['ae_psnr_per_photo'][n]:.2f} | {stats['sample_psnr_per_photo'][n]:.2f} | "
        f"{'yes' if n in stats['recognised'] else 'no'} |" for n in PHOTOS
    )
    cmd = (f"nice -n 15 .venv/bin/python scripts/train_tiny_base.py --out assets/tiny_base --seed {state['seed']} "
           f"--threads {state['threads']} --ae-steps {state['ae_steps']} --ae-stop-after {state['ae_steps_done']} "
           f"--dit-steps {state['dit_steps']} --dit-stop-after {state['dit_steps_done']} "
           f"--dit-lr {state['dit_lr']} --ae-batch {state['ae_batch']} --dit-batch {state['dit_batch']}")
    return f"""# tiny_base: a tiny FLUX.2-style latent generator trained on scikit-image's bundled photos

Generated by `scripts/train_tiny_base.py` (do not edit by hand; rerun the script). Load it with
`load_base_components(BaseModelConfig(kind="bundled"))` (`asymflow.components`): transformer and VAE from
here (fp16 safetensors, diffusers `save_pretrained` layout, cast to `model.dtype` on load); text encoder and
tokenizer are the in-code tiny Qwen3 of `asymflow.tiny` with seed 2 (= tiny `seed: 0` + 2), as in training.

It memorises 20 photos: a toy, useful to show what a latent model loses to its autoencoder and what
AsymFlow's pixel-space conversion can recover. It is not a general image model.

## Data
{len(PHOTOS)} photos bundled with scikit-image (`data_prep.corpus.photo`): {", ".join(PHOTOS)}.
Short side resized to {RESOLUTION} (Lanczos), centre crop {RESOLUTION}×{RESOLUTION}, grey photos copied to 3
channels, the logo composited on white; pixels in [−1, 1]. The autoencoder also sees the horizontal flips;
the transformer sees only the crops (one target per caption, so samples can be compared with the photo).
Caption = the photo's name with spaces (`hubble deep field`).

## Autoencoder (`vae/`, `AutoencoderKLFlux2`)
Config: `{json.dumps(VAE_CONFIG)}` — 8× down, 32×16×16 latents, 128×8×8 after FLUX.2's 2×2 packing.
Trained {state['ae_steps_done']} steps in {state['ae_seconds'] / 60:.1f} min (cosine horizon {state['ae_steps']}),
MSE + 1e-9·KL, AdamW lr 1e-3 → 1e-4 cosine (20 warm-up steps), batch {state['ae_batch']}, posterior samples.
Its batch-norm latent statistics (`bn.running_mean/var`, 128 channels) are those of the 2×2-patchified
posterior modes of the 40 training images, so FLUX.2's latent normalisation is valid (the normalised
latents have mean 0, variance 1 per channel).
**Reconstruction PSNR (fp16 weights, posterior mode, 20 crops): {stats['ae_psnr_mean']:.2f} dB mean** — the
ceiling a latent model with this autoencoder cannot exceed.

## Latent transformer (`transformer/`, `Flux2Transformer2DModel`)
Config: `{json.dumps({k: v for k, v in TRANSFORMER_CONFIG.items() if v is not None})}`.
Conditioning: the caption through the tiny Qwen3 (`asymflow.text.encode_prompts`, layers {TINY_TEXT_LAYERS},
max length {TINY_MAX_LENGTH}) → [32, 96]. Rectified flow, x_t = (1−σ)x_0 + σε, target ε − x_0, σ logit-normal(0, 1),
`timestep=σ` (the model scales by 1000), RoPE ids `image_position_ids(8, 8)` / `text_position_ids(32)`.
Trained {state['dit_steps_done']} steps in {state['dit_seconds'] / 60:.1f} min (cosine horizon {state['dit_steps']}),
AdamW lr {state['dit_lr']} → {state['dit_lr'] / 10} cosine (50 warm-up steps), batch {state['dit_batch']}, grad clip 1,
final loss (EMA 0.98) {state['dit_loss']:.4f}.

## Samples (`samples.png`)
Euler, {SAMPLE_STEPS} uniform steps σ 1 → 0, noise seed {SAMPLE_SEED}, no guidance, decoded by the autoencoder.
Rows per block of 10 photos: original crop / autoencoder reconstruction / latent-model sample.
Recognised (sample latent nearest to its own photo's latent among the 20): **{len(stats['recognised'])}/20**.
Sample PSNR against the photo: {stats['sample_psnr_mean']:.2f} dB mean.

| photo | caption | AE recon PSNR (dB) | sample PSNR (dB) | recognised |
|---|---|---|---|---|
{per_photo}

Recorded statistics of the generated normalised latents (all 20 samples, this sampler and seed), checked by
`tests/asymflow/test_tiny_base.py`: mean {stats['latent_mean']:.5f}, std {stats['latent_std']:.5f}
(per-sample values in `stats.json`).

## Training run
Machine: 2 shared CPU cores (other jobs running), torch {torch.__version__}, {state['threads']} intra-op threads,
seed {state['seed']}. Reproduce exactly (same steps; wall-clock budgets do not apply with `--*-stop-after`):

    {cmd}

Sizes: transformer {state.get('transformer_params', 0) / 1e6:.2f} M params, VAE {state.get('vae_params', 0) / 1e6:.2f} M params (fp16).
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("assets/tiny_base"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ae-minutes", type=float, default=12.0)
    p.add_argument("--dit-minutes", type=float, default=30.0)
    p.add_argument("--ae-steps", type=int, default=1500, help="cosine horizon and step cap of the autoencoder")
    p.add_argument("--dit-steps", type=int, default=6000, help="cosine horizon and step cap of the transformer")
    p.add_argument("--ae-stop-after", type=int, default=0, help="stop after K steps, ignoring --ae-minutes (reruns)")
    p.add_argument("--dit-stop-after", type=int, default=0, help="stop after K steps, ignoring --dit-minutes (reruns)")
    p.add_argument("--ae-batch", type=int, default=16)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-lr", type=float, default=6e-4)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--card-only", action="store_true", help="only evaluate saved weights and rewrite the card")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    images = load_photos()
    if not args.card_only:
        (args.out / "train_state.json").unlink(missing_ok=True)
        write_state(args.out, seed=args.seed, threads=args.threads, ae_steps=args.ae_steps, dit_steps=args.dit_steps,
                    ae_batch=args.ae_batch, dit_batch=args.dit_batch, dit_lr=args.dit_lr)
        vae, ae_done, ae_min = train_autoencoder(args, images, log)
        log(f"autoencoder: {ae_done} steps in {ae_min:.1f} min")
        z_0 = torch.cat([encode_latents(vae, x) for x in images.split(8)])
        transformer, dit_done, dit_min = train_transformer(args, z_0, text_embeddings(), log)
        log(f"transformer: {dit_done} steps in {dit_min:.1f} min")
        write_state(args.out, vae_params=sum(t.numel() for t in vae.parameters()),
                    transformer_params=sum(t.numel() for t in transformer.parameters()))
    stats = evaluate_and_write_card(args, images)
    log(f"AE PSNR {stats['ae_psnr_mean']:.2f} dB; recognised {len(stats['recognised'])}/20; "
        f"latent mean {stats['latent_mean']:.4f} std {stats['latent_std']:.4f}")


if __name__ == "__main__":
    main()
