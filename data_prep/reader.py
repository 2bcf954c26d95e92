"""Training-side sample reader: open a dataset (manifest, sample table, cache) and read one sample by byte range."""
from __future__ import annotations

import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import torch
from PIL import Image
from safetensors import SafetensorError

from asymflow.families import get_family

from .cache import (
    CACHE_DIR,
    CACHE_SCHEMA,
    LATENT_NAME,
    LATENT_SUFFIX,
    NEGATIVE_FILE,
    TABLE_FILE,
    TEXT_NAME,
    TEXT_SUFFIX,
    CacheMismatchError,
    bytes_to_tensor,
    bytes_to_tensors,
    load_cache_manifest,
)
from .decode import decode_image, find_image
from .format import TEXT_SUFFIX as CAPTION_SUFFIX
from .format import join, load_manifest, load_sample_table, manifest_hash, read_parquet, read_sample_bytes

LATENT_CHANNELS = 128  # FLUX.2: 32 VAE channels × 2×2 packing
# The family text tensor that is the transformer's encoder_hidden_states (the training batch's text_embeds); the
# family's other named text tensors travel beside it (`split_text`).
FAMILY_MAIN_TEXT = "encoder_hidden_states"
PIXELS_PER_LATENT = 16  # VAE 8× × latent patch 2
# What reading untrusted shard bytes can raise: I/O, tar structure, image codecs, safetensors, missing members.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, tarfile.TarError, SafetensorError, Image.DecompressionBombError)


class CorruptSampleError(Exception):
    """A sample could not be read (missing/short shard, bad tar, missing member, undecodable or wrong-shape data).

    The loader logs, counts and skips these; `shard` is the path of the offending shard relative to DATA.
    """

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(f"corrupt sample {key!r} in shard {shard!r}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


def read_image_sample(
    data_dir: str, row: Mapping[str, Any], fs: fsspec.AbstractFileSystem | None = None
) -> tuple[torch.Tensor, str]:
    """(image [3,H,W] in [−1,1], caption) of one samples.parquet row; CorruptSampleError on any failure."""
    shard, key = row["shard"], row["key"]
    try:
        members = read_sample_bytes(data_dir, row, fs=fs)
        suffix, data = find_image(members)
        image = decode_image(suffix, data)
        caption = members.get(CAPTION_SUFFIX, b"").decode("utf-8")
    except _READ_ERRORS as e:
        raise CorruptSampleError(shard, key, f"{type(e).__name__}: {e}") from e
    expected = (3, row["height"], row["width"])
    if tuple(image.shape) != expected:
        raise CorruptSampleError(shard, key, f"image is {tuple(image.shape)}, the table says {expected}")
    return image, caption


@dataclass
class DatasetIndex:
    """A dataset's manifest and per-sample table, joined with its latent/text cache when there is one.

    `table` has SAMPLE_SCHEMA's columns (key, shard, index, bucket, width, height, offset, size, ...) and, with
    a cache, `cache_shard`, `cache_offset`, `cache_size`, `cache_latent_size`; rows are in (shard, position) order.
    """

    data_dir: str
    manifest: dict[str, Any]
    manifest_hash: str
    table: pa.Table
    cache_manifest: dict[str, Any] | None
    fs: fsspec.AbstractFileSystem

    @classmethod
    def open(cls, data_dir: str) -> DatasetIndex:
        """Read DATA/index.json, DATA/samples.parquet and, if present, DATA/cache/ (which must be complete and
        built for this exact manifest)."""
        manifest = load_manifest(data_dir)
        digest = manifest_hash(manifest)
        table = load_sample_table(data_dir)
        cache = load_cache_manifest(data_dir)
        if cache is not None:
            table = _join_cache(data_dir, table, cache, digest)
        fs, _ = fsspec.core.url_to_fs(data_dir)
        return cls(data_dir, manifest, digest, table, cache, fs)

    @property
    def has_cache(self) -> bool:
        return self.cache_manifest is not None

    @property
    def cache_dir(self) -> str:
        return join(self.data_dir, CACHE_DIR)

    @property
    def family(self) -> str:
        """The model family of the cache (index.json's "family"; caches without it are FLUX.2's)."""
        return (self.cache_manifest or {}).get("family", "flux2")

    @property
    def text_tensors(self) -> tuple[str, ...]:
        """Names of the cached text tensors: ("text_embeds",) for FLUX.2, the family's otherwise."""
        return tuple((self.cache_manifest or {}).get("text_tensors", (TEXT_NAME,)))

    @property
    def text_projected(self) -> bool:
        """The cached text is context_embedder's output (`prep cache --text-form projected`), not the raw states;
        caches from before the text form was recorded hold raw states."""
        return (self.cache_manifest or {}).get("text_form", "raw") == "projected"

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict[str, Any]:
        """Row i of `table` as a dict (what `read_training_sample` takes)."""
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def negative_embeds(self) -> torch.Tensor:
        """The cached empty-prompt embedding [L, D] (fp32), the negative prompt for guidance."""
        self._require_cache()
        with fsspec.open(join(self.cache_dir, NEGATIVE_FILE), "rb") as f:
            return bytes_to_tensor(f.read(), TEXT_NAME)

    def negative_text(self) -> dict[str, torch.Tensor]:
        """The cached empty-prompt text tensors by name (fp32), for any family."""
        self._require_cache()
        with fsspec.open(join(self.cache_dir, NEGATIVE_FILE), "rb") as f:
            return bytes_to_tensors(f.read(), self.text_tensors)

    def _require_cache(self) -> None:
        if not self.has_cache:
            raise FileNotFoundError(f"{self.data_dir} has no latent/text cache; run `asymflow prep cache {self.data_dir} --config ...`")


def _join_cache(data_dir: str, table: pa.Table, cache: Mapping[str, Any], digest: str) -> pa.Table:
    """Append the cache table's columns (as cache_*) to the sample table after checking they describe the same rows."""
    cache_dir = join(data_dir, CACHE_DIR)
    if cache["manifest_hash"] != digest:
        raise CacheMismatchError(
            f"{cache_dir} was built for another version of this dataset (manifest hash {cache['manifest_hash'][:12]}…, "
            f"dataset {digest[:12]}…); rebuild it with `asymflow prep cache {data_dir} --config ... --overwrite`"
        )
    if not cache["complete"]:
        raise CacheMismatchError(f"{cache_dir} is incomplete; finish it by rerunning `asymflow prep cache {data_dir} --config ...`")
    with fsspec.open(join(cache_dir, TABLE_FILE), "rb") as f:
        cached = read_parquet(f)
    # Both tables are written in (shard order, position) order, so equal key columns mean row i ↔ row i.
    if not cached["key"].equals(table["key"]):
        raise CacheMismatchError(f"{cache_dir}/{TABLE_FILE} does not list the dataset's samples in order; rebuild with --overwrite")
    for name in CACHE_SCHEMA.names[1:]:
        table = table.append_column(f"cache_{name}", cached[name])
    return table


def read_cached(index: DatasetIndex, row: Mapping[str, Any], *, text: bool = True) -> dict[str, torch.Tensor]:
    """{"latents": [128, H/16, W/16], "text_embeds": [L, D]} (fp32) of one row by byte range from the cache shard;
    for another family's cache, "latents" [C_lat·q², H/p, W/p] and its named text tensors (`index.text_tensors`).

    `text=False` reads only the latent member (a prefix of the sample's range), e.g. for the subspace fit.
    """
    index._require_cache()
    shard, key = f"{CACHE_DIR}/{row['cache_shard']}", row["key"]
    size = row["cache_size"] if text else row["cache_latent_size"]
    location = {"shard": row["cache_shard"], "offset": row["cache_offset"], "size": size}
    try:
        members = read_sample_bytes(index.cache_dir, location, fs=index.fs)
        out = {LATENT_NAME: bytes_to_tensor(members[LATENT_SUFFIX], LATENT_NAME)}
        if text:
            out.update(bytes_to_tensors(members[TEXT_SUFFIX], index.text_tensors))
    except _READ_ERRORS as e:
        raise CorruptSampleError(shard, key, f"{type(e).__name__}: {e}") from e
    family = get_family(index.family)  # FLUX.2: 128 channels on the 16×16 pixel patch grid
    expected = (family.latent_dim, row["height"] // family.pixel_patch, row["width"] // family.pixel_patch)
    if tuple(out[LATENT_NAME].shape) != expected:
        raise CorruptSampleError(shard, key, f"latents are {tuple(out[LATENT_NAME].shape)}, expected {expected}")
    if text and TEXT_NAME in out and out[TEXT_NAME].ndim != 2:
        raise CorruptSampleError(shard, key, f"text embeddings are {tuple(out[TEXT_NAME].shape)}, expected [L, D]")
    for name, x in out.items():
        if not torch.isfinite(x).all():
            raise CorruptSampleError(shard, key, f"{name} contain NaN or inf")
    return out


def split_text(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(text_embeds, {name: tensor} of the others) from a sample's or the negative's named text tensors `names`:
    FLUX.2's single text_embeds, or a family's encoder_hidden_states and its extras (pooled projections, masks)."""
    main = TEXT_NAME if TEXT_NAME in names else FAMILY_MAIN_TEXT
    if main not in names:
        raise ValueError(f"the cache's text tensors {list(names)} include neither {TEXT_NAME} nor {FAMILY_MAIN_TEXT}")
    return tensors[main], {name: tensors[name] for name in names if name != main}


def read_training_sample(index: DatasetIndex, row: Mapping[str, Any] | int) -> dict[str, Any]:
    """One training sample: key, caption, image [3,H,W] in [−1,1], latents [128,H/16,W/16], text_embeds [L,D] (fp32).

    Two byte-range reads (image shard, cache shard); raises CorruptSampleError(shard, key, reason) on bad data.
    """
    if isinstance(row, int):
        row = index.row(row)
    image, caption = read_image_sample(index.data_dir, row, fs=index.fs)
    return {"key": row["key"], "caption": caption, "image": image, **read_cached(index, row)}
