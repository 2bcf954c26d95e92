"""`asymflow prep lpips`: parity with the lpips package itself (run in its own venv, .venv-lpips, since lpips
imports torchvision and no torchvision loads beside .venv's CPU torch), the default heads lookup, and the error paths."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asymflow.lpips_weights import default_heads_path, vgg16_conv_shapes
from asymflow.perceptual import LPIPS_CHANNELS, LPIPSDistance
from orchestration.cli import main

REPO = Path(__file__).resolve().parents[2]
REF_PY = REPO / ".venv-lpips" / "bin" / "python"
ASYMFLOW = Path(sys.executable).parent / "asymflow"
SIZES = ("64x64", "48x80", "37x50")  # the reference side's image sizes


def _reference_missing() -> str | None:
    if not (REF_PY.parent.parent / ".installed").exists():
        return f"no reference venv at {REF_PY.parent.parent} (`make test` builds it from tests/lpips_reference.txt)"
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The lpips package's own module and distances with a seeded random torchvision VGG16 backbone."""
    reason = _reference_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the lpips parity test must run in CI: {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("lpips-reference")
    run = subprocess.run([str(REF_PY), str(Path(__file__).with_name("lpips_reference_side.py")), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    return {**info, "dir": out, "heads": Path(info["lpips_dir"]) / "weights" / "v0.1" / "vgg.pth"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration  # runs lpips in .venv-lpips (~30-60 s here)
def test_parity_with_the_lpips_package(reference, tmp_path):
    ref = reference["dir"]
    assert reference["torch"].startswith("2.14.1") and reference["torchvision"].startswith("0.29.1")
    assert reference["torch_home"] == []  # pnet_rand=True: lpips/torchvision fetched no VGG weights
    out = tmp_path / "models" / "lpips_vgg.safetensors"
    out.parent.mkdir()
    run = subprocess.run([str(ASYMFLOW), "prep", "lpips", "--vgg16", str(ref / "vgg16.pth"),
                          "--heads", str(reference["heads"]), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout

    # The file is lpips' own module state dict: same keys (so lpips loads it strictly), same tensors bit for bit.
    ours, theirs = load_file(str(out)), torch.load(ref / "lpips_state.pth", weights_only=True)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lpips-vgg-v0.1"
    assert meta["vgg16_sha256"] == _sha256(ref / "vgg16.pth") and meta["heads_sha256"] == _sha256(reference["heads"])
    assert meta["vgg16_source"] == str((ref / "vgg16.pth").resolve()) and meta["heads_source"] == str(reference["heads"].resolve())
    assert not list(out.parent.glob(".*tmp*"))  # the staging file was renamed, not left behind

    # Distances: the spatial maps of lpips.LPIPS(spatial=True), and its scalar (per-layer spatial means summed).
    # For sides that are multiples of 16 every layer's bilinear upsampling factor is an integer, and such an
    # upsampling (align_corners=False, edges clamped) preserves the mean, so the scalar equals our map's mean.
    # Tolerance rtol 1e-5 (~80 float32 ulps): the two sides are different torch builds (2.14.1 vs 2.13.0) whose
    # convolution kernels may round differently in the last bits through 13 layers, and the mean sums in another
    # order (here the maps came out bitwise equal, the scalars within 2e-7).
    dist = LPIPSDistance.from_local_weights(out)
    cases = torch.load(ref / "cases.pth", weights_only=True)
    for size in SIZES:
        a, b = cases[f"{size}.a"], cases[f"{size}.b"]
        with torch.no_grad():
            ours_map = dist(a, b)
        assert ours_map.shape == cases[f"{size}.map"].shape == (2, 1, *map(int, size.split("x")))
        assert cases[f"{size}.map"].mean() > 1e-3  # distinct images: a non-trivial distance to compare
        torch.testing.assert_close(ours_map, cases[f"{size}.map"], rtol=1e-5, atol=1e-9)
        h, w = map(int, size.split("x"))
        if h % 16 == 0 and w % 16 == 0:
            torch.testing.assert_close(ours_map.mean(dim=(2, 3), keepdim=True), cases[f"{size}.scalar"], rtol=1e-5, atol=1e-9)


@pytest.mark.integration  # runs lpips in .venv-lpips (~30-60 s here)
def test_default_heads_are_found_in_an_installed_lpips_without_importing_it(reference, tmp_path, monkeypatch):
    """The lpips package as installed (package + dist-info, copied from the reference venv) on this Python's path:
    the heads are found, and neither lpips nor torchvision (absent here: importing lpips would fail) is imported."""
    site = tmp_path / "site"
    installed = Path(reference["lpips_dir"])
    shutil.copytree(installed, site / "lpips")
    for info in installed.parent.glob("lpips-*.dist-info"):
        shutil.copytree(info, site / info.name)
    monkeypatch.syspath_prepend(str(site))
    assert default_heads_path() == site / "lpips" / "weights" / "v0.1" / "vgg.pth"
    assert "lpips" not in sys.modules and "torchvision" not in sys.modules

    out = tmp_path / "lpips.safetensors"
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([str(ASYMFLOW), "prep", "lpips", "--vgg16", str(reference["dir"] / "vgg16.pth"), "--out", str(out)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["heads_source"] == str(site / "lpips" / "weights" / "v0.1" / "vgg.pth")
    assert torch.equal(load_file(str(out))["lin2.model.1.weight"],
                       torch.load(reference["heads"], map_location="cpu", weights_only=True)["lin2.model.1.weight"])


# ------------------------------------------------------------------- inputs made here (no reference venv needed)


def _vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (c_out, c_in) in vgg16_conv_shapes().items():
        state[f"features.{i}.weight"] = 0.05 * torch.randn(c_out, c_in, 3, 3, generator=g)
        state[f"features.{i}.bias"] = 0.05 * torch.randn(c_out, generator=g)
    return state


def _heads_state(seed: int = 1, channels=LPIPS_CHANNELS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(channels)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lpips-inputs")
    vgg = _vgg16_state()
    save_file(vgg, str(root / "vgg16.safetensors"))
    save_file({**vgg, "features.30.weight": torch.zeros(1)}, str(root / "vgg16_bn.safetensors"))
    save_file({k: v for k, v in vgg.items() if k != "features.28.bias"}, str(root / "no28.safetensors"))
    save_file({**vgg, "features.0.weight": torch.zeros(64, 1, 3, 3)}, str(root / "gray.safetensors"))
    save_file({"conv1.weight": torch.zeros(1)}, str(root / "resnet.safetensors"))
    torch.save(_heads_state(), root / "vgg.pth")
    torch.save(_heads_state(channels=(64, 192, 384, 256, 256)), root / "alex.pth")
    torch.save({k: v for k, v in _heads_state().items() if not k.startswith("lin4")}, root / "four.pth")
    torch.save(torch.nn.Linear(2, 2), root / "module.pth")  # a pickled object: refused by weights_only
    torch.save({"epoch": 3}, root / "notensors.pth")
    (root / "garbage.pth").write_bytes(b"\x00not a checkpoint at all")
    with zipfile.ZipFile(root / "lpips-0.1.4-py3-none-any.whl", "w") as whl:
        whl.write(root / "vgg.pth", "lpips/weights/v0.1/vgg.pth")
    with zipfile.ZipFile(root / "other-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("other/__init__.py", "")
    (root / "dir").mkdir()
    return {p.stem.replace("-", "_").replace(".", "_"): str(p) for p in root.iterdir()} | {"root": str(root)}


def test_safetensors_input_and_wheel_heads(inputs, tmp_path, capsys):
    """A safetensors VGG16 and the heads read straight out of an lpips wheel give the inputs' tensors in the places
    LPIPSDistance reads them; only features.* is taken (a classifier key is ignored)."""
    vgg = load_file(inputs["vgg16"])
    with_classifier = tmp_path / "vgg16-full.pth"
    # torchvision's own vgg16-397923af.pth is in torch's legacy (pre-zip) format, as written here
    torch.save({**vgg, "classifier.6.bias": torch.zeros(1000)}, with_classifier, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(with_classifier)
    out = tmp_path / "w.safetensors"
    assert main(["prep", "lpips", "--vgg16", str(with_classifier), "--heads", inputs["lpips_0_1_4_py3_none_any"], "--out", str(out)]) == 0
    heads = _heads_state()
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["heads_source"].endswith("lpips-0.1.4-py3-none-any.whl!lpips/weights/v0.1/vgg.pth")
    state = LPIPSDistance.from_local_weights(out).state_dict()
    assert torch.equal(state["trunk.features.28.bias"], vgg["features.28.bias"])
    assert torch.equal(state["trunk.features.0.weight"], vgg["features.0.weight"])
    assert all(torch.equal(state[f"lins.{k}.weight"], heads[f"lin{k}.model.1.weight"]) for k in range(5))
    assert "classifier.6.bias" not in load_file(str(out))
    out2 = tmp_path / "s.safetensors"
    assert main(["prep", "lpips", "--vgg16", inputs["vgg16"], "--heads", inputs["vgg"], "--out", str(out2)]) == 0
    assert load_file(str(out2)).keys() == load_file(str(out)).keys()


def test_no_heads_and_no_lpips_installed(inputs, tmp_path, capsys):
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed in this Python")
    assert main(["prep", "lpips", "--vgg16", inputs["vgg16"], "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "no --heads given and no lpips package is installed" in err and "pip download lpips --no-deps" in err


# (extra argv with {placeholders}, text the one error line must contain); --vgg16/--heads/--out default to valid files
ERRORS = [
    (["--vgg16", "{root}/none.pth"], "--vgg16 {root}/none.pth: no such file"),
    (["--vgg16", "{dir}"], "--vgg16 {dir}: not a file"),
    (["--vgg16", "{garbage}"], "--vgg16 {garbage}: not a readable safetensors file or torch state dict"),
    (["--vgg16", "{module}"], "--vgg16 {module}: not a readable safetensors file or torch state dict (Weights only load failed"),
    (["--vgg16", "{notensors}"], "--vgg16 {notensors}: not a state dict"),
    (["--vgg16", "{resnet}"], "{resnet}: not a torchvision VGG16 state dict (it has no features.* keys at all"),
    (["--vgg16", "{no28}"], "{no28}: not a torchvision VGG16 state dict: missing ['features.28.bias']"),
    (["--vgg16", "{vgg16_bn}"], "another VGG depth?): missing [], unexpected ['features.30.weight']"),
    (["--vgg16", "{gray}"], "{gray}: features.0.weight has shape (64, 1, 3, 3), VGG16 has (64, 3, 3, 3)"),
    (["--heads", "{alex}"], "{alex}: lin1.model.1.weight has shape (1, 192, 1, 1), the VGG heads have (1, 128, 1, 1)"),
    (["--heads", "{four}"], "{four}: not the lpips package's VGG heads (weights/v0.1/vgg.pth): missing lin4.model.1.weight"),
    (["--heads", "{vgg16}"], "not the lpips package's VGG heads"),
    (["--heads", "{other_1_0_py3_none_any}"], "the archive has no lpips/weights/v0.1/vgg.pth"),
    (["--heads", "{root}/none.whl"], "--heads {root}/none.whl: no such file"),
    (["--out", "{dir}"], "--out {dir}: is a directory"),
    (["--out", "{root}/nodir/x.safetensors"], "--out {root}/nodir/x.safetensors: directory {root}/nodir does not exist"),
]


@pytest.mark.parametrize(("extra", "text"), ERRORS, ids=[e[1][:50] for e in ERRORS])
def test_errors_are_one_line_exit_2(extra, text, inputs, capsys, monkeypatch):
    monkeypatch.delenv("ASYMFLOW_DEBUG", raising=False)
    given = dict(zip(extra[::2], extra[1::2]))
    args = {"--vgg16": "{vgg16}", "--heads": "{vgg}", "--out": "{root}/out.safetensors", **given}
    argv = ["prep", "lpips"] + [s.format(**inputs) for kv in args.items() for s in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: prep lpips: "), err
    assert text.format(**inputs) in lines[0], err
    assert not Path(inputs["root"], "out.safetensors").exists()


def test_help_says_where_the_inputs_come_from(capsys):
    assert main(["prep", "lpips", "--help"]) == 0
    text = capsys.readouterr().out
    assert "vgg16-397923af.pth" in text and "pip download lpips --no-deps" in text and "weights/v0.1/vgg.pth" in text
