"""`asymflow sample --sampler adaptive --tol T`: the adaptive sampler from the CLI, its NFE in the PNG metadata, and
one-line errors for flags that do not belong together."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestration.cli import main
from tests.orchestration.run_factory import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster single-threaded on the shared 2-core machine
    yield make_run(tmp_path_factory.mktemp("runs"), step=2)[0]
    torch.set_num_threads(threads)


def _settings(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["asymflow"])


def test_adaptive_sampler_from_the_cli_records_its_nfe(run, tmp_path) -> None:
    out = tmp_path / "adaptive"
    args = ["sample", run, "--prompt", "astronaut", "--height", "32", "--width", "32", "--out", str(out),
            "--sampler", "adaptive", "--tol", "0.1", "--max-nfe", "6", "--num-images", "2"]
    assert main(args) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        s = _settings(png)
        assert s["sampler"] == "adaptive" and s["tol"] == 0.1 and s["max_nfe"] == 6
        assert 2 <= s["nfe"] <= 6  # the start, at least one step, never beyond the budget
    fixed = tmp_path / "fixed"
    assert main(["sample", run, "--prompt", "astronaut", "--height", "32", "--width", "32", "--steps", "3",
                 "--out", str(fixed)]) == 0
    s = _settings(next(fixed.glob("*.png")))
    assert s["sampler"] == "fixed" and s["nfe"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--tol", "0.1"], "--sampler adaptive"),
    (["--sampler", "adaptive", "--tol", "0"], "--tol 0.0 must be > 0"),
    (["--sampler", "adaptive", "--max-nfe", "1"], "--max-nfe 1 must be at least 2"),
])
def test_sampler_flags_that_do_not_fit_fail_with_one_line(run, tmp_path, capsys, flags, message) -> None:
    assert main(["sample", run, "--prompt", "x", "--height", "32", "--width", "32", "--out", str(tmp_path),
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.glob("*.png"))
