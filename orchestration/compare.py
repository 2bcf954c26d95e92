"""What fine-tuning bought, measured on a run checkpoint: `compare.png` and `metrics.json`.

Per photo of the run's dataset, four columns sampled from the SAME noise ε (one seed for every column):

  original         the photo as stored in the shards (the reference for every metric)
  latent           the base latent model's sample, decoded by its autoencoder
  pixel_init       the converted pixel model before any training (step 0)
  pixel_finetuned  the pixel model with the checkpoint's EMA (or trainable) weights

plus, in metrics.json only, the autoencoder's reconstruction of the photo (encode → decode): the ceiling a latent
model with this autoencoder cannot exceed. PSNR and SSIM of each against the original photo.

One sampler for all columns, with no guidance and no gamut clamp, so the step-0 column can be checked exactly:
Euler on the pixel grid σ_i = warp(τ_i; s) with τ_i = linspace(1, 0, n+1) (`FlowAdapterScheduler(solver="euler",
shift=s)`), whose calibrated times σ̃_i = σ_i/(s + (1−s)σ_i) are τ_i again; the latent model runs Euler on σ̃_i (its
own uniform schedule) from Bᵀε. Spec §5.3: the converted model's sample is then exactly x = s·B·z (z = the latent
sample, tokens patchified channel-first with p = 16) — checked here and recorded as `step0_check`.

    python -m orchestration.compare RUN_DIR [--step N] [--out DIR] [--steps 20] [--seed 0] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

COLUMNS = ("original", "latent", "pixel_init", "pixel_finetuned")
LABELS = {"original": "photo", "latent": "latent + AE", "pixel_init": "pixel step 0 (s*B*z)",
          "pixel_finetuned": "pixel fine-tuned"}
FP32_UNIT_ROUNDOFF = 2.0**-24
RGB_HALF_LEVEL = 1.0 / 255  # half an 8-bit level in [−1,1] units (one level = 2/255)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of [N,C,H,W] images with values spanning `data_range` (2 for [−1,1]); inf if equal."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM of [N,C,H,W] images (scikit-image, 7×7 uniform window, mean over pixels and channels)."""
    from skimage.metrics import structural_similarity

    out = [structural_similarity(x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(),
                                 channel_axis=2, data_range=data_range)
           for x, y in zip(a.cpu(), b.cpu())]
    return torch.tensor(out, dtype=torch.float64)


def step0_tolerances(steps: int, token_dim: int, rank: int, magnitude: float) -> dict[str, float]:
    """How far the step-0 column may be from s·B·z when both are computed in fp32.

    The two computations differ only in rounding: the converted model folds B into its input/output layers
    (W_in·Bᵀ applied to a D-vector instead of W_in applied to the r-vector Bᵀx, and (B·W_out)·h instead of
    B·(W_out·h)); the recovery and calibration are a few more fp32 operations. A length-n dot product in fp32 is
    off by at most n·u relative (u = 2⁻²⁴), so one step differs by ≤ (D + r)·u relative to the sample's
    `magnitude` (max |s·B·z|, normalised Oklab); n Euler steps add up to n times that (first order, no
    amplification by the network assumed). Decoded to RGB the step-0 column must be the same picture as s·B·z to
    within half an 8-bit level (1/255 in [−1,1] units): compare.png shows them identically up to one rounding step.
    """
    return {"oklab": steps * (token_dim + rank) * FP32_UNIT_ROUNDOFF * magnitude, "rgb": RGB_HALF_LEVEL}


def load_photos(data_dir: str, limit: int | None = None) -> tuple[list[str], list[str], torch.Tensor]:
    """(keys, captions, images [N,3,H,W] in [−1,1]) of the dataset's most common bucket, in dataset order."""
    from data_prep.reader import DatasetIndex, read_image_sample

    index = DatasetIndex.open(data_dir)
    rows = [index.row(i) for i in range(len(index))]
    bucket = Counter(r["bucket"] for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if r["bucket"] == bucket][:limit]
    samples = [read_image_sample(data_dir, r, fs=index.fs) for r in rows]
    return [r["key"] for r in rows], [c for _, c in samples], torch.stack([im for im, _ in samples])


@torch.no_grad()
def latent_euler(transformer, noise: torch.Tensor, text: torch.Tensor, sigmas: torch.Tensor, hw: tuple[int, int]):
    """Euler over `sigmas` (fp64, σ_0 = 1 → 0) of the latent transformer from packed noise tokens [B,h·w,r]."""
    from asymflow.patching import image_position_ids, text_position_ids

    z = noise.float()
    img_ids, txt_ids = image_position_ids(*hw), text_position_ids(text.shape[1])
    for i in range(len(sigmas) - 1):
        u = transformer(hidden_states=z.to(transformer.dtype), encoder_hidden_states=text.to(transformer.dtype),
                        timestep=torch.full((z.shape[0],), float(sigmas[i])).to(transformer.dtype),
                        img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        z = z + float(sigmas[i + 1] - sigmas[i]) * u.float()
    return z


def compare_columns(parts, basis: torch.Tensor, scale: float, finetuned, images: torch.Tensor, text: torch.Tensor,
                    *, steps: int = 20, seed: int = 0, batch: int = 10, patch: int = 16) -> dict:
    """Sample every column for `images`/`text` from one noise draw; returns tensors and the step-0 differences.

    parts: the base components (transformer, vae); basis [D,r] and scale s of the subspace; finetuned: a pixel
    model (x_t, sigma, encoder_hidden_states) -> velocity. Images in [−1,1] [N,3,H,W], text [N,L,D_txt].
    """
    from asymflow.convert import convert_transformer
    from asymflow.latents import decode_latents, encode_latents
    from asymflow.objective import low_rank_twin
    from asymflow.oklab import oklab_decode
    from asymflow.parameterisation import calibrate
    from asymflow.patching import patchify, unpack
    from asymflow.pipeline import sample_images
    from asymflow.scheduler import FlowAdapterScheduler

    n, _, height, width = images.shape
    h, w = height // patch, width // patch
    basis = basis.float()
    init = convert_transformer(parts.transformer, basis, scale).eval()
    scheduler = FlowAdapterScheduler(solver="euler", shift=float(scale))
    scheduler.set_timesteps(steps, seq_len=height * width)
    pixel_sigmas = scheduler.sigmas.double()  # warp(linspace(1, 0, n+1); s)
    latent_sigmas = calibrate(pixel_sigmas, torch.tensor(float(scale), dtype=torch.float64))[1]  # = linspace(1, 0)
    eps = torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))

    def pixel_sample(model, e, t):
        return sample_images(model, t, None, height=height, width=width, num_inference_steps=steps,
                             guidance_scale=1.0, clamp_denoised=False,
                             scheduler=FlowAdapterScheduler(solver="euler", shift=float(scale)), noise=e, decode=False)

    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("ae_reconstruction", "latent", "pixel_init",
                                                          "pixel_finetuned")}
    diff_oklab = diff_rgb = magnitude = 0.0
    for lo in range(0, n, batch):
        x, e, t = images[lo:lo + batch], eps[lo:lo + batch], text[lo:lo + batch].float()
        # The posterior mean: the ceiling is the autoencoder's deterministic reconstruction, not one noisy draw.
        out["ae_reconstruction"].append(decode_latents(parts.vae, encode_latents(parts.vae, x, "mode")).float())
        z = latent_euler(parts.transformer, patchify(e, patch) @ basis, t, latent_sigmas, (h, w))  # from Bᵀε
        grid = unpack(z, h, w)
        out["latent"].append(decode_latents(parts.vae, grid).float())
        low = low_rank_twin(grid, basis, scale, patch)  # s·B·z as an image (normalised Oklab)
        x0 = pixel_sample(init, e, t)
        diff_oklab = max(diff_oklab, (x0 - low).abs().max().item())
        magnitude = max(magnitude, low.abs().max().item())
        rgb0, rgb_low = oklab_decode(x0).clamp(-1, 1), oklab_decode(low).clamp(-1, 1)
        diff_rgb = max(diff_rgb, (rgb0 - rgb_low).abs().max().item())
        out["pixel_init"].append(rgb0)
        out["pixel_finetuned"].append(oklab_decode(pixel_sample(finetuned, e, t)).clamp(-1, 1))
    result = {k: torch.cat(v) for k, v in out.items()}
    result["step0_diff"] = {"oklab": diff_oklab, "rgb": diff_rgb, "magnitude": magnitude}
    result["sigmas"] = {"pixel": pixel_sigmas, "latent": latent_sigmas}
    return result


def compare_grid(columns: list[torch.Tensor], rows_per_block: int = 10, label_height: int = 14) -> np.ndarray:
    """uint8 image: per photo one row of the given columns ([N,3,H,W] in [−1,1] each); blocks of `rows_per_block`
    photos side by side, each block headed by the column labels."""
    from PIL import Image, ImageDraw

    tiles = [((c.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for c in columns]
    n, h, w = tiles[0].shape[:3]
    header = Image.new("RGB", (w * len(columns), label_height), "white")
    draw = ImageDraw.Draw(header)
    for j, name in enumerate(COLUMNS[: len(columns)]):
        draw.text((j * w + 3, 1), LABELS[name], fill="black")
    header = np.asarray(header)
    blocks = []
    for lo in range(0, n, rows_per_block):
        rows = [np.concatenate([t[i] for t in tiles], axis=1) for i in range(lo, min(n, lo + rows_per_block))]
        rows += [np.full_like(rows[0], 255)] * (rows_per_block - len(rows))  # pad the last block
        blocks.append(np.concatenate([header, *rows], axis=0))
    gap = np.full((blocks[0].shape[0], 8, 3), 255, dtype=np.uint8)
    return np.concatenate([x for b in blocks for x in (b, gap)][:-1], axis=1)


def _summary(values: torch.Tensor) -> dict:
    return {"mean": round(float(values.mean()), 4), "per_photo": [round(float(v), 4) for v in values]}


def compare_checkpoint(checkpoint: str, out_dir: str | Path, *, weights: str = "ema", steps: int = 20, seed: int = 0,
                       limit: int | None = None, data: str | None = None) -> dict:
    """compare.png and metrics.json in `out_dir` for one complete checkpoint directory; returns the metrics.

    The base model, the subspace (B, s) and the dataset (unless `data` is given) come from the checkpoint's own
    resolved config; the fine-tuned column uses its `weights` ("ema": what `asymflow export` writes)."""
    from PIL import Image

    from asymflow.components import load_base_components
    from asymflow.subspace import SubspaceArtifact
    from asymflow.text import encode_prompts
    from orchestration.artifacts import build_model_from_checkpoint
    from orchestration.config import local_file

    from orchestration import checkpoint as ckpt
    from asymflow.components import TRAINING_FAMILY
    from orchestration.config import RunConfig

    # the comparison samples base, init and fine-tuned models with asymflow.pipeline: FLUX.2's sampler and autoencoder
    family = RunConfig.model_validate(ckpt.read_state(checkpoint)["config"]).family()
    if family != TRAINING_FAMILY:
        raise ValueError(f"{checkpoint} trained a {family} model; asymflow compare is wired for {TRAINING_FAMILY} runs "
                         "only (sample the run with `asymflow sample`; its EMA previews are in RUN_DIR/samples/)")
    finetuned, cfg, state = build_model_from_checkpoint(checkpoint, weights)
    artifact = SubspaceArtifact.load(local_file(cfg.subspace_path), patch_size=cfg.objective.patch_size,
                                     rank=cfg.subspace.rank)
    parts = load_base_components(cfg.model)
    keys, captions, images = load_photos(data or str(cfg.data.path), limit)
    m = cfg.model
    text = encode_prompts(parts.text_encoder, parts.tokenizer, captions, m.text_hidden_layers, m.max_sequence_length)
    scale = float(artifact.scale)
    cols = compare_columns(parts, artifact.basis, scale, finetuned, images, text.float(), steps=steps, seed=seed,
                           patch=cfg.objective.patch_size)

    tol = step0_tolerances(steps, artifact.basis.shape[0], artifact.basis.shape[1], cols["step0_diff"]["magnitude"])
    scores = {name: {"psnr": _summary(psnr(cols[name], images)), "ssim": _summary(ssim(cols[name], images))}
              for name in ("ae_reconstruction", "latent", "pixel_init", "pixel_finetuned")}
    ceiling = scores["ae_reconstruction"]
    metrics = {
        "checkpoint": str(checkpoint),
        "step": int(state["step"]),
        "weights": weights,
        "photos": [{"key": k, "caption": c} for k, c in zip(keys, captions)],
        "columns": list(COLUMNS),
        "reference": "original: every PSNR/SSIM is against the photo as stored in the shards, images in [-1,1]",
        "sampler": {
            "solver": "euler", "steps": steps, "seed": seed, "guidance_scale": 1.0, "clamp_denoised": False,
            "noise": f"torch.randn([N,3,H,W], generator=manual_seed({seed})) for every column; latent model from B^T eps",
            "pixel_sigmas": "warp(linspace(1, 0, steps+1); s)",
            "latent_sigmas": "calibrated pixel sigmas s_i/(s + (1-s) s_i) = linspace(1, 0, steps+1)",
        },
        "subspace": {"scale": scale, "rank": int(artifact.basis.shape[1]), "token_dim": int(artifact.basis.shape[0])},
        "metrics": {"psnr_db": "10 log10(2^2 / MSE), per image, mean over photos",
                    "ssim": "skimage.metrics.structural_similarity(data_range=2, channel_axis), mean over photos"},
        "psnr": {k: v["psnr"] for k, v in scores.items()},
        "ssim": {k: v["ssim"] for k, v in scores.items()},
        "ae_ceiling": {"psnr": ceiling["psnr"]["mean"], "ssim": ceiling["ssim"]["mean"]},
        "step0_check": {
            "max_abs_diff_oklab": cols["step0_diff"]["oklab"],
            "max_abs_diff_rgb": cols["step0_diff"]["rgb"],
            "max_abs_sB_latent_sample": cols["step0_diff"]["magnitude"],
            "tolerance_oklab": tol["oklab"],
            "tolerance_rgb": tol["rgb"],
            "what": "pixel_init sample vs s*B*(latent sample): normalised Oklab (before decoding) and RGB in [-1,1]",
        },
    }
    check = metrics["step0_check"]
    check["ok"] = check["max_abs_diff_oklab"] <= tol["oklab"] and check["max_abs_diff_rgb"] <= tol["rgb"]
    fine = scores["pixel_finetuned"]
    metrics["finetuned_minus_ae_ceiling"] = {"psnr": round(fine["psnr"]["mean"] - ceiling["psnr"]["mean"], 4),
                                             "ssim": round(fine["ssim"]["mean"] - ceiling["ssim"]["mean"], 4)}
    metrics["finetuned_exceeds_ae_ceiling_psnr"] = fine["psnr"]["mean"] > ceiling["psnr"]["mean"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = compare_grid([images] + [cols[c] for c in COLUMNS[1:]])
    Image.fromarray(grid).save(out / "compare.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(metrics: dict) -> str:
    """The PSNR/SSIM means as a Markdown table (README, BENCHMARKS)."""
    names = {"ae_reconstruction": "autoencoder reconstruction (ceiling)", "latent": "latent model + AE decode",
             "pixel_init": "pixel model, step 0", "pixel_finetuned": f"pixel model, step {metrics['step']} (EMA)"}
    lines = ["| column | PSNR (dB) | SSIM |", "|---|---|---|"]
    for key, name in names.items():
        lines.append(f"| {name} | {metrics['psnr'][key]['mean']:.2f} | {metrics['ssim'][key]['mean']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="STORAGE/NAME of a run")
    parser.add_argument("--step", type=int, help="checkpoint step [latest complete]")
    parser.add_argument("--out", help="output directory [RUN_DIR/compare/step-N]")
    parser.add_argument("--weights", choices=("ema", "trainable"), default="ema", help="[ema]")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps for every column [20]")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, shared by every column [0]")
    parser.add_argument("--limit", type=int, help="at most this many photos [all of the most common bucket]")
    parser.add_argument("--data", help="dataset to compare on [the run config's data.path]")
    args = parser.parse_args(argv)
    # One intra-op thread: these small models run far faster single-threaded on a busy 2-core machine
    # (measured 19 s vs 140 s with 2 threads for the demo's compare, at a load average of ~4.4).
    torch.set_num_threads(1)

    from orchestration import checkpoint as ckpt
    from orchestration.artifacts import resolve_checkpoint

    path = resolve_checkpoint(args.run_dir, args.step)
    step = int(ckpt.read_state(path)["step"])
    out = args.out or f"{args.run_dir.rstrip('/')}/compare/{ckpt.step_name(step)}"
    metrics = compare_checkpoint(path, out, weights=args.weights, steps=args.steps, seed=args.seed, limit=args.limit,
                                 data=args.data)
    print(format_table(metrics))
    check = metrics["step0_check"]
    print(f"step 0 vs s*B*(latent sample): max |diff| {check['max_abs_diff_oklab']:.2e} (Oklab, tol "
          f"{check['tolerance_oklab']:.1e}), {check['max_abs_diff_rgb']:.2e} (RGB, tol {check['tolerance_rgb']:.1e})")
    print(f"wrote {out}/compare.png and {out}/metrics.json")
    if not check["ok"]:
        print("compare: the step-0 column is NOT s*B*(latent sample) within tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
