"""`prep cache` and `prep subspace` for SD3, Qwen-Image and Sana (issue 15) through the real CLI, each on a tiny
pipeline directory written by its diffusers pipeline's save_pretrained (StableDiffusion3Pipeline, QwenImagePipeline,
SanaPipeline) and the shards shared with the FLUX.1 tests (conftest.family_shards: sides multiples of 32)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import pytest
import torch

from asymflow.families import encode_family_prompts, get_family
from asymflow.families.fit import family_latents, fit_family_subspace, has_posterior
from asymflow.families.load import load_pipeline_components, save_tiny_family_pipeline, text_component_names
from asymflow.latents import posterior_seed
from asymflow.patching import pack, patchify_grid
from asymflow.subspace import SubspaceArtifact
from data_prep.cache import build_cache
from data_prep.reader import DatasetIndex, read_cached, read_image_sample
from data_prep.run_config import load_model_config
from tests.data_prep.test_cache import ONE_THREAD, copy_dataset, file_hashes, kill_during_last_shard, run_cli
from tests.data_prep.test_family_cache import _cache_batches

FAMILIES = ("sd3", "qwen_image", "sana")
# (pixel patch p, rank r = C_lat·q²): SD3 and Qwen-Image 16-channel latents 2×2, Sana 32 channels of the 32× DC-AE
GEOMETRY = {"sd3": (16, 64), "qwen_image": (16, 64), "sana": (32, 32)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, family_shards):
    """family → {model, config, data}: a tiny pipeline directory, a config naming it (family detected from its
    model_index.json) and a copy of the shared shards cached by `prep cache --batch-size 3`; built once per family."""
    built: dict[str, dict[str, Path]] = {}

    def build(family: str) -> dict[str, Path]:
        if family not in built:
            base = tmp_path_factory.mktemp(f"{family}-prep")
            model = save_tiny_family_pipeline(family, base / "model")
            config = base / "model.yaml"
            config.write_text(f"model:\n  kind: diffusers\n  path: {model}\n")
            data = copy_dataset(family_shards, base / "data")
            cache = run_cli("prep", "cache", str(data), "--config", str(config), "--batch-size", "3", "--no-progress",
                            env=ONE_THREAD)
            assert cache.returncode == 0, cache.stderr
            built[family] = {"model": model, "config": config, "data": data}
        return built[family]

    return build


def pipeline_text_length(family: str) -> int:
    """The pipeline's own default max_sequence_length (its __call__ signature): the length a cache encodes to."""
    pipeline = getattr(diffusers, get_family(family).pipeline_classes[0])
    return inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default


def padded(family: str, encoded: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The documented cache form, written out here: Qwen-Image's states followed by zero rows up to `length` and its
    mask (all ones where the pipeline passed none) followed by zeros; the other families' pipeline tensors as they are."""
    if family != "qwen_image":
        return dict(encoded)
    states = encoded["encoder_hidden_states"]
    batch, tokens, width = states.shape
    mask = encoded.get("encoder_hidden_states_mask", torch.ones(batch, tokens, dtype=torch.long))
    return {"encoder_hidden_states": torch.cat([states, states.new_zeros(batch, length - tokens, width)], 1),
            "encoder_hidden_states_mask": torch.cat([mask, mask.new_zeros(batch, length - tokens)], 1)}


def unnormalised(family: str, vae, latents: torch.Tensor) -> torch.Tensor:
    """The raw VAE latent from a normalised one, as each pipeline undoes the normalisation before decoding
    (StableDiffusion3Pipeline: z/scaling + shift; QwenImagePipeline: z·latents_std + latents_mean; SanaPipeline:
    z/scaling)."""
    config = vae.config
    if family == "sd3":
        return latents / config.scaling_factor + config.shift_factor
    if family == "qwen_image":
        return latents * torch.tensor(config.latents_std).view(1, -1, 1, 1) + torch.tensor(config.latents_mean).view(1, -1, 1, 1)
    return latents / config.scaling_factor


def vae_encoding(family: str, vae, image: torch.Tensor) -> torch.Tensor:
    """The VAE's own encoding of one image [1,3,H,W]: the posterior mean (Qwen-Image's video VAE: frame 0 of a
    one-frame video), or DC-AE's deterministic latent."""
    if family == "qwen_image":
        return vae.encode(image[:, :, None]).latent_dist.mode()[:, :, 0]
    encoded = vae.encode(image)
    return encoded.latent if family == "sana" else encoded.latent_dist.mode()


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_holds_the_family_latents_and_fixed_shape_text(prepared, family) -> None:
    spec, paths = get_family(family), prepared(family)
    data, length = paths["data"], pipeline_text_length(family)
    index = json.loads((data / "cache" / "index.json").read_text())
    assert index["complete"] and index["family"] == family and index["num_samples"] == 12 and len(index["shards"]) == 3
    assert index["text_tensors"] == list(spec.text_inputs) and index["max_sequence_length"] == length
    # DC-AE has no posterior: Sana's cache holds the encoder's one latent, recorded as the "mode"
    assert has_posterior(spec) == (family != "sana")
    assert index["latent_posterior"] == ("sample" if has_posterior(spec) else "mode")

    # A rerun with the CLI's default --latent-posterior sample finds the cache complete (Sana's records "mode").
    assert build_cache(str(data), load_model_config(str(paths["config"])), progress=False).shards_written == 0
    dataset = DatasetIndex.open(str(data))
    assert dataset.family == family and dataset.text_tensors == spec.text_inputs
    parts = load_pipeline_components(paths["model"], ("vae", *text_component_names(family)))
    vae = parts.pop("vae")
    rows = [dataset.row(i) for i in range(len(dataset))]
    images, captions = zip(*(read_image_sample(str(data), row) for row in rows))
    cached = [read_cached(dataset, row) for row in rows]

    # Text: the pipeline encoding of each cache batch (same-bucket batches of 3: Qwen-Image pads to a batch's
    # longest prompt), in the documented fixed form, floats bitwise through bf16, masks exactly as int64.
    position = {row["key"]: i for i, row in enumerate(rows)}
    batches = [[position[k] for k in batch] for shard in dict.fromkeys(r["shard"] for r in rows)
               for batch in _cache_batches([r for r in rows if r["shard"] == shard])]
    for batch in batches:
        expected = padded(family, encode_family_prompts(family, parts, [captions[i] for i in batch]), length)
        for name in spec.text_inputs:
            stored = torch.stack([cached[i][name] for i in batch])
            want = expected[name] if name == spec.text_mask else expected[name].to(torch.bfloat16).float()
            assert stored.dtype == want.dtype and torch.equal(stored, want), (batch, name)
    shapes = {name: {tuple(c[name].shape) for c in cached} for name in spec.text_inputs}
    assert all(len(s) == 1 for s in shapes.values()), shapes  # one shape per tensor: the trainer stacks them
    if spec.text_mask is not None:
        masks = torch.stack([c[spec.text_mask] for c in cached])
        assert masks.shape == (12, length) and masks.dtype == torch.int64 and (masks.sum(1) < length).all()
    negative = padded(family, encode_family_prompts(family, parts, [""], negative=True), length)
    stored_negative = dataset.negative_text()
    assert list(stored_negative) == list(spec.text_inputs)
    for name, x in stored_negative.items():
        assert x.shape == cached[0][name].shape
        assert torch.equal(x, negative[name][0] if name == spec.text_mask else negative[name][0].to(torch.bfloat16).float())

    # Latents: the keyed posterior sample (Sana: the deterministic encoding), normalised, patchified q×q
    # channel-first on the p×p pixel patch grid, [C·q², H/p, W/p].
    p, q = spec.pixel_patch, spec.latent_patch
    assert (p, spec.latent_dim) == GEOMETRY[family]
    if spec.latent_normalisation == "scale_shift":  # the released VAEs' factors (SD3 shifts too; DC-AE does not)
        assert (vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0) == spec.vae_factors
    else:  # Qwen-Image: per-channel statistics of its VAE config
        assert len(vae.config.latents_mean) == len(vae.config.latents_std) == spec.latent_channels
    assert len({c["latents"].shape for c in cached}) > 1  # two aspect buckets
    for row, c in zip(rows, cached):
        assert c["latents"].shape == (spec.latent_dim, row["height"] // p, row["width"] // p)
    # Normalisation, on one image: undone as the pipeline undoes it, the VAE's own encoding.
    mode = family_latents(spec, vae, images[0][None])
    torch.testing.assert_close(unnormalised(family, vae, mode), vae_encoding(family, vae, images[0][None]), rtol=1e-5,
                               atol=1e-5)
    # Every sample, on the cache's batches (the CLI's VAE ran them on one thread, as here): bitwise the bf16 of
    # the keyed sample (Sana: the encoding) patchified.
    for batch in batches:
        keys = [rows[i]["key"] for i in batch]
        batch_images = torch.stack([images[i] for i in batch])
        if has_posterior(spec):
            latent = family_latents(spec, vae, batch_images, "sample", [posterior_seed(k) for k in keys])
        else:
            latent = family_latents(spec, vae, batch_images)
        stored = torch.stack([cached[i]["latents"] for i in batch])
        assert torch.equal(stored, patchify_grid(latent, q).to(torch.bfloat16).float()), keys
    latent = latent[-1:]  # of the last batch's last image, batch[-1]
    if has_posterior(spec):  # a sample, not the mode
        assert (family_latents(spec, vae, images[batch[-1]][None]) - latent).abs().max() > 1e-2
    # The grid's tokens (pack) are the ones the latent transformer reads in: Qwen-Image's pipeline packs them so;
    # SD3's and Sana's conv patch embedding is a linear map on them.
    latent_grid = patchify_grid(latent, q)
    if spec.read_in.kind == "linear":
        _, channels, height, width = latent.shape
        pipeline = getattr(diffusers, spec.pipeline_classes[0])
        assert torch.equal(pack(latent_grid), pipeline._pack_latents(latent, 1, channels, height, width))
    else:
        transformer = load_pipeline_components(paths["model"], ("transformer",))["transformer"]
        conv = transformer.get_submodule(spec.read_in.module)
        with torch.no_grad():
            embedded = conv(latent).flatten(2).transpose(1, 2)
            linear = pack(latent_grid) @ conv.weight.flatten(1).T + conv.bias
        torch.testing.assert_close(embedded, linear, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_subspace_from_the_cache_equals_the_in_memory_family_fit(prepared, family, tmp_path) -> None:
    spec, paths = get_family(family), prepared(family)
    data, out = paths["data"], tmp_path / "subspace.safetensors"
    fitted = run_cli("prep", "subspace", str(data), "--config", str(paths["config"]), "--num-images", "12",
                     "--seed", "3", "--output", str(out), "--no-progress", env=ONE_THREAD)
    assert fitted.returncode == 0, fitted.stderr
    artifact = SubspaceArtifact.load(out)
    p, rank = GEOMETRY[family]
    assert artifact.basis.shape == (3 * p * p, rank) and artifact.patch_size == p
    assert artifact.feature_order == "channel_first" and artifact.method == "procrustes"
    assert artifact.extra["family"] == family and artifact.extra["num_images"] == "12"
    dataset = DatasetIndex.open(str(data))
    rows = [dataset.row(i) for i in range(len(dataset))]
    assert artifact.num_tokens == sum(r["height"] * r["width"] // p**2 for r in rows)

    # In memory on the cache's batches (its VAE ran on same-bucket batches of 3, on one thread as here), with the
    # keyed posterior samples (Sana: the deterministic encoding) rounded through bf16 as the cache stores them: the
    # same tokens, so B and s agree to their fp32 storage (measured ≤ 7.5e-9 on B), as for FLUX.1
    # (test_family_cache.py).
    position = {r["key"]: i for i, r in enumerate(rows)}
    batches = [[position[key] for key in batch] for shard in dict.fromkeys(r["shard"] for r in rows)
               for batch in _cache_batches([r for r in rows if r["shard"] == shard])]
    images = [torch.stack([read_image_sample(str(data), rows[i])[0] for i in batch]) for batch in batches]
    seeds = [[posterior_seed(rows[i]["key"]) for i in batch] for batch in batches] if has_posterior(spec) else None
    vae = load_pipeline_components(paths["model"], ("vae",))["vae"]
    basis, scale = fit_family_subspace(spec, vae, images, seeds, latent_dtype=torch.bfloat16)
    torch.testing.assert_close(artifact.basis.double(), basis, rtol=0, atol=2**-24)  # B is stored in fp32, |B| ≤ 1
    assert artifact.scale == pytest.approx(scale, rel=2**-24)  # s is stored in fp32


def test_qwen_image_transformer_gives_the_pipeline_output_for_the_padded_text() -> None:
    """The cache's fixed-length Qwen-Image text (zero-padded to 512 with the mask) conditions the real
    QwenImageTransformer2DModel as the pipeline's own form does (padded to the batch's longest, no mask when
    nothing is padded): its attention masks the padded keys and text RoPE positions do not depend on the length.
    Equal to fp32 rounding (measured max |Δ| 3e-7 and 5e-7 on outputs of magnitude ~2: the padded keys' softmax
    weights are exactly 0, only the attention kernel's reduction length differs)."""
    from asymflow.families.fixed_text import fixed_length_text
    from asymflow.families.tiny import build_tiny_family_transformer
    from asymflow.families.tiny_text import build_tiny_text_components

    spec, length = get_family("qwen_image"), pipeline_text_length("qwen_image")
    parts = build_tiny_text_components("qwen_image")
    model = build_tiny_family_transformer("qwen_image")
    height, width = 4, 6  # packed tokens of a 64×96 image
    for prompts in (["a red cat"], ["a red cat on a sunny street", "a small dog"]):
        generator = torch.Generator().manual_seed(len(prompts))
        x = torch.randn(len(prompts), height * width, 64, generator=generator)

        def velocity(text: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return model(hidden_states=x, encoder_hidden_states=text["encoder_hidden_states"],
                             encoder_hidden_states_mask=text.get("encoder_hidden_states_mask"),
                             timestep=torch.full((len(prompts),), 0.3), img_shapes=[(1, height, width)] * len(prompts)).sample

        pipeline_form = encode_family_prompts("qwen_image", parts, prompts)
        assert ("encoder_hidden_states_mask" in pipeline_form) == (len(prompts) > 1)  # one prompt: no mask
        cached_form = fixed_length_text(spec, pipeline_form, length)
        assert {n: x.shape[1] for n, x in cached_form.items()} == {n: length for n in spec.text_inputs}
        for name, value in padded("qwen_image", pipeline_form, length).items():
            assert torch.equal(cached_form[name], value), name
        reference = velocity(pipeline_form)
        torch.testing.assert_close(velocity(cached_form), reference, rtol=1e-5, atol=1e-6)
        # Without the mask the padding would be attended to: the output moves far beyond that tolerance.
        unmasked = {"encoder_hidden_states": cached_form["encoder_hidden_states"]}
        assert (velocity(unmasked) - reference).abs().max() > 1e-3


def test_qwen_image_resume_after_a_kill_is_byte_identical(prepared, tmp_path) -> None:
    """Killed while writing its last shard and rerun: the same bytes (padded text, int64 masks, keyed samples)."""
    paths = prepared("qwen_image")
    data = copy_dataset(paths["data"], tmp_path / "data")
    before = file_hashes(data)
    kill_during_last_shard(data / "cache")
    resumed = run_cli("prep", "cache", str(data), "--config", str(paths["config"]), "--batch-size", "3",
                      env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 shards written, 2 already done" in resumed.stdout and file_hashes(data) == before


def test_masks_are_stored_exactly_in_either_cache_dtype() -> None:
    from safetensors.torch import load as st_load

    from data_prep.cache import bytes_to_tensors, tensors_to_bytes

    text = {"encoder_hidden_states": torch.randn(8, 4, generator=torch.Generator().manual_seed(0)),
            "encoder_hidden_states_mask": torch.tensor([1] * 5 + [0] * 3)}
    for dtype in ("bf16", "fp8"):
        data = tensors_to_bytes(text, dtype)
        stored = st_load(data)
        assert stored["encoder_hidden_states_mask"].dtype == torch.int64 and "encoder_hidden_states_mask_scale" not in stored
        back = bytes_to_tensors(data, list(text))
        assert back["encoder_hidden_states_mask"].dtype == torch.int64
        assert torch.equal(back["encoder_hidden_states_mask"], text["encoder_hidden_states_mask"])
        assert back["encoder_hidden_states"].dtype == torch.float32  # floats: dequantised as before
