"""The rules of the `asymflow serve` page without a browser: sizes, prompts, seeds, reference uploads, the PNG's
metadata, the comparison panel, the CLI's refusals and its no-authentication warning."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from orchestration.serve import is_loopback
from orchestration.serve_images import compare_panel, png_with_metadata, zoomed_crop
from orchestration.serve_inputs import (
    CUSTOM,
    MAX_PROMPT_CHARS,
    InputError,
    check_prompt,
    check_size,
    default_max_pixels,
    load_reference,
    pick_seed,
    resolve_size,
    size_presets,
)

REPO = Path(__file__).resolve().parents[2]


def test_presets_are_multiples_of_16_near_the_training_area() -> None:
    presets = size_presets(128)
    assert list(presets.values()) == [(128, 128), (144, 112), (112, 144), (176, 96), (96, 176)]
    for w, h in size_presets(1024).values():
        assert w % 16 == 0 and h % 16 == 0 and abs(w * h / 1024**2 - 1) < 0.08
    assert resolve_size(next(iter(presets)), None, None, 128, default_max_pixels(128)) == (128, 128)
    assert resolve_size(CUSTOM, 256, 160, 128, default_max_pixels(128)) == (256, 160)


@pytest.mark.parametrize("size, message", [((100, 128), "not a multiple of 16"), ((48, 128), "too small"),
                                           ((4096, 4096), "too large"), ((None, 128), "Enter a width")])
def test_bad_sizes_are_refused_with_a_reason(size, message) -> None:
    with pytest.raises(InputError, match=message):
        check_size(*size, max_pixels=default_max_pixels(128))


def test_prompts() -> None:
    assert check_prompt("  moon ") == "moon"
    assert check_prompt("") == "" and check_prompt(None) == ""  # empty allowed: an unconditional sample
    assert len(check_prompt("x" * MAX_PROMPT_CHARS)) == MAX_PROMPT_CHARS
    with pytest.raises(InputError, match="50,000 characters; the limit is 10,000"):
        check_prompt("x" * 50_000)


def test_seeds() -> None:
    assert pick_seed(False, 7) == 7
    assert 0 <= pick_seed(True, None) < 2**32
    with pytest.raises(InputError):
        pick_seed(False, -1)


def test_reference_uploads(tmp_path) -> None:
    from data_prep.corpus import bomb_png

    good, text, bomb, tiny, cut = (tmp_path / n for n in ("a.png", "b.png", "c.png", "d.png", "e.png"))
    Image.new("RGBA", (40, 30), (1, 2, 3, 128)).save(good)
    text.write_text("not an image")
    bomb.write_bytes(bomb_png(20_000, 20_000))
    Image.new("RGB", (8, 8)).save(tiny)
    cut.write_bytes(good.read_bytes()[:60])
    im = load_reference(good)
    assert im.mode == "RGB" and im.size == (40, 30)
    assert load_reference(None) is None and load_reference("") is None
    with pytest.raises(InputError, match="not an image"):
        load_reference(text)
    with pytest.raises(InputError, match="decompression bomb"):
        load_reference(bomb)
    with pytest.raises(InputError, match="at least 16×16"):
        load_reference(tiny)
    with pytest.raises(InputError, match="could not be decoded|not an image"):
        load_reference(cut)


def test_png_metadata_round_trip_and_panel(tmp_path) -> None:
    settings = {"prompt": "ünïcode moon", "negative_prompt": "", "width": 64, "height": 48, "seed": 3}
    path = png_with_metadata(Image.new("RGB", (64, 48), "red"), tmp_path / "x" / "a.png", settings)
    with Image.open(path) as im:
        assert im.size == (64, 48) and im.text["prompt"] == "ünïcode moon"
        assert json.loads(im.text["asymflow"]) == settings and im.text["seed"] == "3"
    a = Image.new("RGB", (64, 48), "red")
    a.putpixel((32, 24), (0, 0, 255))
    zoom = zoomed_crop(a)
    assert zoom.size == (64, 48) and zoom.getpixel((32, 24)) == (0, 0, 255)  # 4× around the centre pixel
    panel = compare_panel(a, Image.new("RGB", (64, 48), "green"))
    assert panel.size[0] == 2 * 64 + 4 and panel.size[1] > 2 * 48


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", "serve", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120)


def test_cli_warns_without_authentication_and_refuses_bad_arguments() -> None:
    out = run_cli("no-such-source", "--host", "0.0.0.0", "--port", "7999")
    assert out.returncode == 2 and "NO authentication" in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: no-such-source does not exist")
    assert "Traceback" not in out.stderr
    for args, message in ((("bundled", "--port", "0"), "error: --port must be 1-65535"),
                          (("bundled", "--max-pixels", "10"), "error: --max-pixels must be at least")):
        out = run_cli(*args)
        assert out.returncode == 2 and out.stderr.strip() == out.stderr.strip().splitlines()[0]
        assert out.stderr.startswith(message), out.stderr


def test_session_directories_cannot_leave_the_output_dir() -> None:
    from orchestration.serve_page import session_dir

    assert session_dir("k3Jd_x-9") == "k3Jd_x-9"
    for hostile in ("../../etc", "/abs", "a/b", "", None, "x" * 65):
        name = session_dir(hostile)
        assert re.fullmatch(r"[0-9a-f]{16}", name), name
