"""`prep cache` on real shards built by `prep shards` from scikit-image photos, with the tiny in-code models."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from asymflow.text import encode_prompts
from data_prep import cache as cache_mod
from data_prep.cache import CacheMismatchError, build_cache, bytes_to_tensor, tensor_to_bytes
from data_prep.corpus import build_clean_corpus
from data_prep.format import load_manifest, load_sample_table, manifest_hash
from data_prep.run_config import load_model_config

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


# For run_cli(..., env=ONE_THREAD): torch in the CLI on one intra-op thread, as the test process runs it (conftest),
# so the CLI's VAE computes bitwise what an in-process reference computes (thread counts change conv rounding), and
# the tiny models run faster.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "orchestration.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def cached_dataset(base: Path) -> Path:
    """Shards of the clean skimage corpus (64² buckets, 4 per shard) plus a bf16 cache, built once per session."""
    data = base / "cached-dataset"
    if not (data / "cache" / "samples.parquet").exists():
        build_clean_corpus(base / "corpus")
        shards = run_cli(
            "prep", "shards", str(base / "corpus"), str(data),
            "--resolution", "64", "--shard-size", "4", "--workers", "1", "--no-progress",
        )
        assert shards.returncode == 0, shards.stderr
        build_cache(str(data), load_model_config(TINY_CONFIG), batch_size=2, progress=False)
    return data


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def kill_during_last_shard(cache_dir: Path) -> None:
    """The state a `prep cache` killed while writing its last shard leaves: that tar a half-written temp file,
    index.json without it and not complete, no samples.parquet."""
    index = json.loads((cache_dir / "index.json").read_text())
    last = index["shards"][-1]["name"]
    (cache_dir / last).rename(cache_dir / f"{last}.tmp")
    with open(cache_dir / f"{last}.tmp", "r+b") as f:
        f.truncate(1000)
    (cache_dir / "index.json").write_text(json.dumps({**index, "shards": index["shards"][:-1], "complete": False}))
    (cache_dir / "samples.parquet").unlink()


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return cached_dataset(tmp_path_factory.getbasetemp())


def test_cache_layout_matches_the_image_shards(dataset: Path) -> None:
    manifest = load_manifest(str(dataset))
    cache_dir = dataset / "cache"
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["complete"] and index["version"] == 1 and index["dtype"] == "bf16"
    assert index["latent_posterior"] == "sample"
    assert index["model_fingerprint"] == load_model_config(TINY_CONFIG).fingerprint()
    assert index["manifest_hash"] == manifest_hash(manifest)
    assert [s["name"] for s in index["shards"]] == [s["name"] for s in manifest["shards"]]
    for entry, image_entry in zip(index["shards"], manifest["shards"]):
        data = (cache_dir / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["num_samples"] == image_entry["num_samples"]
        # Stock tarfile reads the sidecar: latent then text member per sample, in the image shard's order.
        with tarfile.open(cache_dir / entry["name"]) as tar:
            names = tar.getnames()
        with tarfile.open(dataset / entry["name"]) as tar:
            keys = list(dict.fromkeys(n.split(".", 1)[0] for n in tar.getnames()))
        assert names == [f"{k}.{suffix}" for k in keys for suffix in ("latent.safetensors", "text.safetensors")]

    table = pq.read_table(cache_dir / "samples.parquet")
    assert table.column_names == ["key", "shard", "offset", "size", "latent_size"]
    assert table["key"].to_pylist() == load_sample_table(str(dataset))["key"].to_pylist()

    cfg = load_model_config(TINY_CONFIG)
    negative = bytes_to_tensor((cache_dir / "negative.safetensors").read_bytes(), "text_embeds")
    from asymflow.components import load_base_components

    parts = load_base_components(cfg, ("text_encoder", "tokenizer"))
    expected = encode_prompts(parts.text_encoder, parts.tokenizer, [""], cfg.text_hidden_layers, cfg.max_sequence_length)[0]
    assert negative.shape == (cfg.max_sequence_length, 3 * 32)
    torch.testing.assert_close(negative, expected, rtol=2**-8, atol=1e-6)


def test_cached_latents_are_posterior_samples_seeded_by_key(dataset: Path, tmp_path: Path) -> None:
    """Each cached latent is the VAE posterior sample drawn with `posterior_seed(key)` (spec §7), not the mode."""
    from asymflow.components import load_base_components
    from asymflow.latents import encode_latents, posterior_seed
    from data_prep.reader import DatasetIndex, read_training_sample

    sample_row = read_training_sample(DatasetIndex.open(str(dataset)), 0)
    cached, image = sample_row["latents"], sample_row["image"][None]
    vae = load_base_components(load_model_config(TINY_CONFIG), ("vae",)).vae
    sample = encode_latents(vae, image, "sample", [posterior_seed(sample_row["key"])])[0]
    mode = encode_latents(vae, image, "mode")[0]
    torch.testing.assert_close(cached, sample, rtol=2**-8, atol=1e-6)  # bf16 storage
    assert (cached - mode).abs().max() > 1e-2

    # A mode cache is a different cache: never mixed with the samples.
    data = copy_dataset(dataset, tmp_path / "data")
    with pytest.raises(CacheMismatchError, match="latent_posterior"):
        build_cache(str(data), load_model_config(TINY_CONFIG), latent_posterior="mode", progress=False)


def test_rerun_is_a_noop_and_resume_is_byte_identical(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    before = file_hashes(data)
    rerun = run_cli("prep", "cache", str(data), "--config", TINY_CONFIG, "--batch-size", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to do" in rerun.stdout
    assert file_hashes(data) == before

    # A run killed while writing the last shard: its tar is a half-written temp file, index.json lacks it.
    cache_dir = data / "cache"
    kill_during_last_shard(cache_dir)
    build_cache(str(data), load_model_config(TINY_CONFIG), batch_size=2, progress=False)
    assert file_hashes(data) == before


def test_refuses_a_cache_from_another_model_unless_overwrite(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  kind: tiny\n  seed: 1\n")
    refused = run_cli("prep", "cache", str(data), "--config", str(other))
    assert refused.returncode == 2
    assert "model_fingerprint" in refused.stderr and "--overwrite" in refused.stderr
    with pytest.raises(CacheMismatchError, match="dtype"):
        build_cache(str(data), load_model_config(TINY_CONFIG), dtype="fp8", progress=False)

    build_cache(str(data), load_model_config(str(other)), batch_size=4, overwrite=True, progress=False)
    index = json.loads((data / "cache" / "index.json").read_text())
    assert index["model_fingerprint"] == "tiny:seed=1" and index["complete"]


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_tensor_codec_round_trips_within_its_stated_tolerance(dtype: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # Wide dynamic range (6 decades) so fp8's subnormal range is exercised, plus exact zeros.
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-4, 2, 96)
    x[0] = 0.0
    data = tensor_to_bytes("t", x, dtype)
    assert b"pickle" not in data and data[8:9] == b"{"  # a safetensors header, nothing executable
    y = bytes_to_tensor(data, "t")
    assert y.dtype == torch.float32 and y.shape == x.shape
    if dtype == "bf16":
        bound = x.abs() * cache_mod.BF16_REL_TOL
    else:
        scale = x.abs().max() / cache_mod.FP8_MAX
        bound = x.abs() * cache_mod.FP8_REL_TOL + scale * cache_mod.FP8_ABS_TOL_PER_SCALE
    assert ((y - x).abs() <= bound + 1e-12).all()
    assert (y[0] == 0).all()
    assert bytes_to_tensor(tensor_to_bytes("z", torch.zeros(3), dtype), "z").eq(0).all()


def test_fp8_cache_matches_the_bf16_cache_within_tolerance(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    build_cache(str(data), load_model_config(TINY_CONFIG), dtype="fp8", overwrite=True, progress=False)
    from data_prep.reader import DatasetIndex, read_cached

    fp8, bf16 = DatasetIndex.open(str(data)), DatasetIndex.open(str(dataset))
    assert fp8.cache_manifest["dtype"] == "fp8"
    for i in range(len(fp8)):
        got, ref = read_cached(fp8, fp8.row(i)), read_cached(bf16, bf16.row(i))
        for name in ("latents", "text_embeds"):
            scale = ref[name].abs().max() / cache_mod.FP8_MAX
            # fp8 bound against the true value, plus bf16's own error on the reference.
            bound = ref[name].abs() * (cache_mod.FP8_REL_TOL + 2 * cache_mod.BF16_REL_TOL) + 2 * scale * cache_mod.FP8_ABS_TOL_PER_SCALE
            assert ((got[name] - ref[name]).abs() <= bound).all(), name


def _text_members(data: Path) -> dict[str, bytes]:
    """key -> the raw bytes of its `{key}.text.safetensors` member, read with stock tarfile."""
    out = {}
    for entry in json.loads((data / "cache" / "index.json").read_text())["shards"]:
        with tarfile.open(data / "cache" / entry["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".text.safetensors"):
                    out[member.name.split(".", 1)[0]] = tar.extractfile(member).read()
    return out


def _safetensors_header_bytes(member: bytes) -> int:
    """The 8-byte length prefix plus the JSON header of one safetensors blob."""
    return 8 + int.from_bytes(member[:8], "little")


def test_projected_cache_holds_context_embedder_outputs_in_a_third_less_bytes(dataset: Path, tmp_path: Path) -> None:
    """`--text-form projected`: each sample's text is the base context_embedder applied to the states the raw cache
    holds (bit for bit after bf16 storage), the latents are the raw cache's bytes, index.json records the form and
    the layer's fingerprint, and the text members shrink by inner/joint_attention_dim plus a bounded header."""
    from asymflow.components import context_embedder_fingerprint, load_context_embedder
    from asymflow.text import project_text
    from data_prep.reader import DatasetIndex, read_cached

    data = copy_dataset(dataset, tmp_path / "data")
    refused = run_cli("prep", "cache", str(data), "--config", TINY_CONFIG, "--text-form", "projected")
    assert refused.returncode == 2 and "text_form: 'raw' (existing) != 'projected' (requested)" in refused.stderr
    cfg = load_model_config(TINY_CONFIG)
    # In this process, like the raw cache: another process may pick other CPU kernels (thread count), other bits.
    build_cache(str(data), cfg, batch_size=2, overwrite=True, progress=False, text_form="projected")
    layer = load_context_embedder(cfg)
    index = json.loads((data / "cache" / "index.json").read_text())
    assert index["text_form"] == "projected" and index["context_embedder"] == context_embedder_fingerprint(layer)

    projected, raw = DatasetIndex.open(str(data)), DatasetIndex.open(str(dataset))
    assert projected.text_projected and not raw.text_projected
    inner, joint = layer.out_features, layer.in_features
    assert (inner, joint) == (64, 96)
    for i in range(len(raw)):
        got, ref = read_cached(projected, projected.row(i)), read_cached(raw, raw.row(i))
        assert torch.equal(got["latents"], ref["latents"])
        expected = project_text(layer, ref["text_embeds"][None].bfloat16())[0].bfloat16().float()
        assert got["text_embeds"].shape == (cfg.max_sequence_length, inner)
        assert torch.equal(got["text_embeds"], expected)
    negative = project_text(layer, raw.negative_embeds()[None].bfloat16())[0].bfloat16().float()
    assert torch.equal(projected.negative_embeds(), negative)

    # Bytes per sample: the payload is L·D·2 (bf16) in both forms, so the ratio is inner/joint = 2/3 plus headers.
    length = cfg.max_sequence_length
    members_p, members_r = _text_members(data), _text_members(dataset)
    assert members_p.keys() == members_r.keys()
    for key in members_r:
        for member, width in ((members_p[key], inner), (members_r[key], joint)):
            header = _safetensors_header_bytes(member)
            assert header <= 256 and len(member) == header + length * width * 2
    ratio = sum(map(len, members_p.values())) / sum(map(len, members_r.values()))
    assert inner / joint < ratio <= (length * inner * 2 + 256) / (length * joint * 2)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_projected_text_bytes_at_klein_9b_are_a_third_of_raw(dtype: str) -> None:
    """The same serialisation on tensors of klein 9B's shapes: raw [512, 3·4096] vs projected [512, 4096] (inner =
    32 heads × 128). The ratio against today's raw bf16 member is 1/3 (bf16) or 1/6 (fp8) plus the headers."""
    from asymflow.klein import KLEIN_TRANSFORMER_CONFIGS

    config = KLEIN_TRANSFORMER_CONFIGS["9b"]
    joint, inner = config["joint_attention_dim"], config["num_attention_heads"] * config["attention_head_dim"]
    assert (joint, inner) == (12288, 4096)
    raw = tensor_to_bytes("text_embeds", torch.zeros(512, joint), "bf16")
    projected = tensor_to_bytes("text_embeds", torch.zeros(512, inner), dtype)
    payload = 512 * inner * (2 if dtype == "bf16" else 1)
    assert len(raw) == _safetensors_header_bytes(raw) + 512 * joint * 2
    assert len(projected) - _safetensors_header_bytes(projected) - (4 if dtype == "fp8" else 0) == payload
    ratio = len(projected) / len(raw)
    assert payload / (512 * joint * 2) < ratio < (payload + 512) / (512 * joint * 2) and ratio <= 0.35


def test_caches_from_before_the_text_form_read_as_raw(dataset: Path, tmp_path: Path) -> None:
    from data_prep.reader import DatasetIndex

    data = copy_dataset(dataset, tmp_path / "data")
    index_path = data / "cache" / "index.json"
    index = json.loads(index_path.read_text())
    assert (index["text_form"], index["context_embedder"]) == ("raw", None)
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k not in ("text_form", "context_embedder")}))
    assert not DatasetIndex.open(str(data)).text_projected
    summary = build_cache(str(data), load_model_config(TINY_CONFIG), batch_size=2, progress=False)
    assert summary.shards_written == 0  # the same identity as a raw cache: extended, not refused
    with pytest.raises(CacheMismatchError, match="text_form: 'raw' \\(existing\\) != 'projected'"):
        build_cache(str(data), load_model_config(TINY_CONFIG), batch_size=2, progress=False, text_form="projected")
