"""`asymflow train` through the whole stack for every model family beside FLUX.2 (issue 15): a tiny pipeline directory
of the family's real diffusers classes → the session's shards (tests/orchestration/conftest.py `dataset`, 32×32
images: a 2×2 token grid for a 16-pixel patch, one token for Sana's 32) → the family's latent/text cache and subspace
→ Ray + ZeRO-3 (2 CPU workers), one worker SIGTERMed mid-run and the run resumed, against an uninterrupted run: the
final trainable weights and EMA are bitwise equal; the EMA samples (families.sampling), the adapter and merged
exports and the `--weights trainable` rebuild are the family's.

A family joins with one line in FAMILIES once its data prep exists (`prep cache` / `prep subspace`) and a tiny
pipeline directory can be written for it (asymflow.families.load.save_tiny_family_pipeline). Each family costs two
runs (three worker-group starts): the shards and the Ray cluster are shared by all, the runs are 3 steps of one
sample per worker, and the EMA samples are rendered here, by the function the in-training Ray task runs
(orchestration.artifacts.render_samples; its dispatch is family-blind and FLUX.2's integration runs prove it), which
saves a Ray task's start-up per family.
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.asymflow.test_families_convert import conditioning
from tests.orchestration.test_train_integration import (  # noqa: F401  (`ray_cluster`: module fixture)
    Killer, _assert_same, _final_tensors, _keys_by_step, _run, ray_cluster,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A checkpoint at every step (configs/tiny-<family>.yaml): step 1's is on disk when the SIGTERM lands in step 2, whose
# just-in-time checkpoint the restarted workers resume from to train step 3.
STEPS = 3
FAMILIES = [
    pytest.param(("flux1", "tiny-flux1.yaml"), id="flux1"),  # (family, config)
    pytest.param(("sd3", "tiny-sd3.yaml"), id="sd3"),
    pytest.param(("qwen_image", "tiny-qwen-image.yaml"), id="qwen_image"),
    pytest.param(("sana", "tiny-sana.yaml"), id="sana"),
]


@pytest.fixture(scope="module", autouse=True)
def quick_ray_train():
    """Ray Train's controller (it passes these on to every run it starts) polls the worker group every 0.5 s instead of
    2 s, so a finished run, and the worker group a SIGTERM ended, are seen sooner; and starts no node-drain watcher
    actor (a cloud node's preemption notice; the SIGTERM here is the workers' own, handled by the trainer)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def family_data(request, dataset, tmp_path_factory) -> dict:
    """The family's tiny pipeline directory and a copy of the session's shards with the family's cache + subspace."""
    from asymflow.families.load import save_tiny_family_pipeline
    from data_prep.cache import CACHE_DIR, build_cache
    from data_prep.run_config import load_model_config
    from data_prep.subspace_job import fit_subspace

    family, config = request.param
    root = tmp_path_factory.mktemp(f"{family}-train")
    model = save_tiny_family_pipeline(family, root / "model")
    data = root / "data"
    # The shards only: the session's FLUX.2 cache and subspace stay behind.
    shutil.copytree(dataset, data, ignore=lambda d, names: [n for n in names if n in (CACHE_DIR, "subspace.safetensors")])
    model_cfg = root / "model.yaml"
    model_cfg.write_text(f"model:\n  kind: diffusers\n  path: {model}\n")
    cfg = load_model_config(str(model_cfg))  # data prep's own config path; the family is detected
    build_cache(str(data), cfg, batch_size=8, progress=False)
    fit_subspace(str(data), cfg, num_images=16, progress=False)
    return {"family": family, "config": str(REPO / "configs" / config), "model": model, "data": str(data)}


def _config(family_data: dict, storage: Path, name: str, extra: tuple[str, ...] = ()):
    from orchestration.config import load_config

    return load_config(family_data["config"], [
        f"model.path={family_data['model']}", f"data.path={family_data['data']}", f"run.storage={storage}",
        f"run.name={name}", f"train.steps={STEPS}", "log.wandb_mode=disabled", "sample.every=0", *extra,
    ])


def test_family_run_resumes_bitwise_after_sigterm(family_data, ray_cluster, tmp_path):
    import json

    import torch

    from asymflow.families import get_family
    from asymflow.families.adapter import load_family_adapter
    from PIL import Image

    from orchestration.artifacts import (
        build_model_from_checkpoint, build_model_from_state, export_checkpoint, render_samples,
    )
    from orchestration.checkpoint import EMA, load_tensors, read_state
    from orchestration.preflight import check_inputs

    family = get_family(family_data["family"])
    plain_cfg = _config(family_data, tmp_path, "plain")
    assert plain_cfg.family() == family.name and plain_cfg.subspace.rank == family.latent_dim
    assert plain_cfg.trainable.lora.targets == family.lora_targets
    check_inputs(plain_cfg)  # preflight accepts the family's cache and subspace
    plain = Path(_run(plain_cfg).run_dir)
    termed = Killer(tmp_path / "sigterm", after_steps=1, sig=signal.SIGTERM)
    _run(_config(family_data, tmp_path, "sigterm"), termed)
    assert termed.killed_pid, "the killer never found a worker"

    reference, resumed = _final_tensors(plain, STEPS), _final_tensors(tmp_path / "sigterm", STEPS)
    _assert_same(reference[0], resumed[0])
    _assert_same(reference[1], resumed[1])
    assert _keys_by_step(tmp_path / "sigterm") == _keys_by_step(plain) and sorted(_keys_by_step(plain)) == [0, 1, 2]
    # counted on resuming from the preempted checkpoint, so only a checkpoint written after the resume carries it
    final_state = read_state(str(tmp_path / "sigterm" / "checkpoints" / f"step-{STEPS:08d}"))
    assert final_state["preemptions"] >= 1 and final_state["steps_lost"] == 0
    # Trained: the LoRA (B starts at zero) and every fully trained module (Sana's scale_shift_table: a parameter)
    # moved from the converted init; some caption was dropped, so the empty prompt's named tensors (pooled
    # projections, text masks) went through the step too.
    assert any("lora_B" in n and reference[0][n].abs().max() > 0 for n in reference[0])
    init, _ = build_model_from_state(final_state, {})
    for module in family.full_modules:
        names = [n for n in reference[0] if n == module or n.startswith(f"{module}.")]
        assert names and any(not torch.equal(reference[0][n], init.state_dict()[n]) for n in names), module
    metrics = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert any(m["caption_dropped_frac"] > 0 for m in metrics)

    # The EMA samples of the final checkpoint, through the family's text encoders and sampler; the export is the
    # family's adapter, and loading it onto the latent base gives the model `--weights ema` rebuilds from the checkpoint.
    checkpoint = plain / "checkpoints" / f"step-{STEPS:08d}"
    (png,) = render_samples(read_state(str(checkpoint)), load_tensors(str(checkpoint / EMA)), str(tmp_path / "samples"))
    with Image.open(png) as image:
        assert (image.mode, image.size) == ("RGB", (plain_cfg.sample.width, plain_cfg.sample.height))
    export = plain / "export" / f"step-{STEPS:08d}"
    model, cfg, _ = build_model_from_checkpoint(str(plain / "checkpoints" / f"step-{STEPS:08d}"), "ema")
    assert type(model) is family.pixel_class()
    loaded = load_family_adapter(export, str(Path(family_data["model"]) / "transformer")).eval()
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.3, 0.7])
    text, extra = conditioning(family.name, 2, torch.float32)
    with torch.no_grad():
        want, got = model(x, sigma, text, **extra), loaded(x, sigma, text, **extra)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # `--merged`: the LoRA fused into a complete model directory that the family's pixel class loads alone.
    merged = export_checkpoint(str(plain), STEPS, out=str(tmp_path / "merged"), merged=True)
    with torch.no_grad():
        fused = family.pixel_class().from_pretrained(merged).eval()(x, sigma, text, **extra)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    # `--weights trainable` rebuilds the family's pixel model from DeepSpeed's consolidated trainable weights.
    trained, _, _ = build_model_from_checkpoint(str(plain / "checkpoints" / f"step-{STEPS:08d}"), "trainable")
    assert type(trained) is family.pixel_class()
    read_in = f"{family.read_in.module}.weight"  # x_embedder, SD3's conv pos_embed.proj, img_in, ...
    assert torch.equal(trained.get_parameter(read_in), reference[0][read_in])
    # `train --dry-run` counts the family's pixel model; `asymflow sample` resolves the run as the family's.
    from orchestration.dry_run import count_parameters
    from orchestration.sample_source import resolve_source

    assert count_parameters(cfg).total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    source = resolve_source(str(plain))
    assert (source.kind, source.family, source.step) == ("run", family.name, STEPS)


def test_preflight_refuses_another_familys_cache_subspace_or_guidance(family_data, dataset, tmp_path):
    """One ConfigError line each: a FLUX.2 run on the family's cache, the family's run with the session's FLUX.2
    subspace, and train.guidance for a model without a guidance embedding."""
    import json

    from orchestration.config import ConfigError, load_config
    from orchestration.preflight import check_inputs

    name = family_data["family"]
    flux2 = load_config(str(REPO / "configs" / "tiny.yaml"), [f"data.path={family_data['data']}"])
    with pytest.raises(ConfigError, match=rf"^data.path: the cache in .* holds {name} latents and text, this run "
                                          r"trains a flux2 model; rebuild it with `asymflow prep cache"):
        check_inputs(flux2)
    mixed = _config(family_data, tmp_path, "mixed", (f"subspace.path={dataset}/subspace.safetensors",))
    with pytest.raises(ConfigError, match=rf"^subspace.path: .* was fitted for a flux2 model, this run trains a "
                                          rf"{name} model; refit it with `asymflow prep subspace`$"):
        check_inputs(mixed)
    # train.guidance for a model without a guidance embedding: the family's own model (SD3, Qwen-Image, Sana), or for
    # FLUX.1's guidance-distilled one the same pipeline without it (FLUX.1-schnell-like).
    model = Path(family_data["model"])
    if json.loads((model / "transformer" / "config.json").read_text()).get("guidance_embeds", False):
        model = tmp_path / "no-guidance"
        shutil.copytree(family_data["model"], model)
        config_file = model / "transformer" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "guidance_embeds": False}))
    cfg = _config({**family_data, "model": model}, tmp_path, "no-guidance", ("train.guidance=2.0",))
    with pytest.raises(ConfigError, match=r"^train.guidance=2.0: the model in .* has no guidance embedding"):
        check_inputs(cfg)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """A weights file in `asymflow prep lpips`'s layout (LPIPS-VGG's state dict), zeros: the dry run only checks that
    perceptual.weights_path is a readable safetensors file, it loads no network."""
    import torch
    from safetensors.torch import save_file

    from asymflow.lpips_weights import lpips_state_dict, vgg16_conv_shapes
    from asymflow.perceptual import LPIPS_CHANNELS

    features = {i: (torch.zeros(out, inp, 3, 3), torch.zeros(out)) for i, (out, inp) in vgg16_conv_shapes().items()}
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file(lpips_state_dict(features, [torch.zeros(1, c, 1, 1) for c in LPIPS_CHANNELS]), str(path))
    return path


def test_released_configs_dry_run_on_a_local_pipeline(family_data, lpips_file, tmp_path, capsys):
    """`asymflow train --dry-run configs/<checkpoint>.yaml` for the family's released checkpoints (configs/flux1-dev,
    sd3.5-large, sd3.5-medium, qwen-image, sana-1600m.yaml) once a local pipeline directory (here the tiny one), its
    cache and subspace and the LPIPS weights exist: the whole config passes validation and preflight, and the plan
    counts the directory's model (its blocks and width, from its transformer/config.json); nothing starts."""
    import json

    from asymflow.families.released import RELEASED
    from orchestration.cli import main

    config = json.loads((Path(family_data["model"]) / "transformer" / "config.json").read_text())
    blocks = config["num_layers"] + config.get("num_single_layers", 0)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    names = [name for name, released in RELEASED.items() if released.family == family_data["family"]]
    assert names
    for name in names:
        storage = tmp_path / name
        # 20 samples hold no global batch of 256: the plan pads the bucket's remainder, as the error message advises
        assert main(["train", str(REPO / "configs" / f"{name}.yaml"), "--dry-run", "--data", family_data["data"],
                     "--storage", str(storage), "--set", f"model.path={family_data['model']}",
                     "--set", f"perceptual.weights_path={lpips_file}", "--set", "data.drop_remainder=false"]) == 0, name
        out = capsys.readouterr().out
        assert f"family: {family_data['family']}" in out and f"{blocks} blocks of width {width}" in out, name
        assert "predicted memory per worker" in out and not storage.exists()
