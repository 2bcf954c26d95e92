"""`asymflow sample` and `asymflow export` end to end on a run directory of the bundled base (no Ray): every SOURCE kind,
PNG metadata, seeds, reference images, size checks, one-line errors, and the README's "Using the result" commands."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestration.cli import main
from tests.orchestration.run_factory import SCALE, add_card_sources, make_run

README = Path(__file__).resolve().parents[2] / "README.md"
STEP = 6
STEP_NAME = f"step-{STEP:08d}"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models run faster single-threaded on the shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("runs")
    run_dir, _ = make_run(root, step=STEP, model_kind="bundled")
    add_card_sources(run_dir, str(root / "data"), samples=20, psnr=20.39)
    return run_dir


@pytest.fixture(scope="module")
def exports(run) -> dict[str, Path]:
    assert main(["export", run]) == 0
    assert main(["export", run, "--merged"]) == 0
    assert main(["export", run, "--merged", "--pipeline"]) == 0
    root = Path(run) / "export"
    return {"adapter": root / STEP_NAME, "merged": root / f"{STEP_NAME}-merged", "pipeline": root / f"{STEP_NAME}-pipeline"}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _sample(source: str, out: Path, *extra: str) -> list[Path]:
    assert main(["sample", str(source), "--prompt", "astronaut", "--out", str(out), *extra]) == 0
    return sorted(out.glob("*.png"))


def test_export_directory_and_model_card(exports) -> None:
    adapter = exports["adapter"]
    assert sorted(p.name for p in adapter.iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "asymflow_base.json", "config.json",
        "diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors"])
    card = (adapter / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: asymflow/assets/tiny_base" in front and "library_name: diffusers" in front
    for fact in (f"| optimizer steps | {STEP} |", "| subspace rank r | 128 |", f"| data scale s | {SCALE:.6g} |",
                 "| final loss | 0.125 |", "LoRA rank 4 alpha 4.0", "| training images | 20 (",
                 "| PSNR vs photos, pixel_finetuned (dB) | 20.39 |", "| SSIM vs photos, pixel_finetuned | 0.500 |"):
        assert fact in card
    assert not list(adapter.parent.glob(".staging-*"))


def test_sample_every_source_kind_with_metadata(run, exports, tmp_path, capsys) -> None:
    from_run = _sample(run, tmp_path / "run", "--num-images", "2", "--seed", "5")
    assert [p.name for p in from_run] == ["astronaut-seed5.png", "astronaut-seed6.png"]
    assert "100%" in capsys.readouterr().err  # the progress bar (diffusers' tqdm over the steps)
    with Image.open(from_run[0]) as im:
        assert im.size == (32, 32)  # the run's sample settings (configs/tiny.yaml: 32×32, 4 steps)
        meta = im.text
    assert meta["prompt"] == "astronaut" and meta["seed"] == "5"
    settings = json.loads(meta["asymflow"])
    assert settings["source_kind"] == "run" and settings["checkpoint_step"] == STEP
    assert (settings["height"], settings["width"], settings["steps"], settings["guidance"]) == (32, 32, 4, 4.0)
    assert settings["scheduler"]["solver"] == "unipc"
    assert not np.array_equal(_pixels(from_run[0]), _pixels(from_run[1]))  # seeds 5 and 6

    # image i uses seed + i: seed 6 alone reproduces the second image; the export computes what the run does
    again = _sample(exports["adapter"], tmp_path / "adapter", "--seed", "6")
    assert json.loads(Image.open(again[0]).text["asymflow"])["source_kind"] == "adapter"
    assert np.array_equal(_pixels(again[0]), _pixels(from_run[1]))
    merged = _sample(str(exports["merged"]), tmp_path / "merged", "--seed", "6")
    assert json.loads(Image.open(merged[0]).text["asymflow"])["source_kind"] == "model"
    # W + (α/r)·B·A rounded once in fp32: within one 8-bit level of the unmerged model
    assert np.abs(_pixels(merged[0]).astype(int) - _pixels(from_run[1]).astype(int)).max() <= 1
    pipeline = _sample(str(exports["pipeline"]), tmp_path / "pipeline", "--seed", "6")  # the run's settings recorded
    assert json.loads(Image.open(pipeline[0]).text["asymflow"])["source_kind"] == "pipeline"
    assert np.array_equal(_pixels(pipeline[0]), _pixels(merged[0]))  # the same merged transformer inside


def test_sample_with_a_reference_image(exports, tmp_path) -> None:
    ref = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((48, 32, 3)) * 255).astype(np.uint8)).save(ref)
    (with_ref,) = _sample(str(exports["adapter"]), tmp_path / "ref", "--image", str(ref))
    (without,) = _sample(str(exports["adapter"]), tmp_path / "plain")
    settings = json.loads(Image.open(with_ref).text["asymflow"])
    assert settings["reference_images"] == [str(ref)]
    assert Image.open(with_ref).size == (32, 48)  # the reference's size (W×H) unless --height/--width say otherwise
    (sized,) = _sample(str(exports["adapter"]), tmp_path / "sized", "--image", str(ref), "--height", "32")
    assert Image.open(sized).size == (32, 32)
    assert not np.array_equal(_pixels(sized), _pixels(without))  # same size, same seed: the reference conditions


def test_bad_requests_fail_with_one_line(run, exports, tmp_path, capsys) -> None:
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    out = str(tmp_path / "none")
    assert "--height 100 is not a positive multiple of 16" in error("sample", run, "--prompt", "x", "--height", "100",
                                                                    "--out", out)
    assert "GiB" in error("sample", run, "--prompt", "x", "--height", "65536", "--width", "65536", "--out", out)
    assert not Path(out).exists()
    assert "is not a run directory" in error("sample", str(tmp_path), "--prompt", "x", "--out", out)
    official = tmp_path / "official"
    official.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(exports["adapter"] / name, official / name)
    assert "pass --base" in error("sample", str(official), "--prompt", "x", "--out", out)
    assert "does not fit this latent base" in error("sample", str(official), "--base", "tiny", "--prompt", "x",
                                                    "--out", out)
    empty = tmp_path / "empty-run"
    (empty / "checkpoints" / "step-00000002").mkdir(parents=True)  # never committed: no COMPLETE marker
    assert "no complete checkpoint" in error("export", str(empty))
    assert "no complete checkpoint" in error("sample", str(empty), "--prompt", "x")
    broken = tmp_path / "broken-run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("export"))
    ema = broken / "checkpoints" / STEP_NAME / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:500])
    assert "is not a readable safetensors file" in error("export", str(broken))
    (broken / "checkpoints" / STEP_NAME / "trainable.safetensors").unlink()  # neither that file nor engine files
    assert "no DeepSpeed engine files" in error("export", str(broken), "--weights", "trainable")
    # the size is checked from config files before any weight is read: the damaged EMA file is never reached
    assert "GiB" in error("sample", str(broken), "--prompt", "x", "--height", "65536", "--width", "65536")
    assert not (broken / "export").exists()  # nothing half-written
    truncated = tmp_path / "truncated"
    shutil.copytree(exports["adapter"], truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert "not a readable safetensors file" in error("sample", str(truncated), "--prompt", "x", "--out", out)


def _block(section: str, language: str) -> str:
    text = README.read_text()
    part = text[text.index(f"## {section}"):]
    part = part[: part.index("\n## ", 3)]
    return re.search(rf"```{language}\n(.*?)```", part, re.S).group(1)


def test_readme_commands(run, exports, tmp_path) -> None:
    """The README's "Using the result" blocks, with the demo's paths replaced by this run's."""
    official = tmp_path / "official"
    official.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(exports["adapter"] / name, official / name)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(photo)
    subs = {"demo-output/runs/demo": run, "step-00000400": STEP_NAME, "path/to/official-adapter": str(official),
            "path/to/FLUX.2-klein-base-9B": "assets/tiny_base", "assets/tiny_base": str(README.parent / "assets/tiny_base"),
            "photo.png": str(photo),
            "samples/": f"{tmp_path / 'samples'}/"}

    def substitute(text: str) -> str:
        for old, new in subs.items():
            text = text.replace(old, new)
        return text

    commands = [line.split("  #")[0].strip() for line in _block("Using the result", "bash").splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 7 and all(c.startswith("asymflow ") for c in commands)
    for command in commands:
        argv = re.findall(r'"[^"]*"|\S+', substitute(command))[1:]
        assert main([a.strip('"') for a in argv]) == 0, command
    written = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))  # same prompt and seed: overwritten
    assert written == ["a-cat-seed0.png", "astronaut-seed0.png", "astronaut-seed1.png"]

    code = substitute(_block("Using the result", "python"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the README's own example)
    assert namespace["image"].size == (128, 128)
