"""`asymflow prep ...` subcommands (registered on the console script's parser)."""
from __future__ import annotations

import argparse
import sys


def add_prep_commands(parser: argparse.ArgumentParser) -> None:
    """Register prep's subcommands; each sets `func(args) -> exit code`."""
    sub = parser.add_subparsers(dest="prep_command", metavar="PREP_COMMAND", required=True)
    _add_cache_commands(sub)


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
    cache.add_argument("--overwrite", action="store_true", help="delete an existing cache (e.g. from another model) and rebuild")
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
    subspace.set_defaults(func=_run_subspace)


def _run_cache(args: argparse.Namespace) -> int:
    from .cache import CacheMismatchError, build_cache
    from .run_config import load_model_config

    try:
        build_cache(
            args.data,
            load_model_config(args.config),
            batch_size=args.batch_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
            device=args.device,
        )
    except (CacheMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_subspace(args: argparse.Namespace) -> int:
    from .run_config import load_model_config
    from .subspace_job import fit_subspace

    try:
        fit_subspace(
            args.data,
            load_model_config(args.config),
            num_images=args.num_images,
            method=args.method,
            rank=args.rank,
            seed=args.seed,
            colour=args.colour,
            output=args.output,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
