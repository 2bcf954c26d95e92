"""`asymflow prep ...` subcommands (registered on the console script's parser); heavy imports happen per command."""
from __future__ import annotations

import argparse
import sys

SHARDS_EPILOG = """\
INPUT is one of:
  a directory tree of images (.jpg .jpeg .png .webp .bmp .tif .tiff .gif) with optional same-stem
    .txt or .json ({"caption": ...}) captions;
  a table (.csv .tsv .jsonl .parquet) with a path column (relative paths are relative to the table)
    and an optional caption column (auto-detected, or --path-column / --caption-column);
  existing WebDataset tars (img2dataset output included): a directory holding .tar files, one .tar,
    a glob or a brace pattern like 'data/{00000..00099}.tar'.
INPUT and OUTPUT may be local paths or fsspec URLs (s3://, gs://, file://).

OUTPUT gets shard-NNNNNN.tar, index.json (manifest), samples.parquet (per-sample table with byte
offsets) and skipped.jsonl (one {"source", "reason"} per skipped input). Every input is either written
or listed in skipped.jsonl. Shard j holds inputs [j*K, (j+1)*K) minus skips, so the output does not
depend on --workers. Rerunning the same command resumes a killed build (byte-identical result) and is a
no-op on a finished one.

exit codes: 0 completed; 1 nothing usable written; 2 fatal (output error, OUTPUT holds another build);
3 --strict and an input was skipped.
"""


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="build WebDataset pixel shards (+ manifest) from images, a caption table or existing tars",
        description="Build resumable, deterministic WebDataset shards of bucketed, resized images.",
        epilog=SHARDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="image directory, table file, or tar directory/pattern (local or URL)")
    p.add_argument("output", metavar="OUTPUT", help="output dataset directory (local or URL)")
    p.add_argument("--resolution", type=int, default=1024, metavar="N", help="buckets have area ≈ N² with sides multiples of 16 (default 1024)")
    p.add_argument("--aspect-ratios", default=None, metavar="W:H,...", help="bucket aspect ratios (default 1:2,9:16,2:3,3:4,4:5,1:1,5:4,4:3,3:2,16:9,2:1)")
    p.add_argument("--buckets", default=None, metavar="WxH,...", help="explicit bucket list, overriding --resolution/--aspect-ratios")
    p.add_argument("--shard-size", type=int, default=1000, metavar="K", help="inputs per shard (default 1000; skips make a shard smaller)")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="local worker processes (default: all cores)")
    p.add_argument("--format", dest="image_format", choices=("png", "jpg", "webp"), default="png", help="stored image encoding (default png: lossless)")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default 95; jpg is always 4:4:4; webp 100 = lossless)")
    p.add_argument("--png-compress-level", type=int, default=1, choices=range(10), metavar="0-9", help="zlib level for png, written with the run-length strategy (default 1)")
    p.add_argument("--min-side", type=int, default=64, help="skip images whose shorter side is below this (default 64)")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="decompression-bomb limit: skip images claiming more pixels (default 1e8)")
    p.add_argument("--upscale", action="store_true", help="upscale images smaller than their bucket (default: skip them as too_small)")
    p.add_argument("--path-column", default=None, help="table column with image paths/URLs (default: first of path,image_path,file,filename,image,url)")
    p.add_argument("--caption-column", default=None, help="table column with captions (default: first of caption,text,prompt,title)")
    p.add_argument("--strict", action="store_true", help="stop with exit code 3 at the first skipped input")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="run chunks as Ray tasks on this cluster ('local' starts one on loopback); OUTPUT must be reachable by every node")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_shards)


def _parse_ratios(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in (r.split(":") for r in text.split(",")))
    except ValueError:
        raise SystemExit(f"--aspect-ratios: expected 'W:H,W:H,...', got {text!r}") from None


def _run_shards(args: argparse.Namespace) -> int:
    from data_prep import format as fmt
    from data_prep.images import DEFAULT_ASPECT_RATIOS, ImageSpec, make_buckets
    from data_prep.shards import EXIT_FATAL, BuildConfig, build_shards

    if args.buckets:
        buckets = tuple(fmt.parse_bucket(b.strip()) for b in args.buckets.split(","))
        if any(w % 16 or h % 16 for w, h in buckets):
            raise SystemExit("--buckets: sides must be multiples of 16")
    else:
        if args.resolution <= 0 or args.resolution % 16:
            raise SystemExit(f"--resolution {args.resolution}: must be a positive multiple of 16")
        buckets = make_buckets(args.resolution, _parse_ratios(args.aspect_ratios) if args.aspect_ratios else DEFAULT_ASPECT_RATIOS)
    if args.shard_size <= 0:
        raise SystemExit("--shard-size must be positive")
    spec = ImageSpec(
        buckets=buckets, format=args.image_format, quality=args.quality, png_compress_level=args.png_compress_level,
        min_side=args.min_side, max_pixels=args.max_pixels, upscale=args.upscale,
    )
    cfg = BuildConfig(args.input, args.output, spec, args.shard_size, args.path_column, args.caption_column)
    try:
        report = build_shards(cfg, workers=args.workers, strict=args.strict, ray_address=args.ray_address, show_progress=not args.no_progress)
    except (OSError, ValueError) as e:  # unreadable INPUT listing, unwritable OUTPUT, bad table columns
        print(f"error: prep shards: {e}", file=sys.stderr)
        return EXIT_FATAL
    print(report.message, file=sys.stderr if report.exit_code else sys.stdout)
    return report.exit_code


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check shards against the manifest (counts, sizes, sha256; --full decodes every sample)",
        description="Check every shard listed in DATA/index.json: present, size, sha256, sample count, and the "
        "per-sample table. Exits 1 naming each bad shard.",
    )
    p.add_argument("data", metavar="DATA", help="dataset directory (local or URL)")
    p.add_argument("--full", action="store_true", help="also decode every sample and check it against the table")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from data_prep.format import load_manifest
    from data_prep.verify import verify_dataset

    load_manifest(args.data)  # not a dataset at all is a usage error (exit 2), not a bad shard (exit 1)
    problems, summary = verify_dataset(args.data, full=args.full, show_progress=not args.no_progress)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(summary, file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="bucket histogram and size distribution (printed, and plotted to a PNG)",
        description="Print the bucket histogram, stored-sample and source-image size distributions and skip "
        "reasons of DATA, and plot them to a PNG.",
    )
    p.add_argument("data", metavar="DATA", help="dataset directory (local or URL)")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot path (default DATA/stats.png)")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from data_prep.stats import dataset_stats

    text, plot = dataset_stats(args.data, plot=args.plot)
    print(text)
    print(f"plot: {plot}")
    return 0


def add_prep_commands(parser: argparse.ArgumentParser) -> None:
    """Register prep's subcommands; each sets `func(args) -> exit code`."""
    sub = parser.add_subparsers(dest="prep_command", metavar="PREP_COMMAND", required=True)
    _add_shards(sub)
    _add_verify(sub)
    _add_stats(sub)
    _add_cache_commands(sub)
    _add_lpips(sub)


# ---------------------------------------------------------------- prep cache / prep subspace


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    """`prep cache` (latents + text embeddings) and `prep subspace` (Procrustes/PCA fit)."""
    cache = sub.add_parser(
        "cache",
        help="cache VAE latents and text embeddings of every sample as sidecar shards in DATA/cache/",
        description="Encode every sample with the run config's base model (VAE latents, text embeddings, "
        "and the empty-prompt embedding) into DATA/cache/. Resumable: finished shards are skipped.",
    )
    cache.add_argument("data", metavar="DATA", help="dataset directory or fsspec URL written by `prep shards`")
    cache.add_argument("--config", required=True, help="run config YAML; its `model:` section names the base model")
    cache.add_argument("--batch-size", type=int, default=8, help="samples per encoder batch (same bucket) [8]")
    cache.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="storage dtype; fp8 e4m3 keeps a per-tensor scale [bf16]")
    cache.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    cache.add_argument(
        "--latent-posterior", choices=("sample", "mode"), default="sample",
        help="cache a posterior sample seeded by the sample key (spec §7, what training expects) or the posterior "
        "mean; recorded in cache/index.json [sample]",
    )
    cache.add_argument(
        "--text-form", choices=("raw", "projected"), default="raw",
        help="raw: the stacked text-encoder states; projected: the base transformer's context_embedder applied to "
        "them (1/3 of the bytes at klein 9B, the same conditioning; only for runs that keep context_embedder "
        "frozen, e.g. LoRA; training refuses it otherwise) [raw]",
    )
    cache.add_argument("--overwrite", action="store_true", help="delete an existing cache (e.g. from another model) and rebuild")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=_run_cache)

    subspace = sub.add_parser(
        "subspace",
        help="fit the pixel subspace (B, s) on N shuffled samples and write DATA/subspace.safetensors",
        description="Stream N shuffled samples (image + cached latents) through the Procrustes fit (or PCA for "
        "from-scratch pixel models) and write the subspace artifact, recording the dataset's manifest hash.",
    )
    subspace.add_argument("data", metavar="DATA", help="dataset directory or fsspec URL (with `prep cache` done for procrustes)")
    subspace.add_argument("--config", required=True, help="run config YAML; its `model:` section must match the cache's model")
    subspace.add_argument("--num-images", type=int, default=1000, help="samples to fit on [1000]")
    subspace.add_argument("--method", choices=("procrustes", "pca"), default="procrustes", help="[procrustes]")
    subspace.add_argument("--rank", type=int, default=None, help="PCA rank [128]; Procrustes rank is the latent width")
    subspace.add_argument("--seed", type=int, default=2021, help="shuffle seed [2021]")
    subspace.add_argument("--colour", choices=("oklab", "rgb"), default=None, help="pixel encoding [oklab for procrustes, rgb for pca]")
    subspace.add_argument("--output", default=None, help="artifact path [DATA/subspace.safetensors]")
    subspace.add_argument("--no-progress", action="store_true", help="no progress bar")
    subspace.set_defaults(func=_run_subspace)


def _run_cache(args: argparse.Namespace) -> int:
    from .cache import CacheMismatchError, build_cache
    from .run_config import load_model_config

    try:
        summary = build_cache(
            args.data,
            load_model_config(args.config),
            batch_size=args.batch_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
            device=args.device,
            latent_posterior=args.latent_posterior,
            text_form=args.text_form,
            progress=not args.no_progress,
        )
    except (CacheMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: prep cache: {e}", file=sys.stderr)
        return 2
    print(summary.message)
    return 0


def _run_subspace(args: argparse.Namespace) -> int:
    from .run_config import load_model_config
    from .subspace_job import fit_subspace

    try:
        artifact, path = fit_subspace(
            args.data,
            load_model_config(args.config),
            num_images=args.num_images,
            method=args.method,
            rank=args.rank,
            seed=args.seed,
            colour=args.colour,
            output=args.output,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: prep subspace: {e}", file=sys.stderr)
        return 2
    print(
        f"subspace ({artifact.method}, rank {artifact.rank}, s={artifact.scale:.6g}) from "
        f"{artifact.extra['num_images']} images ({artifact.extra['skipped']} corrupt skipped) -> {path}"
    )
    return 0


# ---------------------------------------------------------------- prep lpips

LPIPS_EPILOG = """\
Inputs (nothing is downloaded; both are files you fetch once, anywhere, and copy here):
  --vgg16  torchvision's ImageNet VGG16 weights, e.g. vgg16-397923af.pth (the file
           torchvision.models.vgg16(weights="IMAGENET1K_V1") downloads into ~/.cache/torch/hub/checkpoints/,
           from https://download.pytorch.org/models/vgg16-397923af.pth), or any vgg16().state_dict() saved
           with torch.save or as safetensors. Only its features.* conv weights are used.
  --heads  the lpips package's linear heads weights/v0.1/vgg.pth. Default: found in the lpips package
           installed in this Python (never imported). Otherwise `pip download lpips --no-deps` and pass the
           wheel itself (lpips-*.whl) or the vgg.pth extracted from it.

OUT is the lpips.LPIPS(net='vgg') state dict in safetensors (loads into lpips itself and into
perceptual.weights_path), with metadata naming both inputs and their sha256, e.g.
  asymflow prep lpips --vgg16 vgg16-397923af.pth --out models/lpips_vgg.safetensors
"""


def _add_lpips(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lpips",
        help="write the LPIPS-VGG weights file (perceptual.weights_path) from torchvision VGG16 + lpips' heads",
        description="Convert a torchvision VGG16 state dict and the lpips package's v0.1 VGG linear heads into "
        "one safetensors file for `perceptual: {kind: lpips, weights_path: OUT}`.",
        epilog=LPIPS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--vgg16", required=True, metavar="FILE", help="torchvision VGG16 state dict (.pth or .safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="output safetensors file (written atomically)")
    p.add_argument("--heads", default=None, metavar="FILE",
                   help="lpips' weights/v0.1/vgg.pth, or an lpips wheel [the installed lpips package's]")
    p.set_defaults(func=_run_lpips)


def _run_lpips(args: argparse.Namespace) -> int:
    from asymflow.lpips_weights import convert_lpips_weights

    try:
        meta = convert_lpips_weights(args.vgg16, args.out, args.heads)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: prep lpips: {e}", file=sys.stderr)
        return 2
    print(f"LPIPS-VGG v0.1 weights -> {args.out} (VGG16 sha256 {meta['vgg16_sha256'][:12]}, heads {meta['heads_source']})")
    return 0
