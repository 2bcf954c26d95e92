"""`asymflow serve` in a real headless Chromium (OS package, driven by Playwright): generate, download, reference upload,
bad input, cancel and two clicks at once, against the real Gradio server on the bundled base."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".cache" / "screenshots" / "serve"  # ignored; kept after the run for a look
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STATUS = "#status"
CLEAR_REFERENCE = "#reference button[aria-label='Clear']"

pytestmark = pytest.mark.integration

if not os.path.exists(CHROMIUM):
    # `make test` installs the OS package first and says so when it cannot; never a silent pass.
    pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (make test does it)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install 'asymflow[serve]' (make test does it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`asymflow serve bundled --compare-latent` on a free loopback port; yields (url, log path, output dir)."""
    tmp = tmp_path_factory.mktemp("serve")
    port, log_path, out_dir = free_port(), tmp / "server.log", tmp / "images"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "bundled", "--port", str(port),
                                 "--compare-latent", "--output-dir", str(out_dir)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "open http://" not in log_path.read_text():
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server not up after 180 s:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", log_path, out_dir
    finally:
        proc.terminate()  # only the server this fixture started, by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab on the page; any request to a non-loopback address fails the test (the page must be self-contained)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    outside: list[str] = []

    def guard(route):
        url = route.request.url
        if re.match(r"^(https?|wss?)://(127\.0\.0\.1|localhost)[:/]", url) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", guard)
    tab = context.new_page()
    open_page(tab, server[0])
    yield tab
    context.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"


def open_page(tab, url: str) -> None:
    tab.goto(url)
    tab.wait_for_selector("#generate button, button#generate", timeout=60_000)
    # Record every text the status line shows, so a fast generation's "step i/N" cannot be missed between polls.
    tab.evaluate("""() => { window.__statuses = [];
        const el = document.querySelector('#status');
        new MutationObserver(() => window.__statuses.push(el.innerText)).observe(el,
            {subtree: true, childList: true, characterData: true}); }""")


def status(tab) -> str:
    return tab.inner_text(STATUS)


def wait_status(tab, pattern: str, timeout_s: float = 90, previous: str | None = None) -> str:
    """Wait until the status line matches `pattern` (a regex) and differs from `previous`; returns it."""
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, text := status(tab)) or text == previous:
        assert time.monotonic() < deadline, f"status never matched {pattern!r}; it says {text!r}"
        time.sleep(0.2)
    return text


def set_steps(tab, steps: int) -> None:
    tab.fill("#steps input[type=number]", str(steps))
    tab.press("#steps input[type=number]", "Enter")


def upload(tab, path: Path) -> None:
    """Upload into the reference field, first removing a file already there (the drop zone is gone while one is)."""
    clear = tab.locator(CLEAR_REFERENCE)
    if clear.count():
        clear.first.click()
        tab.wait_for_selector("#reference input[type=file]", state="attached")
    tab.set_input_files("#reference input[type=file]", str(path))


def generate(tab, prompt: str, steps: int = 6) -> str:
    tab.fill("#prompt textarea", prompt)
    set_steps(tab, steps)
    tab.evaluate("() => { window.__statuses = []; }")
    before = status(tab)
    tab.click("#generate")
    return wait_status(tab, r"^(Done|Error)", previous=before)  # consecutive outcomes in these tests all differ


def test_generate_download_and_metadata(page, server, tmp_path) -> None:
    """Prompt + 4:3 preset + Generate → live "step i/N", the preview, the comparison, a PNG of 144×112 whose text
    chunks hold the prompt and every setting, the seed shown after generation, one history entry."""
    page.fill("#negative textarea", "blurry")
    page.get_by_label("4:3 ·").check()
    done = generate(page, "astronaut", steps=12)
    assert done.startswith("Done: 144×112, 12 steps"), done
    seen = page.evaluate("() => window.__statuses")
    assert any(re.search(r"step \d+/12", s) for s in seen), f"no live step progress among {seen}"
    seed = int(re.search(r"seed (\d+)", done).group(1))
    assert int(page.input_value("#seed input")) == seed  # the random seed is shown in the seed field afterwards
    assert page.locator("#result img").count() == 1
    assert page.locator("#comparison img").count() == 1
    assert page.locator("#history img").count() == 1

    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    with Image.open(saved) as im:
        assert im.format == "PNG" and im.size == (144, 112)
        meta = dict(im.text)
    params = json.loads(meta["asymflow"])
    assert meta["prompt"] == "astronaut" and meta["negative_prompt"] == "blurry"
    assert params["width"] == 144 and params["height"] == 112 and params["steps"] == 12
    assert params["seed"] == seed and params["guidance"] == 4.0 and params["source"] == "bundled"
    page.screenshot(path=str(SCREENSHOTS / "generated.png"), full_page=True)


def test_reference_upload_and_bad_input(page, server, tmp_path) -> None:
    """A reference image is accepted; a non-image, a decompression bomb, a 50 000-character prompt, a size that is not
    a multiple of 16 and one too large are refused with a message, and the server still generates afterwards."""
    from data_prep.corpus import bomb_png

    good, fake, bomb = tmp_path / "ref.png", tmp_path / "notes.png", tmp_path / "bomb.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(good)
    fake.write_text("this is not an image")
    bomb.write_bytes(bomb_png(20_000, 20_000))

    upload(page, fake)
    assert "notes.png is not an image" in wait_status(page, "not an image")
    upload(page, bomb)
    assert "decompression bomb" in wait_status(page, "decompression bomb")
    page.screenshot(path=str(SCREENSHOTS / "error_bomb.png"), full_page=True)
    upload(page, good)
    accepted = wait_status(page, "accepted")
    assert accepted == "Reference image 96×64 accepted.", accepted  # no "not used" note: the model conditions on it
    assert page.locator("#reference-preview img").count() == 1

    text = generate(page, "x" * 50_000)
    assert "50,000 characters; the limit is 10,000" in text, text
    page.screenshot(path=str(SCREENSHOTS / "error_long_prompt.png"), full_page=True)

    page.get_by_label("custom", exact=True).check()
    page.fill("#width input", "100")
    page.fill("#height input", "128")
    text = generate(page, "moon")
    assert "100×128 is not a multiple of 16" in text, text
    page.fill("#width input", "4096")
    page.fill("#height input", "4096")
    text = generate(page, "moon")
    assert "too large for this server" in text, text
    page.screenshot(path=str(SCREENSHOTS / "error_size.png"), full_page=True)

    page.fill("#width input", "160")
    page.fill("#height input", "96")
    text = generate(page, "")  # empty prompt: allowed, an unconditional sample
    assert text.startswith("Done: 160×96") and "Empty prompt: unconditional" in text, text
    assert "not used" not in text, text
    with page.expect_download() as info:
        page.click("#download")
    info.value.save_as(tmp_path / "with_reference.png")
    with Image.open(tmp_path / "with_reference.png") as im:
        params = json.loads(im.text["asymflow"])
    assert params["reference_image"] is True and params["prompt"] == "" and (params["width"], params["height"]) == (
        160, 96)
    page.screenshot(path=str(SCREENSHOTS / "after_errors.png"), full_page=True)


def test_adaptive_sampler_offered_when_the_pipeline_has_it(page) -> None:
    """The adaptive sampler (asymflow.adaptive) is on the page exactly when the pipeline takes `sampler=`; it runs and
    the page reports the network evaluations it used."""
    import inspect

    from asymflow.pipeline import AsymFlux2KleinPipeline

    offered = page.locator("#sampler").is_visible()
    assert offered == ("sampler" in inspect.signature(AsymFlux2KleinPipeline.__call__).parameters)
    if offered:
        page.get_by_label("adaptive", exact=True).check()
        text = generate(page, "moon")
        assert re.match(r"Done: 128×128, adaptive sampler, seed \d+, [\d.]+ s, \d+ network evaluations", text), text
        assert any("model evaluation" in s for s in page.evaluate("() => window.__statuses"))


def test_cancel_and_two_clicks_are_queued(browser, server) -> None:
    """Cancel stops a long generation at a step; generations started from two tabs at once run one after the other
    (server log: no overlap) and both finish."""
    url, log_path, _ = server
    a, b = browser.new_page(), browser.new_page()
    for tab in (a, b):
        open_page(tab, url)

    a.fill("#prompt textarea", "clock")
    set_steps(a, 100)
    a.get_by_label("16:9 ·").check()
    a.click("#generate")
    wait_status(a, r"step \d+/100")
    a.click("#cancel")
    cancelled = wait_status(a, r"^Cancelled")
    assert re.search(r"Cancelled at step \d+/100", cancelled), cancelled
    deadline = time.monotonic() + 30  # the sampler stops at its next step, well before its 100 steps are done
    while "asymflow serve: cancelled: GenerationCancelled" not in log_path.read_text():
        assert time.monotonic() < deadline, f"the cancelled generation kept running:\n{log_path.read_text()}"
        time.sleep(0.2)

    for tab, prompt in ((a, "coins"), (b, "retina")):
        tab.fill("#prompt textarea", prompt)
        set_steps(tab, 20)
    before = log_path.read_text().count("asymflow serve: end")
    a.click("#generate")
    b.click("#generate")
    for tab in (a, b):
        assert wait_status(tab, r"^(Done|Error)", 120).startswith("Done"), status(tab)
    b.screenshot(path=str(SCREENSHOTS / "second_tab.png"), full_page=True)

    assert log_path.read_text().count("asymflow serve: end") == before + 2
    starts_ends = [(float(t), kind) for kind, t in re.findall(r"asymflow serve: (start|end) \S+ seed \d+ at ([\d.]+)",
                                                            log_path.read_text())]
    running = 0
    for _, kind in sorted(starts_ends):
        running += 1 if kind == "start" else -1
        assert running <= 1, f"two generations ran at once: {starts_ends}"
    for tab in (a, b):
        tab.close()
