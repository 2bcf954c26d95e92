"""`make demo` in reduced form: the whole pipeline runs, with one SIGTERM preemption, and its artifacts are sound."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_pipeline_reduced(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.demo", "--output", str(out), "--steps", "6", "--preempt-at", "3",
         "--sample-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in proc.stdout  # the demo says plainly what the images are

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["preemption"] is not None and summary["preemption"]["step"] >= 3
    assert summary["preemptions"] >= 1
    assert summary["steps_lost_to_preemption"] == 0  # SIGTERM: checkpoint at the agreed step boundary
    assert set(summary["wall_seconds"]) >= {"prep_shards", "prep_cache", "prep_subspace", "train", "export", "samples"}

    with Image.open(out / "samples.png") as im:
        im.load()
        assert im.size[0] == 2 * 128  # init | trained, 128 px each
    with Image.open(out / "loss.png") as im:
        im.load()
    logged = [json.loads(line)["step"] for line in (out / "runs/demo/metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == list(range(1, 7))

    from asymflow.export import load_adapter
    from asymflow.tiny import build_tiny_transformer

    model = load_adapter(out / "adapter", build_tiny_transformer(0))
    assert type(model).__name__ == "AsymFlux2Transformer2DModel"
