"""Every command's error paths (in process, through `orchestration.cli.main`): one `error:` line naming the file,
field or path, exit 2 for usage/config errors, no traceback unless --debug; plus the driver-side preflight."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from orchestration.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused at once


def write_family_dir(root: Path, family: str, pipeline_class: str | None) -> Path:
    """A diffusers directory of a tiny random `family` transformer, configs only (detection reads no weights):
    transformer/config.json as the real class saves it, and model_index.json naming `pipeline_class` if given."""
    import json

    import diffusers

    from asymflow.families.tiny import build_tiny_family_transformer

    model = build_tiny_family_transformer(family)
    model.save_config(root / "transformer")
    if pipeline_class is not None:
        index = {"_class_name": getattr(diffusers, pipeline_class).__name__, "_diffusers_version": diffusers.__version__,
                 "transformer": ["diffusers", type(model).__name__]}
        (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "bad.yaml").write_text("train:\n  lr: [1,\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "empty").mkdir()
    flux1 = write_family_dir(root / "flux1", "flux1", "FluxPipeline")  # a pipeline directory
    sd3 = write_family_dir(root / "sd3", "sd3", None)  # transformer/config.json only
    (root / "alien").mkdir()
    (root / "alien" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    for name, model in {"flux1": f"kind: diffusers\n  path: {flux1}", "sd3": f"kind: diffusers\n  path: {sd3}",
                        "qwen": "family: qwen_image", "dalle": "family: dalle"}.items():
        (root / f"{name}.yaml").write_text(f"model:\n  {model}\n")
    return {"bad": str(root / "bad.yaml"), "list": str(root / "list.yaml"), "dir": str(root / "empty"),
            "missing": str(root / "missing.yaml"), "nodata": str(root / "empty"), "root": str(root),
            "flux1": str(flux1), "sd3": str(sd3), "alien": str(root / "alien"), "flux1_cfg": str(root / "flux1.yaml"),
            "sd3_cfg": str(root / "sd3.yaml"), "qwen_cfg": str(root / "qwen.yaml"), "dalle_cfg": str(root / "dalle.yaml")}


DIFFUSERS = ("--set", "model.kind=diffusers", "--data", "{nodata}", "--set")


# (argv with {placeholders}, exit code, text the single error line must contain)
CASES = [
    ([], 2, "required: COMMAND"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["train"], 2, "CONFIG"),
    (["train", "{missing}"], 2, "{missing}: no such config file"),
    (["train", "{dir}"], 2, "{dir}: is a directory"),
    (["train", "{bad}"], 2, "{bad}: invalid YAML at line 3"),
    (["train", "{list}"], 2, "{list}: a run config must be a YAML mapping"),
    (["train", TINY, "--set", "train.lrr=1"], 2, "--set train.lrr=1: train.lrr: unknown key (did you mean `train.lr`?)"),
    (["train", TINY, "--set", "train.lr=fast"], 2, "--set train.lr=fast: train.lr: Input should be a valid number"),
    (["train", TINY, "--steps", "0"], 2, "--steps 0: train.steps: Input should be greater than 0"),
    (["train", TINY, "--set", "trainable.mode=full", "--set", "trainable.frozen_params=replicated"], 2,
     "trainable.frozen_params 'replicated' needs trainable.mode 'lora'"),
    (["train", TINY, "--steps", "many"], 2, "--steps: invalid int value: 'many'"),
    (["train", TINY, "--set", "nokeyvalue"], 2, "--set nokeyvalue: must look like section.key=value"),
    (["train", TINY, "--name", "2024", "--data", "{nodata}"], 2, "data.path: {nodata}: not a dataset"),
    (["submit", "{missing}"], 2, "{missing}: no such config file"),
    (["submit", TINY, "--address", DEAD, "--storage", "{root}/s", "--data", "{nodata}"], 2,
     "Failed to connect to Ray at address: " + DEAD),
    (["status", "nosuch", "--storage", "{root}"], 2, "no submission of run nosuch"),
    (["logs", "nosuch", "--storage", "{root}"], 2, "no submission of run nosuch"),
    (["stop", "nosuch", "--storage", "{root}"], 2, "{root}/nosuch/ledger.jsonl has no submission"),
    (["list", "--address", DEAD], 2, "Failed to connect to Ray at address: " + DEAD),
    (["export", "{root}"], 2, "{root} has no complete checkpoint"),
    (["export", "{root}", "--weights", "all"], 2, "--weights: invalid choice: 'all'"),
    (["cluster"], 2, "required"),
    (["cluster", "up", "--num-cpus", "0"], 2, "--num-cpus 0: must be in [1,"),
    (["cluster", "down", "--port", "1"], 2, "unrecognized arguments: --port 1"),
    (["prep"], 2, "required"),
    (["prep", "shards", "{nodata}", "{root}/out", "--resolution", "100"], 2, "--resolution 100: must be a positive"),
    (["prep", "shards", "{root}/none", "{root}/out"], 2, "input '{root}/none' does not exist"),
    (["prep", "shards", "{nodata}", "{root}/out", "--aspect-ratios", "wide"], 2, "--aspect-ratios: expected"),
    (["prep", "verify", "{nodata}"], 2, "{nodata}: not a dataset"),
    (["prep", "stats", "{nodata}"], 2, "{nodata}: not a dataset"),
    (["prep", "cache", "{nodata}", "--config", "{bad}"], 2, "{bad}: invalid YAML at line 3"),
    (["prep", "cache", "{nodata}", "--config", "{missing}"], 2, "{missing}: no such config file"),
    (["prep", "subspace", "{nodata}", "--config", TINY], 2, "{nodata}: not a dataset"),
    (["prep", "subspace", "{nodata}", "--config", TINY, "--num-images", "x"], 2, "invalid int value: 'x'"),
    (["prep", "lpips", "--vgg16", "{missing}", "--heads", "{bad}", "--out", "{root}/o.safetensors"], 2,
     "--vgg16 {missing}: no such file"),
    (["serve", "bundled", "--port", "70000"], 2, "--port must be 1-65535"),
    (["sample", "{nodata}"], 2, "required: --prompt"),
    # model.family (issue 15): given, detected from model_index.json or transformer/config.json, contradicting
    (["train", TINY, "--set", "model.family=sd3"], 2,
     "model.family 'sd3' contradicts model.kind 'tiny', a flux2 model built in code or shipped with asymflow; use "
     "model.kind diffusers with a sd3 pipeline directory as model.path"),
    (["train", TINY, "--set", "train.guidance=3.5"], 2,
     "train.guidance=3.5 is for guidance-distilled models of the other families (FLUX.1-dev); FLUX.2 training gives "
     "the model no guidance value"),
    (["train", TINY, "--set", "model.family=flux1"], 2,
     "model.family 'flux1' contradicts model.kind 'tiny', a flux2 model built in code or shipped with asymflow"),
    (["train", TINY, "--set", "model.family=dalle"], 2,
     "model.family: unknown model family 'dalle'; supported families: flux2, flux1, sd3, qwen_image, sana"),
    # training is wired for every family: the directory is checked for the family's own components
    (["train", TINY, *DIFFUSERS, "model.path={flux1}"], 2,
     "model.path: {flux1} lacks vae/, tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/"),
    (["train", TINY, *DIFFUSERS, "model.path={sd3}"], 2,
     "model.path: {sd3} lacks vae/, tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/, tokenizer_3/, "
     "text_encoder_3/"),
    (["train", TINY, *DIFFUSERS, "model.path={flux1}", "--set", "model.family=flux2"], 2,
     "model.family 'flux2' contradicts model.path {flux1}, which holds a model of family flux1"),
    (["train", TINY, *DIFFUSERS, "model.path={alien}"], 2,
     "model.path: {alien}/model_index.json describes KandinskyPipeline, not a supported model; supported families: "),
    # data prep is wired for every family (the config is accepted; the dataset is not); a family needs its model
    (["prep", "cache", "{nodata}", "--config", "{flux1_cfg}"], 2, "prep cache: {nodata}: not a dataset"),
    (["prep", "cache", "{nodata}", "--config", "{sd3_cfg}"], 2, "prep cache: {nodata}: not a dataset"),
    (["prep", "subspace", "{nodata}", "--config", "{qwen_cfg}"], 2,
     "prep subspace: {qwen_cfg}: model.family 'qwen_image' contradicts model.kind 'tiny', a flux2 model built in code "
     "or shipped with asymflow; use model.kind diffusers with a qwen_image pipeline directory as model.path"),
    (["prep", "cache", "{nodata}", "--config", "{dalle_cfg}"], 2, "model.family: unknown model family 'dalle'"),
    # sampling is wired for every family, but a latent pipeline is not a pixel model (tests/orchestration/
    # test_family_sample_cli.py: the other cases)
    (["sample", "{flux1}", "--prompt", "x"], 2,
     "{flux1} is a latent FLUX.1 diffusers pipeline, not an AsymFlow one: sample an adapter converted from it with "
     "`asymflow sample ADAPTER --base {flux1}`"),
]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every leaf command of the console script, e.g. ("prep", "cache")."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out |= _commands(sub, (*prefix, name)) or {(*prefix, name)}
    return out


def test_every_command_has_a_bad_input_row():
    missing = [c for c in _commands(build_parser()) if not any(tuple(argv[:len(c)]) == c for argv, _, _ in CASES)]
    assert not missing, f"add bad-input rows to CASES for {missing}"


@pytest.mark.parametrize(("argv", "code", "text"), CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in CASES])
def test_error_is_one_line_with_exit_code(argv, code, text, files, capsys, monkeypatch):
    monkeypatch.delenv("ASYMFLOW_DEBUG", raising=False)
    monkeypatch.setenv("ASYMFLOW_HOME", files["root"])  # no remembered runs of the user's own
    argv = [a.format(**files) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert text.format(**files) in lines[0], err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    assert main(["train", files["bad"], "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ASYMFLOW_DEBUG", "1")
    assert main(["train", files["bad"]]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("asymflow ")


# ----------------------------------------------------------------------------------------------- preflight


def _train_error(capsys, *args: str) -> str:
    assert main(["train", TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.integration
def test_preflight_refuses_before_ray_starts(dataset, tmp_path, capsys):
    """The data plan, the cache's model, the subspace's model and missing model/LPIPS files are found on the driver;
    a relative --data is resolved to an absolute path first. No Ray session is started by any of these."""
    from dataclasses import replace

    import ray

    from asymflow.subspace import SubspaceArtifact

    storage = ["--storage", str(tmp_path / "runs")]
    assert "no bucket holds a full global batch of 64 samples" in _train_error(
        capsys, "--data", dataset, *storage, "--set", "train.global_batch=64")
    relative = os.path.relpath(dataset)
    err = _train_error(capsys, "--data", relative, *storage, "--set", "model.seed=1")
    assert f"the cache in {dataset}/cache was built by model 'tiny:seed=0'" in err and "'tiny:seed=1'" in err
    fitted = SubspaceArtifact.load(f"{dataset}/subspace.safetensors")
    other = tmp_path / "other-subspace.safetensors"
    replace(fitted, extra={**fitted.extra, "model_fingerprint": "tiny:seed=7"}).save(other)
    assert "was fitted with model 'tiny:seed=7'" in _train_error(
        capsys, "--data", dataset, *storage, "--set", f"subspace.path={other}")
    assert "perceptual.weights_path: " in _train_error(
        capsys, "--data", dataset, *storage, "--set", "perceptual.kind=lpips",
        "--set", f"perceptual.weights_path={tmp_path}/lpips.safetensors")
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    assert "lacks vae/, text_encoder/, tokenizer/" in _train_error(
        capsys, "--data", dataset, *storage, "--set", "model.kind=diffusers", "--set", f"model.path={tmp_path}/model")
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_relative_paths_become_absolute_in_the_resolved_config(tmp_path, monkeypatch):
    from orchestration.config import load_config, save_resolved
    from orchestration.preflight import resolve_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = resolve_local_paths(load_config(TINY, ["perceptual.kind=lpips", "perceptual.weights_path=w.safetensors"],
                                          {"data.path": "../data", "run.storage": "runs"}))
    assert cfg.data.path == str(tmp_path.parent / "data") and cfg.run.storage == str(tmp_path / "runs")
    assert cfg.perceptual.weights_path == str(tmp_path / "w.safetensors")
    assert cfg.subspace_path == str(tmp_path.parent / "data" / "subspace.safetensors")
    hub = resolve_local_paths(load_config(TINY, ["model.kind=diffusers", "model.path=org/model"], {"data.path": "s3://b/d"}))
    assert hub.model.path == "org/model" and hub.data.path == "s3://b/d"  # hub ids and URLs stay as written
    text = Path(save_resolved(cfg, str(tmp_path / "run"))).read_text()
    assert text.startswith("# Resolved run config") and f"path: {tmp_path.parent / 'data'}" in text


# ----------------------------------------------------------------------------------------------- model.family


def test_family_names_are_the_registry_and_detection_covers_every_kind(files, tmp_path):
    from typing import get_args

    from asymflow.components import BUNDLED_PATH, BaseModelConfig, FamilyName
    from asymflow.families import FAMILIES

    assert get_args(FamilyName) == tuple(FAMILIES)
    assert BaseModelConfig(kind="tiny").check_family() == "flux2"
    assert BaseModelConfig(kind="bundled", family="flux2").check_family() == "flux2"
    assert BaseModelConfig(kind="diffusers", path=str(BUNDLED_PATH)).detected_family() == "flux2"  # its transformer/
    assert BaseModelConfig(kind="diffusers", path="org/model").detected_family() is None  # a hub id: nothing to read
    assert BaseModelConfig(kind="diffusers", path=files["flux1"]).detected_family() == "flux1"
    assert BaseModelConfig(kind="diffusers", path=files["sd3"]).detected_family() == "sd3"
    for family, pipeline in (("qwen_image", "QwenImagePipeline"), ("sana", "SanaPipeline")):
        root = write_family_dir(tmp_path / family, family, pipeline)
        assert BaseModelConfig(kind="diffusers", path=str(root)).detected_family() == family


def test_family_does_not_change_the_config_hash():
    """model.path decides the family: writing the default down (or a run from before the field) resumes alike."""
    from orchestration.config import load_config

    assert load_config(TINY).config_hash() == load_config(TINY, ["model.family=flux2"]).config_hash()


def test_sample_base_of_another_family_is_refused(files):
    from asymflow.components import BUNDLED_PATH
    from orchestration.sample_source import base_from_arg

    with pytest.raises(ValueError, match=rf"--base {files['sd3']} holds a model of family sd3 \(Stable Diffusion 3 / 3.5\), "
                                         r"but SOURCE is a FLUX.2 model: its base must be a FLUX.2 klein directory"):
        base_from_arg(files["sd3"])
    assert base_from_arg(str(BUNDLED_PATH)).kind == "bundled"  # a FLUX.2 transformer/ stays accepted


def test_family_geometry_and_trained_set_are_the_run_defaults(files):
    """A FLUX.1 model's run takes FLUX.1's rank, patch sizes, fully trained modules and LoRA targets when the config
    does not write them (configs/tiny-flux1.yaml); values written in the config win; a FLUX.2 run keeps FLUX.2's."""
    from asymflow.families import get_family
    from asymflow.trainable import FLUX2_LORA_TARGETS
    from orchestration.config import load_config

    flux1, config = get_family("flux1"), str(REPO / "configs" / "tiny-flux1.yaml")
    cfg = load_config(config, [f"model.path={files['flux1']}"])
    assert cfg.family() == "flux1" and cfg.subspace.rank == flux1.latent_dim == 64
    assert (cfg.objective.patch_size, cfg.objective.latent_patch) == (16, 2)
    assert cfg.trainable.lora.targets == flux1.lora_targets and cfg.trainable.full_modules == flux1.full_modules
    assert cfg.trainable.lora.rank == 4  # the rest of the section as written
    written = load_config(config, [f"model.path={files['flux1']}", "trainable.lora.targets=[x_embedder]",
                                   "subspace.rank=32"])
    assert written.trainable.lora.targets == ("x_embedder",) and written.subspace.rank == 32
    assert load_config(TINY).trainable.lora.targets == FLUX2_LORA_TARGETS and load_config(TINY).subspace.rank == 128
