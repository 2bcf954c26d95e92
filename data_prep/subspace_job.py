"""`prep subspace`: stream shuffled samples (image + cached latents) through asymflow's Procrustes or PCA fit."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Literal

import fsspec
import numpy as np
import torch

from asymflow.components import DATA_PREP_FAMILIES, TRAINING_FAMILY, BaseModelConfig
from asymflow.families import get_family
from asymflow.oklab import oklab_encode
from asymflow.patching import FeatureOrder, pack, patchify
from asymflow.subspace import PCAFit, ProcrustesFit, SubspaceArtifact

from .cache import CacheMismatchError
from .format import join
from .reader import PIXELS_PER_LATENT, CorruptSampleError, DatasetIndex, read_cached, read_image_sample

log = logging.getLogger(__name__)

SUBSPACE_FILE = "subspace.safetensors"
PATCH_SIZE = PIXELS_PER_LATENT  # one pixel token per latent token (spec §4.2)
Method = Literal["procrustes", "pca"]
Colour = Literal["oklab", "rgb"]
# Spec §4: Procrustes pairs channel-first Oklab tokens with FLUX.2 latent tokens; PCA (from-scratch models)
# uses the DiT channel-last order on plain [−1,1] RGB.
FEATURE_ORDER: dict[Method, FeatureOrder] = {"procrustes": "channel_first", "pca": "channel_last"}
DEFAULT_COLOUR: dict[Method, Colour] = {"procrustes": "oklab", "pca": "rgb"}
DEFAULT_PCA_RANK = 128  # the FLUX.2 latent token width, the rank a converted klein model expects


def sample_order(num_samples: int, seed: int) -> list[int]:
    """Row positions in the seeded shuffled order the fit consumes them (its first N rows, plus spares for skips)."""
    return np.random.default_rng(seed).permutation(num_samples).tolist()


def pixel_tokens(image: torch.Tensor, colour: Colour, order: FeatureOrder, patch: int = PATCH_SIZE) -> torch.Tensor:
    """image [3,H,W] in [−1,1] -> tokens [(H/p)(W/p), 3·p²] (Oklab-encoded or raw RGB, patchified with p=16 or the
    family's pixel patch; Oklab channel-first is `asymflow.families.fit.pixel_tokens`, the in-memory fit's)."""
    x = oklab_encode(image[None]) if colour == "oklab" else image[None].float()
    return patchify(x, patch, order)[0]


def fit_subspace(
    data_dir: str,
    cfg: BaseModelConfig,
    *,
    num_images: int = 1000,
    method: Method = "procrustes",
    rank: int | None = None,
    seed: int = 2021,
    colour: Colour | None = None,
    output: str | None = None,
    progress: bool = True,
) -> tuple[SubspaceArtifact, str]:
    """Fit B (and s) on `num_images` shuffled samples and write the artifact; returns (artifact, path written).

    Corrupt samples are skipped (logged and counted) and replaced by the next ones in the shuffled order.
    A model of another data-prep family (FLUX.1, SD3, Qwen-Image, Sana) is fitted with its token geometry (pixel
    patch p, latent width C_lat·q², tokens channel-first as `asymflow.families.fit`) from its cache; the artifact
    records the family.
    """
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"--num-images must be ≥ 1, got {num_images}")
    colour = colour or DEFAULT_COLOUR[method]
    order = FEATURE_ORDER[method]
    family = cfg.check_family(DATA_PREP_FAMILIES)
    spec = get_family(family)
    patch = spec.pixel_patch  # FLUX.2: PATCH_SIZE, with LATENT_CHANNELS = its latent_dim
    index = DatasetIndex.open(data_dir)
    if method == "procrustes":
        if not index.has_cache:
            raise FileNotFoundError(f"the Procrustes fit needs cached latents: run `asymflow prep cache {data_dir} --config ...` first")
        if index.cache_manifest["model_fingerprint"] != cfg.fingerprint():
            raise CacheMismatchError(
                f"the cache in {index.cache_dir} was built with model {index.cache_manifest['model_fingerprint']!r}, "
                f"the config names {cfg.fingerprint()!r}"
            )
        if index.family != family:
            raise CacheMismatchError(f"the cache in {index.cache_dir} holds {index.family} latents, the config's model "
                                     f"is of family {family}")
        if rank is not None and rank != spec.latent_dim:
            raise ValueError(f"--rank {rank}: a Procrustes fit's rank is the latent token width, {spec.latent_dim}")
        fit: ProcrustesFit | PCAFit = ProcrustesFit()
    else:
        fit = PCAFit((DEFAULT_PCA_RANK if family == TRAINING_FAMILY else spec.latent_dim) if rank is None else rank)

    used = skipped = 0
    with tqdm(total=min(num_images, len(index)), unit="img", desc=f"subspace ({method})", disable=not progress) as bar:
        for i in sample_order(len(index), seed):
            if used == num_images:
                break
            row = index.row(i)
            try:
                image, _ = read_image_sample(data_dir, row, fs=index.fs)
                latents = read_cached(index, row, text=False)["latents"] if method == "procrustes" else None
            except CorruptSampleError as e:
                log.warning("skipping %s", e)
                skipped += 1
                continue
            if latents is None:
                fit.update(pixel_tokens(image, colour, order, patch))
            else:
                # read_cached guarantees the latent grid is the image's p×p patch grid, so tokens pair by position.
                fit.update(pack(latents[None])[0], pixel_tokens(image, colour, order, patch))  # z [n,128], x [n,768]
            used += 1
            bar.update(1)
    if used == 0:
        raise ValueError(f"no readable samples in {data_dir} ({skipped} corrupt)")

    basis, scale = fit.solve() if isinstance(fit, ProcrustesFit) else (fit.solve(), 1.0)
    extra = {"family": family} if family != TRAINING_FAMILY else {}  # FLUX.2 artifacts keep their bytes
    artifact = SubspaceArtifact(
        basis=basis,
        scale=scale,
        patch_size=patch,
        feature_order=order,
        method=method,
        manifest_hash=index.manifest_hash,
        num_tokens=fit.num_tokens,
        extra={
            "num_images": str(used),
            "skipped": str(skipped),
            "seed": str(seed),
            "colour": colour,
            "model_fingerprint": cfg.fingerprint(),
            **extra,
        },
    )
    path = output or join(data_dir, SUBSPACE_FILE)
    _save_artifact(artifact, path)
    return artifact, path


def _save_artifact(artifact: SubspaceArtifact, path: str) -> None:
    """Save to a local temp file, then put it next to the target and rename (atomic for local paths)."""
    fs, target = fsspec.core.url_to_fs(path)
    with tempfile.TemporaryDirectory() as tmp_dir:
        local = os.path.join(tmp_dir, SUBSPACE_FILE)
        artifact.save(local)
        fs.makedirs(fs._parent(target), exist_ok=True)
        fs.put_file(local, f"{target}.tmp")
        fs.mv(f"{target}.tmp", target)
