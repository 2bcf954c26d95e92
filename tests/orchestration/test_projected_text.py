"""A projected text cache (`prep cache --text-form projected`) through the trainer's path: the loader's batches, the
worker's step call and the driver's preflight, against a raw cache of the same samples built by the same bf16 model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from asymflow.components import BaseModelConfig
from orchestration.config import ConfigError, load_config

from .multinode_helpers import free_ports, join_gloo_group

REPO = Path(__file__).resolve().parents[2]
BF16_MODEL = BaseModelConfig(kind="tiny", seed=0, dtype="bfloat16")  # the recipe's dtype: the projection is exact


@pytest.fixture(scope="module")
def caches(dataset, tmp_path_factory) -> dict[str, str]:
    """The session dataset's shards and subspace with a raw and a projected text cache of the bf16 tiny model."""
    from data_prep.cache import build_cache

    out = {}
    for form in ("raw", "projected"):
        data = str(tmp_path_factory.mktemp(form) / "data")
        shutil.copytree(dataset, data)
        build_cache(data, BF16_MODEL, batch_size=4, overwrite=True, progress=False, text_form=form)
        out[form] = data
    return out


def _first_micro_batch(data: str) -> tuple[dict[str, torch.Tensor], bool, torch.Tensor]:
    """(this rank's first micro-batch, the index's text_projected, the negative prompt) as the worker takes them."""
    from data_prep.reader import DatasetIndex
    from orchestration.config import DataSection
    from orchestration.loader import RankLoader

    index = DatasetIndex.open(data)
    loader = RankLoader(index, DataSection(path=data, loader_workers=0), rank=0, world_size=1, micro_batch=2,
                        grad_accum=1, global_batch=2)
    batch = next(loader)[0]
    return batch, index.text_projected, index.negative_embeds()[None]


def test_a_projected_cache_trains_bitwise_like_the_raw_one(caches):
    """The loader ships the projected text as bf16 [b, L, inner]; the worker's step call with the index's
    text_projected gives the raw cache's loss, metrics and gradients bit for bit (LoRA, tied teacher, bf16 base
    under bf16 autocast as on GPUs, caption dropout drawing the cached negative prompt)."""
    from asymflow.components import load_base_components
    from asymflow.convert import convert_transformer
    from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step
    from asymflow.perceptual import TinyConvDistance
    from asymflow.subspace import SubspaceArtifact
    from asymflow.teacher import TiedTeacher
    from asymflow.trainable import LoRASettings, apply_trainable

    raw, raw_flag, raw_negative = _first_micro_batch(caches["raw"])
    projected, flag, negative = _first_micro_batch(caches["projected"])
    assert (raw_flag, flag) == (False, True)
    assert raw["keys"] == projected["keys"] and torch.equal(raw["latents"], projected["latents"])
    latent = load_base_components(BF16_MODEL, ("transformer",)).transformer
    inner, joint = latent.inner_dim, latent.config.joint_attention_dim
    assert raw["text_embeds"].shape[-1] == joint and projected["text_embeds"].shape[-1] == inner != joint
    assert projected["text_embeds"].dtype == torch.bfloat16 and negative.shape[-1] == inner

    artifact = SubspaceArtifact.load(str(Path(caches["raw"]) / "subspace.safetensors"), patch_size=16, rank=128)
    student = convert_transformer(latent, artifact.basis, artifact.scale, share_weights=True)
    teacher = TiedTeacher(student)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        apply_trainable(student, "lora", LoRASettings(rank=4, alpha=4))
    student.train()
    cfg = AsymFlowVRConfig(caption_dropout=0.5)
    results = []
    for batch, text_projected, neg in ((raw, raw_flag, raw_negative), (projected, flag, negative)):
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)} | {"negative_embeds": neg}
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = asymflow_vr_step(student, teacher, tensors, torch.Generator().manual_seed(4), cfg,
                                             TinyConvDistance(), text_projected=text_projected)
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in student.named_parameters()
                                                 if p.requires_grad}))
    (loss_r, metrics_r, grads_r), (loss_p, metrics_p, grads_p) = results
    assert metrics_r["caption_dropped_frac"] == 0.5 and torch.isfinite(loss_r)
    assert torch.equal(loss_r, loss_p)
    assert all(torch.equal(metrics_r[k], metrics_p[k]) for k in metrics_r)
    assert grads_r.keys() == grads_p.keys() and all(torch.equal(grads_r[k], grads_p[k]) for k in grads_r)


def _config(data: str, *overrides: str):
    from orchestration.preflight import resolve_local_paths

    return resolve_local_paths(load_config(str(REPO / "configs" / "tiny.yaml"),
                                           [f"data.path={data}", "model.dtype=bfloat16", *overrides]))


@pytest.mark.parametrize(("overrides", "reason"), [
    (["trainable.mode=full"], "trainable.mode is 'full'"),
    (["trainable.full_modules=[x_embedder,proj_out,norm_out,context_embedder]"],
     "trainable.full_modules includes 'context_embedder'"),
    (["trainable.lora.targets=[context_embedder]"], "a trainable.lora.targets pattern matches it"),
])
def test_preflight_refuses_a_projected_cache_for_a_run_that_trains_context_embedder(caches, overrides, reason):
    from orchestration.preflight import check_inputs

    check_inputs(_config(caches["projected"]))  # the LoRA recipe keeps it frozen: accepted
    check_inputs(_config(caches["raw"], *overrides))  # raw states suit any trainable set
    with pytest.raises(ConfigError, match=rf"^trainable: this run trains context_embedder \({reason}\)"):
        check_inputs(_config(caches["projected"], *overrides))


def test_preflight_refuses_a_projected_cache_of_another_context_embedder(caches):
    """Same model kind and seed (the model check passes), other dtype: the layer's fingerprint differs."""
    from orchestration.preflight import check_inputs

    with pytest.raises(ConfigError, match=r"^data.path: the projected text in .* was computed by another "
                                          r"context_embedder .*model.dtype float32"):
        check_inputs(_config(caches["projected"], "model.dtype=float32"))


def test_train_cli_refusal_is_one_error_line(caches, tmp_path, capsys):
    from orchestration.cli import main

    code = main(["train", str(REPO / "configs" / "tiny.yaml"), "--data", caches["projected"], "--storage",
                 str(tmp_path / "runs"), "--set", "model.dtype=bfloat16", "--set", "trainable.mode=full",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: trainable: this run trains context_embedder")
    assert "Traceback" not in err


def _zero3_rank(rank: int, world: int, port: int, out: str) -> None:
    """Raw then projected text through DeepSpeed ZeRO-3 (2 gloo ranks), the same LoRA student and tied teacher."""
    import json

    join_gloo_group(rank, world, port)
    import deepspeed

    from asymflow.convert import convert_transformer
    from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step
    from asymflow.teacher import make_teacher
    from asymflow.text import project_text
    from asymflow.tiny import build_tiny_transformer
    from asymflow.trainable import FULL_MODULES, LoRASettings, apply_trainable, param_groups
    from deepspeed.utils import safe_get_full_fp32_param
    from orchestration.config import TrainSection
    from orchestration.deepspeed_config import build_deepspeed_config
    from tests.asymflow.helpers import random_basis
    from tests.asymflow.test_trainable import tiny_batch

    train = TrainSection(global_batch=4, micro_batch=2, workers=world, use_gpu=False, lr=1e-3)
    base_layer = build_tiny_transformer(seed=0).context_embedder  # what `prep cache` projects with
    result = {}
    for form in ("raw", "projected"):
        student = convert_transformer(build_tiny_transformer(seed=0), random_basis(768, 128, seed=0,
                                                                                 dtype=torch.float32), 1.3)
        teacher = make_teacher(student, "tied", FULL_MODULES)
        torch.manual_seed(1)
        apply_trainable(student, "lora", LoRASettings(rank=8, alpha=8.0))
        student.train()
        student.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(param_groups(student, train.lr, {}, 0.0), lr=train.lr)
        ds_config = build_deepspeed_config(train, world, False)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 1000  # partition context_embedder too
        engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
        losses = []
        for step in range(3):
            batch = tiny_batch(seed=10 * step + rank)
            if form == "projected":
                for key in ("text_embeds", "negative_embeds"):
                    batch[key] = torch.cat([project_text(base_layer, row[None]) for row in batch[key]])
            loss, _ = asymflow_vr_step(engine, teacher, batch, torch.Generator().manual_seed(step),
                                       AsymFlowVRConfig(caption_dropout=0.5), text_projected=form == "projected")
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        weight = engine.module.context_embedder.weight
        result[form] = {"losses": losses, "context_embedder_partition": [weight.ds_tensor.numel(), weight.ds_numel],
                        "weights": {n: safe_get_full_fp32_param(p).flatten().tolist()
                                    for n, p in engine.module.named_parameters() if p.requires_grad}}
        engine.destroy()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.integration
def test_projected_text_under_zero3_trains_bitwise_like_raw(tmp_path):
    """Under ZeRO-3 with context_embedder partitioned, skipping it by a module swap neither hangs nor changes the
    maths: three steps on 2 ranks give the raw run's losses and trained weights bit for bit."""
    import json

    import torch.multiprocessing as mp

    mp.start_processes(_zero3_rank, args=(2, free_ports(1)[0], str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)):
        raw, projected = rank["raw"], rank["projected"]
        assert projected["context_embedder_partition"] == [96 * 64 // 2, 96 * 64]  # partitioned over 2 ranks
        assert projected["losses"] == raw["losses"]  # floats round-trip exactly through JSON
        assert projected["weights"].keys() == raw["weights"].keys() and projected["weights"] == raw["weights"]
