"""`asymflow train --dry-run`: the plan of a run with nothing started, and the memory model checked against the
figures of docs/SCALING.md for the real 9B recipe (built from its config on the meta device)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_nine_b_recipe_matches_the_scaling_model(tmp_path):
    from asymflow.klein import KLEIN_TRANSFORMER_CONFIGS
    from orchestration.config import load_config
    from orchestration.dry_run import (BLOCK_TRANSIENT, activation_bytes_per_sample, count_parameters,
                                       state_bytes_per_rank)

    (tmp_path / "transformer").mkdir()
    config = {"_class_name": "Flux2Transformer2DModel", **KLEIN_TRANSFORMER_CONFIGS["9b"]}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    cfg = load_config(str(REPO / "configs" / "flux2-klein-9b.yaml"), [f"model.path={tmp_path}"])
    p = count_parameters(cfg)
    assert p.total == pytest.approx(9.084e9, rel=1e-3) and p.trainable == pytest.approx(353.4e6, rel=1e-3)
    assert (p.layers, p.width) == (32, 4096)
    # SCALING.md: LoRA on 32 GPUs ≈ 0.82 GB of model states per GPU (tied teacher 80 MB of it)
    assert state_bytes_per_rank(p, 32, gpu=True, teacher="tied") == pytest.approx(0.82e9, rel=0.05)
    # SCALING.md: stored block inputs at 1024² ≈ 1.21 GB per sample (L·T·d·2 B with T = 4096 + 512), plus the
    # measured transient of FLUX.2's largest block (the double block) and the fp32 image algebra: ≈ 2.5 GB
    lora = BLOCK_TRANSIENT["lora"]
    assert p.transient == lora["Flux2TransformerBlock"] > lora["Flux2SingleTransformerBlock"]
    stored = activation_bytes_per_sample(p, 1024, 1024, 512, gpu=True, checkpointing=True)
    assert stored == pytest.approx(1.21e9 + p.transient * 4608 * 4096 * 2 + 20 * 3 * 1024 * 1024 * 4, rel=0.02)
    assert stored == pytest.approx(2.5e9, rel=0.02)


@pytest.mark.integration
def test_dry_run_prints_the_plan_and_starts_nothing(dataset, tmp_path, capsys):
    import ray

    from data_prep.reader import DatasetIndex
    from orchestration.data_plan import steps_per_epoch

    storage = tmp_path / "runs"
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), "--data", dataset, "--storage", str(storage),
                 "--steps", "9", "--dry-run", "--overwrite"]) == 0
    out = capsys.readouterr().out
    per_epoch = steps_per_epoch(DatasetIndex.open(dataset).table, 4)
    assert "batch: global 4 = micro 1 x 2 worker(s) x grad_accum 2" in out
    assert f"{per_epoch} steps per epoch" in out and "-> 5 (2, 4, 6, 8, 9), keep the last 2" in out
    assert "start: pretrained init" in out and "predicted memory per worker" in out
    assert f"path: {dataset}" in out  # the resolved config is printed
    assert not ray.is_initialized() and not storage.exists()
