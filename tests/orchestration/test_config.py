"""Run config: YAML + dotted overrides, errors that name the field, config hash, derived DeepSpeed config."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.config import ConfigError, apply_overrides, build_config, load_config
from orchestration.preflight import check_inputs
from orchestration.deepspeed_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.mark.parametrize("name", ["tiny", "flux2-klein-4b", "flux2-klein-9b"])
def test_shipped_configs_validate(name):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), ["data.path=/nowhere"])
    assert cfg.train.micro_batch * cfg.train.workers * cfg.train.accum == cfg.train.global_batch


def test_nine_b_config_mirrors_the_reference_recipe():
    cfg = load_config(str(REPO / "configs" / "flux2-klein-9b.yaml"))
    t = cfg.train
    assert (t.global_batch, t.micro_batch, t.workers, t.steps) == (256, 8, 32, 15_000)
    assert (t.lr, t.betas, t.warmup_steps, t.grad_clip, t.grad_clip_from_step) == (1e-4, (0.9, 0.95), 100, 200.0, 100)
    assert t.lr_multipliers == {"proj_out": 10.0}
    assert (cfg.trainable.lora.rank, cfg.trainable.lora.alpha, cfg.trainable.lora.dropout) == (256, 256.0, 0.05)
    assert (cfg.ema.start_iter, cfg.ema.gamma) == (100, 7.0)


def test_overrides_coerce_types_and_create_sections():
    cfg = load_config(TINY, ["train.lr=1e-4", "train.activation_checkpointing=false", "train.betas=[0.8, 0.9]",
                             "train.grad_clip=null", "data.path=/x"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.activation_checkpointing is False
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.grad_clip is None
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize(
    ("override", "field", "detail"),
    [
        ("train.bogus=1", "train.bogus", "unknown key"),
        ("train.lrr=1", "train.lrr", "did you mean `train.lr`?"),
        ("trian.lr=1", "trian", "did you mean `train`?"),
        ("bogus.key=1", "bogus", "unknown key"),
        ("train.lr=fast", "train.lr", "valid number"),
        ("train.global_batch=5", "train.global_batch=5", "1 × 2 = 2"),
        ("train.grad_accum=3", "train.global_batch=4", "1 × 2 × 3 = 6"),
        ("sample.height=100", "sample.height=100", "multiple of 16"),
        ("checkpoint.keep=1", "checkpoint.keep", "greater than or equal to 2"),
        ("objective.patch_size=8", "objective.patch_size=8", "16"),
    ],
)
def test_bad_values_name_the_field(override, field, detail):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert field in str(info.value) and detail in str(info.value), str(info.value)


def test_config_hash_ignores_identity_and_world_size_but_not_the_recipe():
    base = load_config(TINY)
    same = load_config(TINY, ["run.name=other", "train.workers=1", "train.steps=99", "log.every=5"])
    other = load_config(TINY, ["train.lr=0.5"])
    assert base.config_hash() == same.config_hash() != other.config_hash()


def test_deepspeed_config_is_derived():
    cfg = load_config(TINY)
    ds = build_deepspeed_config(cfg.train, world_size=2, use_gpu=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 1, 2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    assert build_deepspeed_config(cfg.train, world_size=1, use_gpu=True)["gradient_accumulation_steps"] == 4
    assert build_deepspeed_config(cfg.train, world_size=1, use_gpu=True)["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="3 × 1"):
        build_deepspeed_config(cfg.train, world_size=3, use_gpu=False)


def test_gpu_deepspeed_config_reduces_gradients_in_fp32():
    """bf16 weights and activations on GPU, but the trainable set's gradients are reduce-scattered in fp32
    (spec §3.4a): DeepSpeed's own config parser reads the dtype it will communicate in."""
    import torch
    from deepspeed.runtime.config import get_communication_data_type

    cfg = load_config(TINY)
    for use_gpu in (True, False):
        ds = build_deepspeed_config(cfg.train, world_size=2, use_gpu=use_gpu)
        assert ds["bf16"]["enabled"] is use_gpu
        assert get_communication_data_type(ds) is torch.float32


def test_missing_dataset_and_wrong_subspace_are_reported_before_start(tmp_path):
    import torch

    from asymflow.subspace import SubspaceArtifact

    cfg = build_config({**_raw(), "data": {"path": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match=r"^data\.path"):
        check_inputs(cfg)

    data = _tiny_dataset(tmp_path / "data")
    cfg = build_config({**_raw(), "data": {"path": data}})
    SubspaceArtifact(torch.linalg.qr(torch.randn(3 * 8 * 8, 128))[0], 1.0, patch_size=8).save(f"{data}/subspace.safetensors")
    with pytest.raises(ConfigError, match=r"^subspace\.path.*patch"):
        check_inputs(cfg)
    shard = next(Path(data).glob("*.tar"))
    shard.unlink()
    with pytest.raises(ConfigError, match=r"^data\.path.*missing"):
        check_inputs(cfg)


def _raw() -> dict:
    from orchestration.config import read_yaml

    return read_yaml(TINY)


def _tiny_dataset(out: Path) -> str:
    """Shards + cache of three generated images (no subspace: the test writes a wrong one)."""
    import numpy as np
    from PIL import Image

    from asymflow.components import BaseModelConfig
    from data_prep.cache import build_cache
    from data_prep.images import ImageSpec
    from data_prep.shards import BuildConfig, build_shards

    images = out.parent / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"noise {i}")
    report = build_shards(BuildConfig(input=str(images), output=str(out), image=ImageSpec(buckets=((32, 32),)),
                                      shard_size=2), workers=1, show_progress=False)
    assert report.exit_code == 0, report.message
    build_cache(str(out), BaseModelConfig(kind="tiny", seed=0), batch_size=2, progress=False)
    return str(out)


def test_cli_refuses_a_bad_config_before_starting_ray(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "train", TINY, "--storage", str(tmp_path), "--set", "train.lr=-1"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "greater than 0" in proc.stderr
    assert "ray" not in proc.stderr.lower() and not any(tmp_path.iterdir())


def test_teacher_kind_follows_the_trainable_mode():
    assert load_config(TINY).trainable.teacher_kind() == "tied"  # LoRA: no second copy of the base
    assert load_config(TINY, ["trainable.mode=full"]).trainable.teacher_kind() == "copy"
    assert load_config(TINY, ["trainable.teacher=copy"]).trainable.teacher_kind() == "copy"
    with pytest.raises(ConfigError, match="trainable.teacher 'tied' needs trainable.mode 'lora'"):
        load_config(TINY, ["trainable.mode=full", "trainable.teacher=tied"])


def test_in_training_sampling_that_could_never_run_is_refused():
    """GPU runs: CPU rendering of a klein-sized base is refused at config time; a sampling GPU the cluster cannot
    spare beside the training workers is refused at launch (it would wait forever and the run never finish)."""
    with pytest.raises(ConfigError, match="renders on the CPU"):
        load_config(TINY, ["train.use_gpu=true", "sample.every=2", "checkpoint.every=2"])
    cfg = load_config(TINY, ["train.use_gpu=true", "train.workers=2", "sample.every=2", "checkpoint.every=2",
                             "sample.num_gpus=1"])
    assert "3 GPUs in all, the cluster has 2" in cfg.sampling_gpu_shortfall(2.0)
    assert cfg.sampling_gpu_shortfall(3.0) is None
    assert load_config(TINY, ["sample.every=2", "checkpoint.every=2"]).sampling_gpu_shortfall(0.0) is None  # CPU run
