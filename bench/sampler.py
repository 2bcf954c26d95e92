"""Adaptive vs fixed-schedule sampling on the bundled tiny base: error vs NFE against a 256-step reference.

Model: assets/tiny_base converted to pixel space (Procrustes subspace fitted on its own 20 training photos, as in
tests/asymflow/test_tiny_base.py), sampled at 128² (its training size) with the pipeline's defaults: orthogonal CFG
w = 4, γ = 1 against the empty prompt, clamp_denoised on. Every image is solved on its own (batch 1), so the adaptive
sampler picks its σ per prompt and seed. Error of each final image (decoded RGB in [−1,1]) against the reference:
PSNR (data range 2) and max |Δ| in 8-bit codes.

  reference   UniPC, 256 steps, dynamic shift (S = 17·√(H·W)/1024 = 2.125 at 128², spec §11.1)
  fixed       UniPC at 4, 8, 16, 32 steps with that dynamic shift (baseline) and with the static shift 17
              (FlowAdapterScheduler's default)
  adaptive    asymflow.adaptive at several tolerances (rtol = atol = tol)

Headline: the NFE the adaptive sampler needs to reach the mean PSNR of 32-step UniPC (log-linear interpolation
between measured tolerances), as a ratio against 32 (goal ≤ 0.7). Plot: bench/sampler.png. Records: results.jsonl.

    .venv/bin/python bench/sampler.py [--prompts 3] [--seeds 2] [--tols 0.1,0.05,...] [--no-record]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESOLUTION = 128
FIXED_STEPS = (4, 8, 16, 32)
REFERENCE_STEPS = 256
TOLS = (0.1, 0.05, 0.03, 0.02, 0.015, 0.01, 0.005)
TARGET_STEPS = 32  # the baseline: 32-step UniPC with the dynamic shift


def build_pixel_model():
    """(pixel model, text encoder, tokenizer, photo names): the bundled base converted with its own Procrustes fit."""
    from asymflow.components import BaseModelConfig, load_base_components
    from asymflow.convert import convert_transformer
    from asymflow.latents import encode_latents
    from asymflow.patching import pack
    from asymflow.subspace import ProcrustesFit
    from data_prep.corpus import BASE_PHOTOS, photo_crop
    from data_prep.subspace_job import pixel_tokens

    base = load_base_components(BaseModelConfig(kind="bundled"))
    images = torch.stack([torch.from_numpy(photo_crop(n, RESOLUTION)).permute(2, 0, 1) for n in BASE_PHOTOS])
    images = images.float() / 127.5 - 1.0
    with torch.no_grad():
        z_0 = torch.cat([encode_latents(base.vae, x) for x in images.split(10)])
    fit = ProcrustesFit()
    for z, image in zip(z_0, images):
        fit.update(pack(z[None])[0], pixel_tokens(image, "oklab", "channel_first"))
    basis, scale = fit.solve()
    pixel = convert_transformer(base.transformer, basis.float(), scale).eval()
    return pixel, base.text_encoder, base.tokenizer, list(BASE_PHOTOS), float(scale)


def error_metrics(images: torch.Tensor, reference: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per image: PSNR in dB (images in [−1,1], data range 2) and max |Δ| in 8-bit codes after rounding."""
    mse = ((images.double() - reference.double()) ** 2).flatten(1).mean(1)
    psnr = [float(10 * math.log10(4.0 / m)) if m > 0 else float("inf") for m in mse]
    codes = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    max_abs = [int(v) for v in (codes(images) - codes(reference)).abs().flatten(1).amax(1)]
    return psnr, max_abs


def nfe_to_reach(target_psnr: float, points: list[tuple[float, float]]) -> float | None:
    """Smallest NFE at which the curve of (nfe, psnr) points, sorted by NFE and interpolated linearly in log NFE,
    first reaches `target_psnr`; None if no measured point reaches it."""
    points = sorted(points)
    for (n0, p0), (n1, p1) in zip([(points[0][0], -math.inf)] + points[:-1], points):
        if p1 >= target_psnr:
            if p0 == -math.inf or p1 == p0:
                return n1
            t = (target_psnr - p0) / (p1 - p0)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3, help="N captions of the bundled base's photos, evenly spread [3]")
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt [2]")
    ap.add_argument("--tols", default=",".join(map(str, TOLS)), help="adaptive tolerances (rtol = atol)")
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG scale [4.0, the pipeline default]")
    ap.add_argument("--max-nfe", type=int, default=128, help="adaptive NFE budget [128]")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads [1: the box is shared]")
    ap.add_argument("--plot", default=str(common.REPO / "bench" / "sampler.png"))
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to results.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from asymflow.adaptive import AdaptiveConfig
    from asymflow.pipeline import sample_images
    from asymflow.scheduler import FlowAdapterScheduler
    from asymflow.text import encode_prompts
    from asymflow.timesteps import DynamicShift, resolve_shift
    from asymflow.tiny import TINY_MAX_LENGTH, TINY_TEXT_LAYERS
    from data_prep.corpus import base_caption

    t_start = time.perf_counter()
    load_start = common.load()
    pixel, text_encoder, tokenizer, names, scale = build_pixel_model()
    picks = [round(i * len(names) / args.prompts) for i in range(args.prompts)]  # 3: astronaut, colorwheel, gravel
    captions = [base_caption(names[i]) for i in picks]
    with torch.no_grad():
        cond = encode_prompts(text_encoder, tokenizer, captions, TINY_TEXT_LAYERS, TINY_MAX_LENGTH).float()
        neg = encode_prompts(text_encoder, tokenizer, [""], TINY_TEXT_LAYERS, TINY_MAX_LENGTH).float()
    jobs = [(p, s) for p in range(len(captions)) for s in range(args.seeds)]
    noise = {(p, s): torch.randn(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1000 * s + p))
             for p, s in jobs}
    dynamic = DynamicShift()
    seq_len = RESOLUTION * RESOLUTION
    tols = [float(t) for t in args.tols.split(",")]

    def run(p: int, s: int, **kw):
        return sample_images(pixel, cond[p:p + 1], neg, height=RESOLUTION, width=RESOLUTION,
                             guidance_scale=args.guidance, noise=noise[(p, s)], return_report=True, **kw)

    def fixed(steps: int, shift) -> tuple[torch.Tensor, list]:
        outs = [run(p, s, num_inference_steps=steps, scheduler=FlowAdapterScheduler(), shift=shift) for p, s in jobs]
        return torch.cat([o[0] for o in outs]), [o[1] for o in outs]

    progress(f"{len(jobs)} images: {captions} × seeds 0..{args.seeds - 1}")
    reference, _ = fixed(REFERENCE_STEPS, dynamic)
    # How far can the reference be trusted? The half-step run's distance to it bounds the reference's own error from
    # above if UniPC converges (error ≥ 4× smaller per doubling at order ≥ 2), and it is the floor below which the
    # candidates' figures say nothing. Where the model's x̂₀ still moves at tiny σ (here: max |Δ| of tens of codes on
    # a few pixels) max-abs has such a floor even though PSNR is high.
    progress("reference")
    ref_check, _ = fixed(REFERENCE_STEPS // 2, dynamic)
    ref_psnr, ref_max = error_metrics(ref_check, reference)

    rows: list[dict] = []
    for label, shift in (("unipc_dynamic", dynamic), ("unipc_static17", 17.0)):
        for steps in FIXED_STEPS:
            progress(f"{label} {steps} steps")
            images, reports = fixed(steps, shift)
            psnr, max_abs = error_metrics(images, reference)
            rows.append({"sampler": label, "steps": steps, "nfe": float(steps), "psnr": sum(psnr) / len(psnr),
                         "psnr_min": min(psnr), "max_abs": max(max_abs), "sigmas": reports[0].sigmas,
                         "last_sigma": reports[0].sigmas[-1]})
    adaptive_sigmas: dict[float, list[float]] = {}
    for tol in tols:
        progress(f"adaptive tol {tol:g}")
        outs = [run(p, s, sampler="adaptive", adaptive=AdaptiveConfig.from_tol(tol, max_nfe=args.max_nfe))
                for p, s in jobs]
        images, reports = torch.cat([o[0] for o in outs]), [o[1] for o in outs]
        psnr, max_abs = error_metrics(images, reference)
        nfes = [r.nfe for r in reports]
        adaptive_sigmas[tol] = [sg for r in reports for sg in r.sigmas]
        rows.append({"sampler": "adaptive", "tol": tol, "nfe": sum(nfes) / len(nfes), "nfe_min": min(nfes),
                     "nfe_max": max(nfes), "rejected": sum(r.rejected for r in reports) / len(reports),
                     "psnr": sum(psnr) / len(psnr), "psnr_min": min(psnr), "max_abs": max(max_abs),
                     "finished_by": sorted({r.finished_by for r in reports}),
                     "last_sigma": sum(r.accepted[-1] for r in reports) / len(reports)})

    # ------------------------------------------------------------------ report
    print(f"\nreference self-check ({REFERENCE_STEPS // 2} vs {REFERENCE_STEPS} steps): "
          f"PSNR {sum(ref_psnr) / len(ref_psnr):.1f} dB mean, "
          f"max |Δ| {max(ref_max)} codes")
    print(f"{'sampler':<16}{'steps/tol':>10}{'NFE':>8}{'PSNR dB':>9}{'min':>7}{'max|Δ|':>8}  notes")
    for r in rows:
        key = r.get("steps", r.get("tol"))
        notes = "" if r["sampler"] != "adaptive" else (
            f"NFE {r['nfe_min']}-{r['nfe_max']}, rejected {r['rejected']:.1f}/image, ends at σ≈{r['last_sigma']:.3f} "
            f"({','.join(r['finished_by'])})")
        print(f"{r['sampler']:<16}{key:>10}{r['nfe']:>8.1f}{r['psnr']:>9.2f}{r['psnr_min']:>7.1f}"
              f"{r['max_abs']:>8}  {notes}")
    target = next(r for r in rows if r["sampler"] == "unipc_dynamic" and r["steps"] == TARGET_STEPS)
    ada_points = [(r["nfe"], r["psnr"]) for r in rows if r["sampler"] == "adaptive"]
    needed = nfe_to_reach(target["psnr"], ada_points)
    static_needed = nfe_to_reach(target["psnr"], [(r["nfe"], r["psnr"]) for r in rows
                                                  if r["sampler"] == "unipc_static17"])
    ratio = None if needed is None else needed / TARGET_STEPS
    print(f"\nNFE to reach 32-step UniPC (dynamic shift, {target['psnr']:.2f} dB): adaptive "
          f"{'not reached' if needed is None else f'{needed:.1f}'}"
          f"{'' if ratio is None else f' → ratio {ratio:.2f}'} (goal ≤ 0.7); static-17 UniPC "
          f"{'not reached within 32' if static_needed is None else f'{static_needed:.1f}'}")
    # The same question for the two stricter readings of "the error": the worst image's PSNR, and max |Δ| (as −codes
    # so that higher is better for the interpolation).
    adaptive_rows = [r for r in rows if r["sampler"] == "adaptive"]
    also = {"worst_image_psnr": nfe_to_reach(target["psnr_min"], [(r["nfe"], r["psnr_min"]) for r in adaptive_rows]),
            "max_abs_codes": nfe_to_reach(-target["max_abs"], [(r["nfe"], -r["max_abs"]) for r in adaptive_rows])}
    for name, n in also.items():
        print(f"  by {name} (32-step UniPC: {target['psnr_min' if 'psnr' in name else 'max_abs']:.4g}): adaptive "
              f"{'not reached' if n is None else f'{n:.1f} NFE → ratio {n / TARGET_STEPS:.2f}'}")
    wall = time.perf_counter() - t_start

    floor = (sum(ref_psnr) / len(ref_psnr), max(ref_max))
    plot(args.plot, rows, adaptive_sigmas, needed, target, resolve_shift(dynamic, seq_len), floor)
    print(f"wrote {args.plot}  ({wall:.0f} s, load at start {load_start}, now {common.load()})")

    if not args.no_record:
        config = {"resolution": RESOLUTION, "prompts": captions, "seeds": args.seeds, "guidance": args.guidance,
                  "orthogonal_strength": 1.0, "clamp_denoised": True, "reference_steps": REFERENCE_STEPS,
                  "half_step_run_vs_reference": {"psnr_db": round(sum(ref_psnr) / len(ref_psnr), 2),
                                                 "max_abs_codes": max(ref_max)},
                  "dynamic_shift_at_128": resolve_shift(dynamic, seq_len), "tols": tols, "max_nfe": args.max_nfe,
                  "subspace_scale": scale, "model": "assets/tiny_base (bundled), converted, not fine-tuned",
                  "threads": args.threads, "wall_s": round(wall, 1)}
        common.record("sampler", "nfe_to_match_unipc32", needed if needed is not None else float("nan"),
                      float(TARGET_STEPS), ratio, "NFE (baseline: 32-step UniPC, dynamic shift; "
                      "ratio = adaptive/fixed, "
                      "goal ≤ 0.7)", config=config, target_psnr_db=round(target["psnr"], 3), reached=needed is not None)
        for name, n in also.items():
            common.record("sampler", f"nfe_to_match_unipc32_by_{name}", n if n is not None else float("nan"),
                          float(TARGET_STEPS), None if n is None else n / TARGET_STEPS,
                          f"NFE (as above, judged by {name.replace('_', ' ')} instead of mean PSNR)",
                          target=target["psnr_min" if "psnr" in name else "max_abs"], reached=n is not None)
        for r in rows:
            name = f"{r['sampler']}_{r['steps']}" if "steps" in r else f"adaptive_tol{r['tol']:g}"
            extra = {k: v for k, v in r.items() if k not in ("sigmas",)}
            common.record("sampler", f"psnr_db_{name}", round(r["psnr"], 3), round(target["psnr"], 3),
                          round(r["psnr"] - target["psnr"], 3),
                          "dB vs 256-step reference (baseline: 32-step UniPC dynamic; ratio column = difference in dB)",
                          **extra)
    return 0


def progress(what: str) -> None:
    print(f"[sampler] {what}  (load {common.load()})", file=sys.stderr, flush=True)


def plot(path: str, rows: list[dict], adaptive_sigmas: dict[float, list[float]], needed: float | None, target: dict,
         shift: float, floor: tuple[float, int]) -> None:
    """Left: PSNR vs NFE per sampler; middle: max |Δ| codes vs NFE; right: σ histogram of the adaptive evaluations
    (over prompts and seeds) at the tolerance nearest the 32-step error, with the dynamic-shift grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    styles = {"unipc_dynamic": ("UniPC, dynamic shift (S=%.3g)" % shift, "o-", "C0"),
              "unipc_static17": ("UniPC, static shift 17", "s--", "C1"), "adaptive": ("adaptive", "^-", "C3")}
    for name, (label, style, colour) in styles.items():
        pts = sorted((r["nfe"], r["psnr"], r["max_abs"]) for r in rows if r["sampler"] == name)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, label=label)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, color=colour, label=label)
    for r in rows:
        if r["sampler"] == "adaptive":
            axes[0].annotate(f"{r['tol']:g}", (r["nfe"], r["psnr"]), textcoords="offset points", xytext=(4, -10),
                             fontsize=7, color="C3")
    axes[0].axhline(target["psnr"], color="grey", lw=0.8, ls=":")
    axes[0].axhline(floor[0], color="k", lw=0.8, ls="-.", label=f"{REFERENCE_STEPS // 2}-step UniPC vs reference")
    axes[1].axhline(floor[1], color="k", lw=0.8, ls="-.", label=f"{REFERENCE_STEPS // 2}-step UniPC vs reference")
    if needed is not None:
        axes[0].axvline(needed, color="C3", lw=0.8, ls=":")
    axes[0].set(xscale="log", xlabel="NFE (model evaluations; a CFG pass counts once)",
                ylabel="PSNR vs 256-step ref (dB)",
                title=f"error vs NFE (32-step UniPC: {target['psnr']:.1f} dB; adaptive needs "
                      f"{'n/a' if needed is None else f'{needed:.1f}'})")
    axes[1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="max |Δ| (8-bit codes, worst image)",
                title="max-abs error")
    for ax in axes[:2]:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ada = [r for r in rows if r["sampler"] == "adaptive"]
    pick = min(ada, key=lambda r: abs(r["psnr"] - target["psnr"]))
    bins = [i / 40 for i in range(41)]
    n_images = len(adaptive_sigmas[pick["tol"]]) / max(pick["nfe"], 1)
    weights = [1.0 / n_images] * len(adaptive_sigmas[pick["tol"]])
    axes[2].hist(adaptive_sigmas[pick["tol"]], bins=bins, weights=weights, color="C3", alpha=0.6,
                 label=f"adaptive tol {pick['tol']:g} (mean NFE {pick['nfe']:.1f}), per image")
    grid = next(r for r in rows if r["sampler"] == "unipc_dynamic" and r["steps"] == TARGET_STEPS)["sigmas"]
    axes[2].hist(grid, bins=bins, histtype="step", color="C0", lw=1.5,
                 label=f"UniPC dynamic shift, {TARGET_STEPS} steps")
    grid16 = next(r for r in rows if r["sampler"] == "unipc_dynamic" and r["steps"] == 16)["sigmas"]
    axes[2].hist(grid16, bins=bins, histtype="step", color="C0", ls="--", lw=1.2, label="UniPC dynamic shift, 16 steps")
    axes[2].set(xlabel="σ where the model was evaluated (rejected tries included)",
                ylabel="evaluations per image per bin", title="where the steps go (σ)")
    axes[2].legend(fontsize=8)
    # The same in log-SNR λ = log((1−σ)/σ), the variable the solvers step in: σ bins crowd near 1.
    lam = lambda sg: [math.log((1 - v) / v) for v in sg if 0 < v < 1]  # noqa: E731
    lam_bins = [-10 + 0.5 * i for i in range(29)]
    axes[3].hist(lam(adaptive_sigmas[pick["tol"]]), bins=lam_bins, weights=weights, color="C3", alpha=0.6,
                 label=f"adaptive tol {pick['tol']:g}")
    axes[3].hist(lam(grid), bins=lam_bins, histtype="step", color="C0", lw=1.5, label=f"UniPC dynamic, {TARGET_STEPS}")
    axes[3].hist(lam(grid16), bins=lam_bins, histtype="step", color="C0", ls="--", lw=1.2, label="UniPC dynamic, 16")
    axes[3].set(xlabel="log-SNR λ of the evaluations", ylabel="evaluations per image per bin",
                title="where the steps go (λ)")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
