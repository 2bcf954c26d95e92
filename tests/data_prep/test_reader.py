"""The training-side reader on real shards + cache: shapes, agreement with the encoders, corruption handling."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asymflow.components import load_base_components
from asymflow.latents import encode_latents, posterior_seed
from asymflow.text import encode_prompts
from data_prep.cache import CacheMismatchError
from data_prep.format import parse_sample
from data_prep.reader import CorruptSampleError, DatasetIndex, decode_image, read_cached, read_training_sample, split_text
from data_prep.run_config import load_model_config
from tests.data_prep.test_cache import TINY_CONFIG, cached_dataset, copy_dataset

BF16_TOL = dict(rtol=2**-7, atol=1e-5)  # two bf16 roundings (cache write, and batch-vs-single encode noise)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return cached_dataset(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def index(dataset: Path) -> DatasetIndex:
    return DatasetIndex.open(str(dataset))


def test_samples_have_the_training_shapes_and_match_the_encoders(index: DatasetIndex) -> None:
    cfg = load_model_config(TINY_CONFIG)
    parts = load_base_components(cfg, ("vae", "text_encoder", "tokenizer"))
    assert index.has_cache and len(index) == index.manifest["num_samples"] >= 10
    for i in range(len(index)):
        row = index.row(i)
        sample = read_training_sample(index, row)
        height, width = row["height"], row["width"]
        assert sample["key"] == row["key"] and sample["caption"].startswith("a photo: ")
        assert sample["image"].shape == (3, height, width) and sample["image"].dtype == torch.float32
        assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0
        assert sample["latents"].shape == (128, height // 16, width // 16) and sample["latents"].dtype == torch.float32
        assert sample["text_embeds"].shape == (cfg.max_sequence_length, 96) and sample["text_embeds"].dtype == torch.float32
        seed = [posterior_seed(row["key"])]  # the cache holds a posterior sample seeded by the key (spec §7)
        expected = encode_latents(parts.vae, sample["image"][None], "sample", seed)[0]
        torch.testing.assert_close(sample["latents"], expected, **BF16_TOL)
        text = encode_prompts(parts.text_encoder, parts.tokenizer, [sample["caption"]], cfg.text_hidden_layers, cfg.max_sequence_length)
        torch.testing.assert_close(sample["text_embeds"], text[0], **BF16_TOL)
    assert read_training_sample(index, 0)["key"] == index.row(0)["key"]  # a row position works too
    assert index.negative_embeds().shape == (cfg.max_sequence_length, 96)
    # The trainer reads the empty prompt of every cache as named tensors split like a sample's: FLUX.2's is text_embeds
    # alone, equal to negative_embeds().
    text, extras = split_text(index.negative_text(), index.text_tensors)
    assert torch.equal(text, index.negative_embeds()) and extras == {}


def test_latents_only_read_equals_the_full_read(index: DatasetIndex) -> None:
    row = index.row(len(index) - 1)
    full, latents_only = read_cached(index, row), read_cached(index, row, text=False)
    assert set(latents_only) == {"latents"}
    assert torch.equal(full["latents"], latents_only["latents"])


@pytest.mark.parametrize("suffix, fmt", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_decode_image_matches_pil(suffix: str, fmt: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, quality=95, lossless=True)
    decoded = decode_image(suffix, buf.getvalue())
    reference = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert decoded.shape == (3, 32, 48)
    # simplejpeg and Pillow both decode with libjpeg-turbo's default IDCT, so even JPEG agrees exactly.
    torch.testing.assert_close(decoded, torch.from_numpy(reference).permute(2, 0, 1).float() / 127.5 - 1, rtol=0, atol=1e-6)


def _corrupt_range(path: Path, offset: int, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * (size // 256) + bytes(size % 256))


def test_corrupt_or_missing_cache_shard_raises_naming_the_shard(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    index = DatasetIndex.open(str(data))
    row = index.row(1)
    _corrupt_range(data / "cache" / row["cache_shard"], row["cache_offset"], row["cache_size"])
    with pytest.raises(CorruptSampleError) as err:
        read_training_sample(index, row)
    assert err.value.shard == f"cache/{row['cache_shard']}" and err.value.key == row["key"]
    assert row["cache_shard"] in str(err.value)
    read_training_sample(index, index.row(0))  # its neighbours are unaffected

    # A safetensors payload whose bytes decode to NaN is caught too (no checksum per sample, so check values).
    row = index.row(0)
    shard = data / "cache" / row["cache_shard"]
    latent_member = parse_sample(shard.read_bytes()[row["cache_offset"] : row["cache_offset"] + row["cache_latent_size"]])
    header_len = 8 + int.from_bytes(latent_member["latent.safetensors"][:8], "little")
    with open(shard, "r+b") as f:
        f.seek(row["cache_offset"] + 512 + header_len)
        f.write(b"\xff\xff" * 4)  # bf16 0xffff is a NaN
    with pytest.raises(CorruptSampleError, match="NaN"):
        read_training_sample(index, row)

    last = index.row(len(index) - 1)
    (data / "cache" / last["cache_shard"]).unlink()
    with pytest.raises(CorruptSampleError) as err:
        read_training_sample(index, last)
    assert err.value.shard == f"cache/{last['cache_shard']}"


def test_corrupt_image_member_raises_naming_the_image_shard(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    index = DatasetIndex.open(str(data))
    row = index.row(2)
    _corrupt_range(data / row["shard"], row["offset"] + 512, 256)  # inside the image member's data
    with pytest.raises(CorruptSampleError) as err:
        read_training_sample(index, row)
    assert err.value.shard == row["shard"] and err.value.key == row["key"]


def test_open_without_cache_and_with_a_stale_cache(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    shutil.rmtree(data / "cache" / "parts")  # not needed by readers
    DatasetIndex.open(str(data))

    cache = data / "cache"
    index_json = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps({**index_json, "manifest_hash": "0" * 64}))
    with pytest.raises(CacheMismatchError, match="another version of this dataset"):
        DatasetIndex.open(str(data))
    (cache / "index.json").write_text(json.dumps({**index_json, "complete": False}))
    with pytest.raises(CacheMismatchError, match="incomplete"):
        DatasetIndex.open(str(data))

    shutil.rmtree(cache)
    index = DatasetIndex.open(str(data))
    assert not index.has_cache and "cache_shard" not in index.table.column_names
    with pytest.raises(FileNotFoundError, match="prep cache"):
        index.negative_embeds()


def test_family_text_tensors_split_and_integer_masks_keep_their_dtype():
    """A family cache's text member: encoder_hidden_states is the batch's text_embeds, the other named tensors ride
    beside it; an integer mask comes back (and ships in batches) as stored, floating tensors in fp32 (bf16 in
    batches)."""
    from safetensors.torch import save as st_save

    from data_prep.cache import bytes_to_tensors
    from orchestration.loader import shipped_text

    names = ("encoder_hidden_states", "encoder_attention_mask")
    states, mask = torch.randn(3, 4).to(torch.bfloat16), torch.tensor([1, 1, 0], dtype=torch.int64)
    read = bytes_to_tensors(st_save({"encoder_hidden_states": states, "encoder_attention_mask": mask}), names)
    text, extras = split_text(read, names)
    assert text.dtype == torch.float32 and torch.equal(text, states.float())
    assert list(extras) == ["encoder_attention_mask"] and extras["encoder_attention_mask"].dtype == torch.int64
    assert shipped_text(extras["encoder_attention_mask"]).dtype == torch.int64
    assert shipped_text(text).dtype == torch.bfloat16
    flux2_text, none = split_text({"text_embeds": text}, ("text_embeds",))
    assert flux2_text is text and none == {}
    with pytest.raises(ValueError, match="include neither text_embeds nor encoder_hidden_states"):
        split_text({"pooled_projections": text}, ("pooled_projections",))
