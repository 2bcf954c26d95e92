"""The example configs of the other families' released checkpoints (configs/<checkpoint>.yaml): their memory comment
is `predict_memory`'s figure for their own settings (so it cannot go stale), their trainable set is the family's,
docs/SCALING.md's per-family table is bench/memory_table.py's output, and the family-aware memory model counts what
the closed forms say (LoRA on FLUX.1-dev's names; Sana's text outside the blocks)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from asymflow.families import get_family
from asymflow.families.released import RELEASED

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table():
    """bench/memory_table.py loaded once, so its meta-built counts are shared by this module's tests."""
    spec = importlib.util.spec_from_file_location("memory_table", REPO / "bench" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(RELEASED))
def test_config_comment_is_the_prediction(table, name):
    assert table.config_section(name) == table.config_comment(name), (
        f"configs/{name}.yaml's memory comment is stale: run .venv/bin/python bench/memory_table.py --write")
    family = get_family(RELEASED[name].family)
    sections = table.family_sections(name)  # the model section validates with every family allowed
    assert sections["model"].family == family.name
    assert sections["trainable"].lora.targets == family.lora_targets
    assert sections["trainable"].full_modules == family.full_modules
    assert sections["train"].use_gpu and sections["train"].global_batch == 256
    import yaml

    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    assert raw["objective"]["patch_size"] == family.pixel_patch and raw["subspace"]["rank"] == family.latent_dim


def test_scaling_md_family_table_is_the_scripts_output(table):
    assert table.family_document_section() == table.family_markdown(table.family_predictions()), (
        "docs/SCALING.md's family memory table is stale: run .venv/bin/python bench/memory_table.py --write")


def _run_config(name: str, **paths):
    """configs/<name>.yaml as a RunConfig, validated as `asymflow train` validates it, with `paths` ("model",
    "data") pointing at local directories."""
    import yaml

    from orchestration.config import RunConfig

    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    for section, path in paths.items():
        raw[section]["path"] = str(path)
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("name", list(RELEASED))
def test_whole_config_validates_for_training(name):
    """Every example config is a valid training config as `load_config` checks it, Sana's pixel patch 32 included
    (tests/orchestration/test_family_train.py dry-runs each on a local pipeline directory)."""
    cfg = _run_config(name)
    family = get_family(RELEASED[name].family)
    assert cfg.model.family == cfg.family() == family.name
    assert (cfg.objective.patch_size, cfg.objective.latent_patch) == (family.pixel_patch, family.latent_patch)


def test_flux1_dev_dry_run_counts_and_predicts(table, tmp_path):
    """The dry run's report of a FLUX.1-dev run (a directory with its transformer/config.json, a 1024² dataset):
    the counts equal the closed form of the recipe's LoRA (rank r = 256) on FLUX.1's names and the fully trained
    modules, from the config's dimensions (d = 3072, FLUX.1's MLPs are 4d wide, its single blocks' proj_out reads
    attention ‖ MLP = 5d), and the predicted memory is the config comment's.
      LoRA = r·[ L·2·((d + 4d) + (4d + d))   ff and ff_context of the double blocks: net.0.proj, net.2
               + S·(5d + d)                  single blocks' proj_out
               + (256 + d) + (d + d) ]       timestep embedder linear_1, linear_2
      full = (768·d + d) + (d·768 + 768) + (d·2d + 2d)   x_embedder, proj_out, norm_out.linear"""
    import numpy as np
    from PIL import Image

    from data_prep.images import ImageSpec
    from data_prep.shards import BuildConfig, build_shards
    from orchestration.dry_run import count_parameters, dry_run_report

    config = RELEASED["flux1-dev"].config
    (tmp_path / "FLUX.1-dev" / "transformer").mkdir(parents=True)
    (tmp_path / "FLUX.1-dev" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    (tmp_path / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "images" / "0.png")
    (tmp_path / "images" / "0.txt").write_text("noise")
    report = build_shards(BuildConfig(input=str(tmp_path / "images"), output=str(tmp_path / "data"),
                                      image=ImageSpec(buckets=((1024, 1024),))), workers=1, show_progress=False)
    assert report.exit_code == 0, report.message
    cfg = _run_config("flux1-dev", model=tmp_path / "FLUX.1-dev", data=tmp_path / "data")
    p = count_parameters(cfg)

    d, r, L, S = 3072, 256, config["num_layers"], config["num_single_layers"]
    lora = r * (L * 2 * ((d + 4 * d) + (4 * d + d)) + S * (5 * d + d) + (256 + d) + (d + d))
    full = (768 * d + d) + (d * 768 + 768) + (d * 2 * d + 2 * d)
    assert (p.trainable - p.full_modules, p.full_modules) == (lora, full)
    assert (p.layers, p.width, p.patch, p.text_in_blocks, p.buffers) == (L + S, d, 16, True, 0)
    assert p == table.family_prediction("flux1-dev")[0]  # the table's meta build of RELEASED counts the same

    text = dry_run_report(cfg)
    assert f"{L + S} blocks of width {d}" in text
    assert f"= {table.family_prediction('flux1-dev')[1].total / 1e9:.2f} GB" in text  # the config comment's figure


def test_cross_attention_text_is_kept_once(table):
    """Sana: T = image tokens only (1024² / 32² = 1024), its 300 text tokens kept once (not per block); SD3: the
    77 CLIP tokens join the 256 T5 tokens in every block."""
    from orchestration.dry_run import (BLOCK_TRANSIENT, IMAGE_ALGEBRA_TENSORS, activation_bytes_per_sample,
                                       stream_text_tokens)

    p = table.family_prediction("sana-1600m")[0]
    assert (p.layers, p.width, p.patch, p.text_in_blocks) == (20, 2240, 32, False)
    assert p.transient == BLOCK_TRANSIENT["lora"]["SanaTransformerBlock"]
    image = 1024 * 1024 // 32**2
    expected = (20 + p.transient) * image * 2240 * 2 + 300 * 2240 * 2 + IMAGE_ALGEBRA_TENSORS * 3 * 1024**2 * 4
    assert activation_bytes_per_sample(p, 1024, 1024, stream_text_tokens("sana", 300), True, True) == expected
    assert stream_text_tokens("sd3", 256) == 77 + 256 and stream_text_tokens("flux1", 512) == 512


@pytest.fixture(scope="module")
def block_transient():
    spec = importlib.util.spec_from_file_location("block_transient", REPO / "bench" / "block_transient.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_block_transients_are_measured(block_transient):
    """BLOCK_TRANSIENT is what bench/block_transient.py measures on tiny instances of the real classes (bytes each
    block saves for its backward in a bf16 LoRA or full training forward, over T·d·2 bytes), FLUX.2's included."""
    from orchestration.dry_run import BLOCK_TRANSIENT

    measured = block_transient.measured_transients()
    assert {mode: {kind: round(value, 1) for kind, value in kinds.items()}
            for mode, kinds in measured.items()} == BLOCK_TRANSIENT


def test_block_transient_is_the_autograd_graphs_saved_tensors(block_transient):
    """The measurement counted independently for FLUX.2's double block: walking the autograd graph from the block's
    outputs back to its inputs and summing the distinct storages the nodes hold as saved tensors (parameters and
    the block's inputs left out) gives the pack hook's count; and it holds at least what the block's code says it
    must keep: q, k, v and the attention output over the joint stream (4 T·d), the q/k RMSNorms' fp32 inputs
    (2 × 2 T·d), and per token of both streams the SwiGLU MLP's 6d-wide input, 3d-wide SiLU output and LoRA's 3d-wide
    dropped input with its bool mask (13.5 d per token)."""
    import torch

    name, model = "transformer_blocks.0", block_transient.trainable_pixel("flux2", "lora")
    seen = {}
    block = model.get_submodule(name)
    block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(inputs=[
        t for v in (*args, *kwargs.values()) for t in (v if isinstance(v, tuple) else (v,))
        if isinstance(t, torch.Tensor)]), with_kwargs=True)
    block.register_forward_hook(lambda m, args, kwargs, out: seen.update(outputs=list(out)), with_kwargs=True)
    block_transient.forward(model, "flux2")

    def reach(tensors):
        nodes, stack = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node not in nodes:
                nodes.add(node)
                stack += [n for n, _ in node.next_functions if n is not None]
        return nodes

    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *seen["inputs"])}
    storages = {}
    for node in reach(seen["outputs"]) - reach(seen["inputs"]):
        for attr in (a for a in dir(node) if a.startswith("_saved_")):
            value = getattr(node, attr)
            for t in value if isinstance(value, (tuple, list)) else (value,):
                # 0-d: Python numbers autograd wraps (LoRA's scale), never passed to a pack hook, not device memory
                if isinstance(t, torch.Tensor) and t.dim() and t.untyped_storage().data_ptr() not in skip:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    tokens = block_transient.IMAGE_SIDE**2 + block_transient.TEXT_TOKENS["flux2"]
    walked = sum(storages.values()) / (tokens * block_transient.WIDTH * 2)
    assert walked == pytest.approx(block_transient.block_transients("flux2")[name], rel=1e-9)
    assert walked >= 4 + 4 + 13.5


def test_released_checkpoints_take_their_largest_block(table):
    """Each model's transient is its largest block's for its trainable mode (SD3.5 Large has no dual-attention
    block, Medium has; FLUX.2 klein's double block holds more than its single)."""
    from orchestration.dry_run import BLOCK_TRANSIENT

    expected = {"flux1-dev": "FluxTransformerBlock", "sd3.5-large": "JointTransformerBlock",
                "sd3.5-medium": "JointTransformerBlock+dual_attention", "qwen-image": "QwenImageTransformerBlock",
                "sana-1600m": "SanaTransformerBlock"}
    for name, kind in expected.items():
        for mode in ("lora", "full"):
            assert table.family_prediction(name, mode)[0].transient == BLOCK_TRANSIENT[mode][kind], (name, mode)
    from asymflow.klein import build_klein_transformer
    from orchestration.config import TrainableSection
    from orchestration.dry_run import count_model_parameters

    for mode in ("lora", "full"):  # FLUX.2 (klein 4B; 9B's LoRA in test_dry_run)
        p = count_model_parameters(build_klein_transformer("4b", device="meta"), TrainableSection(mode=mode))
        assert p.transient == BLOCK_TRANSIENT[mode]["Flux2TransformerBlock"], mode


def test_readme_table_is_the_scripts_output(table):
    assert table.readme_section() == table.readme_table(), (
        "README's family config table is stale: run .venv/bin/python bench/memory_table.py --write")
