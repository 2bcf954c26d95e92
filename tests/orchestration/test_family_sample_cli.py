"""`asymflow sample` for FLUX.1, SD3, Qwen-Image and Sana sources (issue 15): an exported family adapter with --base
<the family's diffusers pipeline directory>, and a saved AsymFlowFamilyPipeline directory. The PNGs are the pipeline's
images for the same seeds (pixel for pixel), sampled with the family's defaults, recorded in the PNG metadata; bad
requests are one `error:` line, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asymflow.families import get_family
from orchestration.cli import main
from tests.asymflow.family_pipelines import FAMILIES, export_trained_adapter, image_side, save_tiny_base

PROMPT, NEGATIVE, STEPS = "a red cat", "blurry", 2


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models run faster single-threaded on the shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def sources(request, tmp_path_factory) -> dict:
    """The family's tiny diffusers base, a trained adapter exported for it, the merged pipeline and the merged pixel
    model alone (save_pretrained) saved."""
    from diffusers import DiffusionPipeline

    from asymflow.families.adapter import load_family_adapter
    from asymflow.families.load import load_pipeline_components, text_component_names
    from asymflow.families.pipeline import AsymFlowFamilyPipeline

    name = request.param
    root = tmp_path_factory.mktemp(name)
    base = save_tiny_base(name, root / "base")
    latent = DiffusionPipeline.from_pretrained(base).transformer  # the family's own pipeline class loads the base
    adapter = export_trained_adapter(name, latent, root / "adapter")
    text = load_pipeline_components(base, text_component_names(name))
    merged = AsymFlowFamilyPipeline(load_family_adapter(adapter, base / "transformer", merge=True), **text)
    merged.save_pretrained(root / "pipeline")
    merged.transformer.save_pretrained(root / "model")
    return {"name": name, "root": root, "base": base, "adapter": adapter, "pipeline": root / "pipeline",
            "model": root / "model", "text": text}


def sample(name: str, source: Path, out: Path, *extra: str) -> list[Path]:
    side = str(image_side(name))
    argv = ["sample", str(source), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--height", side, "--width",
            side, "--steps", str(STEPS), "--out", str(out), "--device", "cpu", *extra]
    assert main(argv) == 0
    return sorted(out.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def expected_pixels(pipe, name: str, seed: int) -> np.ndarray:
    """The pipeline's image for the seed as diffusers' numpy_to_pil makes it: (x·255).round() as uint8."""
    side = image_side(name)
    images = pipe(PROMPT, negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (images[0] * 255).round().astype("uint8")


def test_adapter_with_base_writes_the_pipelines_images(sources, tmp_path) -> None:
    from asymflow.families.adapter import load_family_adapter
    from asymflow.families.pipeline import AsymFlowFamilyPipeline

    name = sources["name"]
    written = sample(name, sources["adapter"], tmp_path, "--base", str(sources["base"]), "--seed", "3",
                     "--num-images", "2")
    assert [p.name for p in written] == ["a-red-cat-seed3.png", "a-red-cat-seed4.png"]
    pipe = AsymFlowFamilyPipeline(load_family_adapter(sources["adapter"], sources["base"] / "transformer"),
                                  **sources["text"])
    for seed, path in zip((3, 4), written):
        assert np.array_equal(pixels(path), expected_pixels(pipe, name, seed))
    with Image.open(written[0]) as im:
        meta = json.loads(im.text["asymflow"])
        assert im.text["prompt"] == PROMPT and im.text["negative_prompt"] == NEGATIVE and im.text["seed"] == "3"
    defaults = get_family(name).sampler
    assert meta["family"] == name and meta["source_kind"] == "adapter" and meta["steps"] == STEPS
    assert meta["guidance"] == defaults.cfg_scale and meta["cfg_renorm"] == (name == "qwen_image")
    assert meta["embedded_guidance"] == (3.5 if name == "flux1" else None)  # the tiny FLUX.1 is guidance-distilled
    assert meta["sigma_grid"] == defaults.grid and meta["nfe"] == STEPS and meta["integrator"] == "euler"


def test_saved_pipeline_complete_model_and_flags(sources, tmp_path) -> None:
    """A saved family pipeline, and a complete pixel model with --base, sample alike; --guidance (true CFG) and
    --embedded-guidance reach the pipeline."""
    from asymflow.families.pipeline import AsymFlowFamilyPipeline

    name = sources["name"]
    pipe = AsymFlowFamilyPipeline.from_pretrained(sources["pipeline"])
    (written,) = sample(name, sources["pipeline"], tmp_path)
    assert np.array_equal(pixels(written), expected_pixels(pipe, name, 0))
    model = get_family(name).pixel_class().from_pretrained(sources["model"])
    (from_model,) = sample(name, sources["model"], tmp_path / "m", "--base", str(sources["base"]))
    from_model_pipe = AsymFlowFamilyPipeline(model, **sources["text"])
    assert np.array_equal(pixels(from_model), expected_pixels(from_model_pipe, name, 0))
    with Image.open(from_model) as im:
        assert json.loads(im.text["asymflow"])["source_kind"] == "model"
    flag = ("--embedded-guidance", "1.5") if name == "flux1" else ("--guidance", "1")
    (guided,) = sample(name, sources["pipeline"], tmp_path / "g", *flag)
    assert not np.array_equal(pixels(guided), pixels(written))
    with Image.open(guided) as im:
        meta = json.loads(im.text["asymflow"])
    assert (meta["embedded_guidance"], meta["guidance"]) == ((1.5, 1.0) if name == "flux1" else (None, 1.0))


def _error(capsys, *argv: str) -> str:
    assert main(["sample", *argv, "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_family_requests_are_one_error_line(sources, tmp_path, capsys) -> None:
    """Checked before any model is loaded: a missing or wrong --base, a latent pipeline as SOURCE, a size that is not
    a multiple of the family's pixel patch, and FLUX.2-only flags."""
    name, base, adapter = sources["name"], str(sources["base"]), str(sources["adapter"])
    title = get_family(name).title
    assert "pass --base" in _error(capsys, adapter)
    assert f"{base} is a latent {title} diffusers pipeline, not an AsymFlow one" in _error(capsys, base)
    assert f"is a latent {title} transformer, not an AsymFlow pixel model" in _error(capsys, f"{base}/transformer",
                                                                                    "--base", base)
    other = "sana" if name != "sana" else "flux1"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(
        json.dumps({"_class_name": get_family(other).pipeline_classes[0]}))
    assert (f"--base {tmp_path / 'other'} holds a model of family {other}, but {adapter} is a {name} ({title}) model"
            in _error(capsys, adapter, "--base", str(tmp_path / "other")))
    pipeline, side = str(sources["pipeline"]), image_side(name)
    if get_family(name).pixel_patch == 32:  # a multiple of 16 (FLUX.2's check passes) but not of Sana's patch
        assert "--height 80 is not a multiple of 32" in _error(capsys, pipeline, "--height", "80")
    Image.new("RGB", (side, side)).save(tmp_path / "ref.png")
    assert "reference images are FLUX.2 klein conditioning" in _error(capsys, pipeline, "--image",
                                                                      str(tmp_path / "ref.png"))
    assert "--sampler adaptive is FLUX.2's" in _error(capsys, pipeline, "--sampler", "adaptive")
    if name != "flux1":
        assert "has no guidance embedding" in _error(capsys, pipeline, "--embedded-guidance", "2")


def test_serve_refuses_a_family_source_in_one_line(sources) -> None:
    from orchestration.serve_model import load_backend

    with pytest.raises(ValueError, match=r"asymflow serve runs FLUX.2 models only for now: use `asymflow sample"):
        load_backend(str(sources["pipeline"]))
