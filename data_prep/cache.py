"""`prep cache`: per-sample VAE latents and text embeddings as safetensors members of sidecar shards in DATA/cache/.

Layout (next to the image shards; DATA may be a local path or an fsspec URL)::

    DATA/cache/index.json            {"version", "format", model identity, "dtype", "text_form", "manifest_hash",
                                      "num_samples", "complete", "shards": [{name, num_samples, bytes, sha256}]}
    DATA/cache/samples.parquet       CACHE_SCHEMA, rows in the image table's order (written once complete)
    DATA/cache/negative.safetensors  the empty-prompt embedding ("text_embeds" [L, D]), the negative prompt
    DATA/cache/<image shard name>    tar: `{key}.latent.safetensors` then `{key}.text.safetensors` per sample,
                                     samples in the image shard's order
    DATA/cache/parts/<shard>.parquet the finished shard's rows of samples.parquet (so a resumed run can rebuild it)

Each member is safetensors bytes holding `latents` [128, H/16, W/16] (normalised, 2×2-patchified) or
`text_embeds` [L, D], in bf16, or fp8 e4m3 with an fp32 per-tensor `{name}_scale` (spec §7). A shard is done
once its tar and part were renamed into place and index.json lists it; reruns skip done shards.

Other families (`DATA_PREP_FAMILIES`, issue 15): index.json adds "family" and "text_tensors", the names of the
text tensors the family's transformer takes (`ModelFamily.text_inputs`, as `asymflow.families.encode_family_prompts`
names them), all held by the sample's text member, each of one fixed shape for every sample
(`asymflow.families.fixed_text`): FLUX.1 and SD3 `encoder_hidden_states` [512 | 77+256, D] and `pooled_projections`
[D_pooled]; Qwen-Image `encoder_hidden_states` [max_sequence_length, D] zero-padded with its
`encoder_hidden_states_mask`, always stored; Sana `encoder_hidden_states` [300, D] and `encoder_attention_mask`.
Masks are stored exactly, as int64 (bf16/fp8 apply to floating tensors only). negative.safetensors holds the same
names and shapes: the empty prompt as the pipeline encodes negative prompts. `latents` is the family's normalised
latent image patchified channel-first on the pixel patch grid, [C_lat·q², H/p, W/p] (FLUX.1, SD3, Qwen-Image:
[64, H/16, W/16]; Sana: [32, H/32, W/32]; `pack` gives FluxPipeline's packed tokens), drawn from the posterior
with the same keyed seeds; Sana's DC-AE is deterministic, so its cache holds the encoding (latent_posterior "mode").
FLUX.2 caches carry neither field (their bytes are unchanged), so a cache without them is a FLUX.2 cache.

Text form: "raw" stores the stacked text-encoder states (D = joint_attention_dim, 12288 at klein 9B); "projected"
stores the base transformer's frozen `context_embedder` applied to them (D = inner_dim, 4096 at 9B: 1/3 of the
bytes), computed as the transformer computes it (`asymflow.text.project_text`) from the states a raw bf16 cache
would hold, so a LoRA run sees the tensor it would compute itself. index.json then records the layer's fingerprint
(`context_embedder`); training refuses the cache for a model with another layer or a config that trains it.
"""
from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from asymflow.components import (
    DATA_PREP_FAMILIES,
    DTYPES,
    TRAINING_FAMILY,
    BaseModelConfig,
    context_embedder_fingerprint,
    load_base_components,
    load_context_embedder,
)
from asymflow.latents import Posterior, encode_latents, posterior_seed
from asymflow.text import encode_prompts, project_text

from .format import (
    SampleTarWriter,
    canonical_json,
    join,
    load_manifest,
    load_sample_table,
    manifest_hash,
    read_parquet,
    read_sample_bytes,
)
from .decode import decode_image, find_image
from .shards import put_atomic

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
CACHE_FORMAT = "asymflow-cache"
CACHE_VERSION = 1
INDEX_FILE = "index.json"
TABLE_FILE = "samples.parquet"
PARTS_DIR = "parts"
NEGATIVE_FILE = "negative.safetensors"
LATENT_SUFFIX = "latent.safetensors"
TEXT_SUFFIX = "text.safetensors"
LATENT_NAME = "latents"
TEXT_NAME = "text_embeds"

CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # cache shard name, relative to DATA/cache
        ("offset", pa.int64()),  # first member header of the sample
        ("size", pa.int64()),  # through the end of the text member's padding
        ("latent_size", pa.int64()),  # through the end of the latent member's padding (latents-only reads)
    ]
)

CacheDtype = Literal["bf16", "fp8"]
CACHE_DTYPES: tuple[CacheDtype, ...] = ("bf16", "fp8")
TextForm = Literal["raw", "projected"]
TEXT_FORMS: tuple[TextForm, ...] = ("raw", "projected")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_SCALE = 1e-6  # keeps all-zero tensors (e.g. padded text positions) dequantisable
# Round-trip error bound per element x (scale = max|x|/448 for fp8):
#   bf16: |x̂ − x| ≤ |x|·2⁻⁸;   fp8 e4m3: |x̂ − x| ≤ |x|·2⁻⁴ + scale·2⁻¹⁰ (3 mantissa bits; subnormal step 2⁻⁹).
BF16_REL_TOL = 2.0**-8
FP8_REL_TOL = 2.0**-4
FP8_ABS_TOL_PER_SCALE = 2.0**-10


class CacheMismatchError(ValueError):
    """An existing cache was built for another model, dtype or dataset; it is never mixed with new entries."""


# ---------------------------------------------------------------- tensor codec (safetensors bytes, never pickle)


def _stored(name: str, x: torch.Tensor, dtype: CacheDtype) -> dict[str, torch.Tensor]:
    """The stored form of one tensor: bf16, or fp8 e4m3 with an fp32 per-tensor scale `{name}_scale`.

    fp8 follows spec §7: scale = max(|x|)/448 (≥ 1e-6), stored value = x/scale, dequantise by multiplying.
    Integer tensors (a family's attention masks) are stored exactly, in their own dtype, whatever `dtype` says.
    """
    if not (x.is_floating_point() or x.is_complex()):
        return {name: x.detach().to("cpu").contiguous()}
    x = x.detach().to("cpu", torch.float32).contiguous()
    if dtype == "bf16":
        return {name: x.to(torch.bfloat16)}
    if dtype == "fp8":
        scale = (x.abs().amax() / FP8_MAX).clamp_min(FP8_MIN_SCALE)
        return {name: (x / scale).to(torch.float8_e4m3fn), f"{name}_scale": scale.reshape(())}
    raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {CACHE_DTYPES}")


def tensors_to_bytes(named: Mapping[str, torch.Tensor], dtype: CacheDtype) -> bytes:
    """Named tensors as one safetensors file, each stored as `_stored` says (a family's text tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, x in named.items():
        tensors.update(_stored(name, x, dtype))
    # One metadata entry only: safetensors writes the metadata map in hash order, which varies between processes,
    # and reruns must be byte-identical. The dtype is visible from the stored tensors anyway.
    return st_save(tensors, metadata={"format": CACHE_FORMAT})


def tensor_to_bytes(name: str, x: torch.Tensor, dtype: CacheDtype) -> bytes:
    """One tensor as safetensors bytes: bf16, or fp8 e4m3 with an fp32 per-tensor scale `{name}_scale`."""
    return tensors_to_bytes({name: x}, dtype)


def _dequantised(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Stored tensor `name` of a loaded member, dequantised, in fp32 (an integer tensor, a mask, as stored)."""
    if name not in tensors:
        raise KeyError(f"tensor {name!r} missing (found {sorted(tensors)})")
    if not tensors[name].is_floating_point():
        return tensors[name]
    x = tensors[name].to(torch.float32)
    scale = tensors.get(f"{name}_scale")
    return x * scale.to(torch.float32) if scale is not None else x


def bytes_to_tensor(data: bytes, name: str) -> torch.Tensor:
    """Inverse of `tensor_to_bytes`: the stored tensor, dequantised, in fp32 (an integer tensor, a mask, as stored)."""
    return _dequantised(st_load(data), name)


def bytes_to_tensors(data: bytes, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of `tensors_to_bytes` for the tensors `names`: each dequantised, in fp32 (masks as stored). The member
    is parsed once, not once per name (it runs per sample on the training read path)."""
    tensors = st_load(data)
    return {name: _dequantised(tensors, name) for name in names}


# ---------------------------------------------------------------- cache manifest


@dataclass(frozen=True)
class CacheIdentity:
    """Everything the cached tensors depend on; an existing cache is extended only when all of it matches."""

    model_fingerprint: str
    model_dtype: str
    text_hidden_layers: tuple[int, ...]
    max_sequence_length: int
    dtype: CacheDtype
    manifest_hash: str
    # "sample": a posterior draw seeded by `asymflow.latents.posterior_seed(key)` (spec §7); "mode": the mean.
    latent_posterior: Posterior = "sample"
    text_form: TextForm = "raw"
    # `asymflow.components.context_embedder_fingerprint` of the layer that projected the text; None for raw text.
    context_embedder: str | None = None
    # The model family and the names of its cached text tensors; written to index.json only for families other than
    # FLUX.2, so FLUX.2 manifests keep their bytes and a manifest without them is FLUX.2's.
    family: str = TRAINING_FAMILY
    text_tensors: tuple[str, ...] = (TEXT_NAME,)

    @classmethod
    def of(
        cls, cfg: BaseModelConfig, dtype: CacheDtype, data_manifest_hash: str, latent_posterior: Posterior = "sample",
        text_form: TextForm = "raw", context_embedder: str | None = None,
    ) -> CacheIdentity:
        return cls(cfg.fingerprint(), cfg.dtype, tuple(cfg.text_hidden_layers), cfg.max_sequence_length, dtype,
                   data_manifest_hash, latent_posterior, text_form, context_embedder)

    @classmethod
    def of_family(cls, cfg: BaseModelConfig, family: str, text_tensors: Sequence[str], max_sequence_length: int,
                  dtype: CacheDtype, data_manifest_hash: str, latent_posterior: Posterior = "sample") -> CacheIdentity:
        """A family's cache: raw text (no hidden-layer stack: the pipeline's encoding decides), its text length."""
        return cls(cfg.fingerprint(), cfg.dtype, (), max_sequence_length, dtype, data_manifest_hash, latent_posterior,
                   "raw", None, family, tuple(text_tensors))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> CacheIdentity:
        # Fields caches written before them lack: those held posterior modes and raw text; FLUX.2 caches lack the
        # family fields.
        older = {"latent_posterior": "mode", "text_form": "raw", "context_embedder": None, "family": TRAINING_FAMILY,
                 "text_tensors": (TEXT_NAME,)}
        values = {f.name: manifest.get(f.name, older[f.name]) if f.name in older else manifest[f.name]
                  for f in fields(cls)}
        return cls(**{**values, "text_hidden_layers": tuple(values["text_hidden_layers"]),
                      "text_tensors": tuple(values["text_tensors"])})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)} | {"text_hidden_layers": list(self.text_hidden_layers),
                                                                       "text_tensors": list(self.text_tensors)}
        if self.family == TRAINING_FAMILY:
            del out["family"], out["text_tensors"]
        return out

    def differences(self, other: CacheIdentity) -> list[str]:
        """'field: existing != requested' for each field that differs."""
        return [
            f"{f.name}: {getattr(other, f.name)!r} (existing) != {getattr(self, f.name)!r} (requested)"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def cache_manifest(identity: CacheIdentity, shards: list[dict[str, Any]], total_shards: int) -> dict[str, Any]:
    """The `cache/index.json` document; `complete` once every image shard has its sidecar."""
    return {
        "version": CACHE_VERSION,
        "format": CACHE_FORMAT,
        **identity.to_json(),
        "num_samples": sum(s["num_samples"] for s in shards),
        "complete": len(shards) == total_shards,
        "members": {LATENT_NAME: f"{{key}}.{LATENT_SUFFIX}", **{name: f"{{key}}.{TEXT_SUFFIX}" for name in identity.text_tensors}},
        "shards": shards,
    }


def load_cache_manifest(data_dir: str) -> dict[str, Any] | None:
    """DATA/cache/index.json, or None when the dataset has no cache."""
    path = join(join(data_dir, CACHE_DIR), INDEX_FILE)
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    manifest = json.loads(fs.cat_file(p))
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise CacheMismatchError(f"{path} is not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest")
    return manifest


# ---------------------------------------------------------------- the job


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@dataclass
class CacheSummary:
    cache_dir: str
    num_shards: int
    shards_written: int
    shards_skipped: int
    num_samples: int

    @property
    def message(self) -> str:
        if not self.shards_written:
            return f"cache {self.cache_dir} is complete ({self.num_samples} samples, {self.num_shards} shards): nothing to do"
        return (
            f"cache {self.cache_dir}: {self.shards_written} shards written, {self.shards_skipped} already done, "
            f"{self.num_samples} samples"
        )


def _batches(rows: Sequence[Mapping[str, Any]], batch_size: int) -> Iterator[list[int]]:
    """Positions of `rows` in same-bucket batches of ≤ batch_size, looking ahead over a window of 4 batches.

    The bounded window keeps memory flat (only a window's decoded images and embeddings are held) while still
    filling most batches when buckets are interleaved; the order is a pure function of rows and batch_size,
    which keeps reruns byte-identical.
    """
    window = 4 * batch_size
    for start in range(0, len(rows), window):
        groups: dict[str, list[int]] = {}
        for i in range(start, min(start + window, len(rows))):
            groups.setdefault(rows[i]["bucket"], []).append(i)
        for members in groups.values():
            for j in range(0, len(members), batch_size):
                yield members[j : j + batch_size]


class _Encoder:
    """The base model's VAE + text encoder, turning decoded samples into cached member bytes."""

    def __init__(self, cfg: BaseModelConfig, dtype: CacheDtype, device: str, posterior: Posterior = "sample",
                 context_embedder: torch.nn.Module | None = None):
        self.cfg, self.dtype, self.device, self.posterior = cfg, dtype, torch.device(device), posterior
        parts = load_base_components(cfg, ("vae", "text_encoder", "tokenizer"))
        self.vae = parts.vae.to(self.device)
        self.text_encoder = parts.text_encoder.to(self.device)
        self.tokenizer = parts.tokenizer
        self.context_embedder = None if context_embedder is None else context_embedder.to(self.device)

    def text(self, prompts: list[str]) -> torch.Tensor:
        raw = encode_prompts(
            self.text_encoder, self.tokenizer, prompts, self.cfg.text_hidden_layers, self.cfg.max_sequence_length
        )
        if self.context_embedder is None:
            return raw.float()
        # From the states as a raw bf16 cache holds them and the loader ships them: what a raw run projects itself.
        return project_text(self.context_embedder, raw.to(torch.bfloat16)).float()

    def negative(self) -> torch.Tensor:
        """The empty prompt's embedding (negative.safetensors): FLUX.2 encodes it as a prompt."""
        return self.text([""])

    def latents(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        seeds = [posterior_seed(key) for key in keys] if self.posterior == "sample" else None
        return encode_latents(self.vae, images.to(self.device), self.posterior, seeds).float()


class _FamilyEncoder:
    """Another family's VAE and text encoders, loaded by the pipeline directory's model_index.json: keyed posterior
    draws (or a deterministic VAE's encoding) of `asymflow.families.fit.family_latents` patchified on the pixel patch
    grid, and the named text tensors of `asymflow.families.encode_family_prompts` (the pipeline's own encoding) in
    the fixed shape of `asymflow.families.fixed_text.fixed_length_text`."""

    def __init__(self, cfg: BaseModelConfig, family: str, dtype: CacheDtype, device: str, posterior: Posterior,
                 max_sequence_length: int):
        from asymflow.families import get_family
        from asymflow.families.load import load_pipeline_components, text_component_names

        self.family, self.dtype, self.device, self.posterior = get_family(family), dtype, torch.device(device), posterior
        self.max_sequence_length = max_sequence_length
        parts = load_pipeline_components(cfg.path, ("vae", *text_component_names(family)), DTYPES[cfg.dtype])
        self.vae = parts.pop("vae").to(self.device)
        self.text_components = {k: v.to(self.device) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}

    def text(self, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
        from asymflow.families import encode_family_prompts
        from asymflow.families.fixed_text import fixed_length_text

        encoded = encode_family_prompts(self.family.name, self.text_components, prompts, negative=negative,
                                        max_sequence_length=self.max_sequence_length)
        fixed = fixed_length_text(self.family, encoded, self.max_sequence_length)
        return {name: x.float() if x.is_floating_point() else x for name, x in fixed.items()}

    def negative(self) -> dict[str, torch.Tensor]:
        """The empty prompt encoded as the pipeline encodes negative prompts (its unconditional input for CFG; Sana:
        without the complex human instruction), in the samples' shapes: caption dropout trains on what sampling
        feeds the unconditional branch."""
        return self.text([""], negative=True)

    def latents(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        from asymflow.families.fit import family_latents
        from asymflow.patching import patchify_grid

        seeds = [posterior_seed(key) for key in keys] if self.posterior == "sample" else None
        latents = family_latents(self.family, self.vae, images.to(self.device), self.posterior, seeds)
        return patchify_grid(latents, self.family.latent_patch).float()


def family_text_tensors(family: str) -> tuple[str, ...]:
    """The text tensors a family's cache holds: `text_embeds` for FLUX.2, else the family's `text_inputs` (the names
    encode_family_prompts gives them, the mask always stored)."""
    from asymflow.families import get_family

    return (TEXT_NAME,) if family == TRAINING_FAMILY else get_family(family).text_inputs


def _text_member(text: torch.Tensor | Mapping[str, torch.Tensor], j: int, dtype: CacheDtype) -> bytes:
    """Sample j's text member: FLUX.2's one `text_embeds` tensor, or a family's named text tensors."""
    if isinstance(text, torch.Tensor):
        return tensor_to_bytes(TEXT_NAME, text[j], dtype)
    return tensors_to_bytes({name: x[j] for name, x in text.items()}, dtype)


def _encode_shard(
    data_dir: str, rows: list[dict[str, Any]], encoder: _Encoder | _FamilyEncoder, batch_size: int,
    fs: fsspec.AbstractFileSystem, bar: Any
) -> Iterator[tuple[str, bytes, bytes]]:
    """(key, latent bytes, text bytes) for `rows` in row order, computed in same-bucket batches."""
    pending: dict[int, tuple[bytes, bytes]] = {}
    next_out = 0
    for batch in _batches(rows, batch_size):
        images, captions = [], []
        for i in batch:
            members = read_sample_bytes(data_dir, rows[i], fs=fs)
            suffix, data = find_image(members)
            images.append(decode_image(suffix, data))
            captions.append(members.get("txt", b"").decode("utf-8"))
        latents = encoder.latents(torch.stack(images), [rows[i]["key"] for i in batch])
        text = encoder.text(captions)
        for j, i in enumerate(batch):
            pending[i] = (tensor_to_bytes(LATENT_NAME, latents[j], encoder.dtype), _text_member(text, j, encoder.dtype))
        bar.update(len(batch))
        # Emit in row order as soon as the next row is ready; at most one window is ever pending.
        while next_out in pending:
            latent, txt = pending.pop(next_out)
            yield rows[next_out]["key"], latent, txt
            next_out += 1
    assert not pending and next_out == len(rows), "every row is encoded exactly once"


def _done_shards(fs: fsspec.AbstractFileSystem, cache_root: str, existing: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Manifest entries of finished shards: listed in index.json, tar in place at the recorded size, part written."""
    done = {}
    for entry in (existing or {}).get("shards", []):
        tar = f"{cache_root}/{entry['name']}"
        if fs.exists(tar) and fs.size(tar) == entry["bytes"] and fs.exists(f"{cache_root}/{PARTS_DIR}/{entry['name']}.parquet"):
            done[entry["name"]] = entry
        else:
            log.warning("cache shard %s is listed but missing or incomplete; rebuilding it", tar)
    return done


def build_cache(
    data_dir: str,
    cfg: BaseModelConfig,
    *,
    batch_size: int = 8,
    dtype: CacheDtype = "bf16",
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    latent_posterior: Posterior = "sample",
    text_form: TextForm = "raw",
) -> CacheSummary:
    """Cache latents + text embeddings of every sample of the dataset at `data_dir` into DATA/cache/ (resumable).

    Latents are posterior samples by default (spec §7), each seeded from its sample key, so reruns, resumes and any
    batch size give the same bytes; `latent_posterior="mode"` caches the posterior mean instead.
    `text_form="projected"` stores the frozen context_embedder's output instead of the raw states (module docstring).
    A model of another data-prep family (FLUX.1, SD3, Qwen-Image, Sana) caches that family's latents and named text
    tensors (module docstring).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {CACHE_DTYPES}")
    if text_form not in TEXT_FORMS:
        raise ValueError(f"unknown text form {text_form!r}; expected one of {TEXT_FORMS}")
    family = cfg.check_family(DATA_PREP_FAMILIES)
    if family != TRAINING_FAMILY and text_form != "raw":
        raise ValueError(f"text form {text_form!r} is FLUX.2's (its context_embedder); a {family} cache holds raw text")
    manifest = load_manifest(data_dir)
    if family == TRAINING_FAMILY:
        context_embedder = load_context_embedder(cfg) if text_form == "projected" else None
        identity = CacheIdentity.of(cfg, dtype, manifest_hash(manifest), latent_posterior, text_form,
                                    None if context_embedder is None else context_embedder_fingerprint(context_embedder))
    else:
        latent_posterior = _family_posterior(family, latent_posterior)
        identity = CacheIdentity.of_family(cfg, family, family_text_tensors(family), _text_length(cfg, family), dtype,
                                           manifest_hash(manifest), latent_posterior)
    cache_dir = join(data_dir, CACHE_DIR)
    fs, cache_root = fsspec.core.url_to_fs(cache_dir)

    existing = load_cache_manifest(data_dir)
    if existing is not None and overwrite:
        log.info("--overwrite: removing the existing cache %s", cache_dir)
        fs.rm(cache_root, recursive=True)
        existing = None
    if existing is not None:
        diffs = identity.differences(CacheIdentity.from_manifest(existing))
        if diffs:
            raise CacheMismatchError(
                f"{cache_dir} holds a cache built differently ({'; '.join(diffs)}); refusing to mix them. "
                "Rerun with --overwrite to rebuild it from scratch."
            )
    fs.makedirs(f"{cache_root}/{PARTS_DIR}", exist_ok=True)
    shard_names = [s["name"] for s in manifest["shards"]]
    index_url = join(cache_dir, INDEX_FILE)
    if existing is None:  # record the identity before any work, so even a cache killed early refuses another model
        put_atomic(index_url, canonical_json(cache_manifest(identity, [], len(shard_names))))

    done = _done_shards(fs, cache_root, existing)
    todo = [n for n in shard_names if n not in done]
    table_path = f"{cache_root}/{TABLE_FILE}"
    summary = CacheSummary(cache_dir, len(shard_names), len(todo), len(done), manifest["num_samples"])
    if not todo and fs.exists(table_path) and fs.exists(f"{cache_root}/{NEGATIVE_FILE}"):
        return summary

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if family == TRAINING_FAMILY:
        encoder: _Encoder | _FamilyEncoder = _Encoder(cfg, dtype, device, latent_posterior, context_embedder)
    else:
        encoder = _FamilyEncoder(cfg, family, dtype, device, latent_posterior, identity.max_sequence_length)
    put_atomic(join(cache_dir, NEGATIVE_FILE), _text_member(encoder.negative(), 0, dtype))

    rows_by_shard: dict[str, list[dict[str, Any]]] = {n: [] for n in shard_names}
    for row in load_sample_table(data_dir).select(["key", "shard", "index", "bucket", "offset", "size"]).to_pylist():
        rows_by_shard[row["shard"]].append(row)
    data_fs, _ = fsspec.core.url_to_fs(data_dir)
    with tqdm(
        total=manifest["num_samples"],
        initial=sum(s["num_samples"] for s in done.values()),
        unit="img",
        desc="cache",
        disable=not progress,
    ) as bar:
        for name in todo:
            rows = sorted(rows_by_shard[name], key=lambda r: r["index"])
            done[name] = _write_shard(cache_dir, name, _encode_shard(data_dir, rows, encoder, batch_size, data_fs, bar))
            shards = [done[n] for n in shard_names if n in done]
            put_atomic(index_url, canonical_json(cache_manifest(identity, shards, len(shard_names))))

    parts = []
    for name in shard_names:
        with fs.open(f"{cache_root}/{PARTS_DIR}/{name}.parquet", "rb") as f:
            parts.append(read_parquet(f))
    put_atomic(join(cache_dir, TABLE_FILE), _table_bytes(pa.concat_tables(parts) if parts else CACHE_SCHEMA.empty_table()))
    return summary


def _family_posterior(family: str, requested: Posterior) -> Posterior:
    """The latent a family's cache holds: the requested posterior draw, or for a deterministic VAE (Sana's DC-AE:
    no distribution to sample) its one encoding, recorded as "mode"."""
    from asymflow.families import get_family
    from asymflow.families.fit import has_posterior

    if requested == "sample" and not has_posterior(get_family(family)):
        log.info("%s's VAE is deterministic: caching its encoding (latent_posterior 'mode')", family)
        return "mode"
    return requested


def _text_length(cfg: BaseModelConfig, family: str) -> int:
    """The text length a family's cache encodes to: model.max_sequence_length when the config sets it, else the
    family pipeline's default (FluxPipeline and QwenImagePipeline: 512, SD3: 256 T5 tokens after 77 CLIP ones, Sana:
    300), read from encode_family_prompts' encoder."""
    if "max_sequence_length" in cfg.model_fields_set:
        return cfg.max_sequence_length
    import inspect

    from asymflow.families.text import ENCODERS

    return inspect.signature(ENCODERS[family]).parameters["max_sequence_length"].default


def _member_extent(num_bytes: int) -> int:
    """Bytes a ustar member takes: one header block plus its data padded to whole blocks."""
    return tarfile.BLOCKSIZE * (1 + -(-num_bytes // tarfile.BLOCKSIZE))


def _write_shard(cache_dir: str, name: str, samples: Iterator[tuple[str, bytes, bytes]]) -> dict[str, Any]:
    """Stream samples into `name` under a temp name, write its table part, rename the tar into place; its manifest entry."""
    fs, path = fsspec.core.url_to_fs(join(cache_dir, name))
    tmp = f"{path}.tmp"  # streamed, not put_atomic: a shard of real text embeddings is too large to hold in memory
    rows: dict[str, list[Any]] = {f.name: [] for f in CACHE_SCHEMA}
    with fs.open(tmp, "wb") as f:
        writer = SampleTarWriter(f)
        for key, latent, text in samples:
            # Latents first, so a latents-only read is the prefix [offset, offset + latent_size).
            offset, size = writer.write_sample(key, {LATENT_SUFFIX: latent, TEXT_SUFFIX: text})
            for field, value in zip(CACHE_SCHEMA.names, (key, name, offset, size, _member_extent(len(latent)))):
                rows[field].append(value)
        num_bytes, sha256 = writer.close()
    put_atomic(join(cache_dir, f"{PARTS_DIR}/{name}.parquet"), _table_bytes(pa.table(rows, schema=CACHE_SCHEMA)))
    fs.mv(tmp, path)
    return {"name": name, "num_samples": writer.num_samples, "bytes": num_bytes, "sha256": sha256}
