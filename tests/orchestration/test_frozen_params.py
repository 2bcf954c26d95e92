"""trainable.frozen_params under real DeepSpeed ZeRO-3 (2 gloo ranks on 127.0.0.1, no Ray): replicated keeps exactly
the frozen parameters whole, the trainable ones partitioned, gathers no frozen bytes, and computes the same losses and
weights bit for bit as partitioned; config refuses it for full fine-tuning. The same ranks (their start-up is most of
the cost) also run Sana's tied teacher under ZeRO-3: its fully trained output modulation is a parameter of the root
module, which the teacher must swap inside ZeRO-3's gather and release (asymflow.teacher.parameters_swapped)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from orchestration.config import ConfigError, load_config

from .multinode_helpers import free_ports, join_gloo_group
from .test_config import TINY

STEPS = 3


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """Both policies in one process group, one after the other, on the same tiny LoRA student and tied teacher."""
    join_gloo_group(rank, world, port)
    import deepspeed

    from asymflow.convert import convert_transformer
    from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step
    from asymflow.teacher import make_teacher
    from asymflow.tiny import build_tiny_transformer
    from asymflow.trainable import LoRASettings, apply_trainable, param_groups
    from deepspeed.utils import safe_get_full_fp32_param
    from orchestration.config import TrainSection
    from orchestration.deepspeed_config import build_deepspeed_config
    from orchestration.frozen_params import apply_frozen_params, counting_gathers
    from tests.asymflow.helpers import random_basis
    from tests.asymflow.test_trainable import tiny_batch

    train = TrainSection(global_batch=8, micro_batch=2, workers=world, use_gpu=False, lr=1e-3)  # 2 micro-batches
    result = {}
    for policy in ("partitioned", "replicated"):
        student = convert_transformer(build_tiny_transformer(seed=0), random_basis(768, 128, seed=0,
                                                                                 dtype=torch.float32), 1.3)
        teacher = make_teacher(student, "tied", ("x_embedder", "proj_out", "norm_out"))
        torch.manual_seed(1)
        apply_trainable(student, "lora", LoRASettings(rank=8, alpha=8.0))
        student.train()
        student.enable_gradient_checkpointing()
        moved = apply_frozen_params(student, policy)
        optimizer = torch.optim.AdamW(param_groups(student, train.lr, {}, 0.0), lr=train.lr)
        ds_config = build_deepspeed_config(train, world, False)
        # DeepSpeed keeps parameters up to 1e5 elements whole anyway, which at this model's width is nearly all of
        # them; at 1e3 most frozen and trainable weights are partitioned, as at klein sizes.
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
        engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
        losses, gathers = [], []
        for step in range(STEPS):
            with counting_gathers(engine.module) as count:
                for micro in range(2):
                    loss, _ = asymflow_vr_step(engine, teacher, tiny_batch(seed=100 * step + 10 * micro + rank),
                                               torch.Generator().manual_seed(step * 2 + micro), AsymFlowVRConfig())
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.item())
            gathers.append(count.snapshot())
        module = engine.module
        result[policy] = {
            "moved_bytes": moved,
            "losses": losses,
            "gathers": gathers,
            # per parameter: (requires_grad, full elements, elements of this rank's partition, kept whole by size)
            "params": {n: (p.requires_grad, p.ds_numel, p.ds_tensor.numel(), p.ds_persist)
                       for n, p in module.named_parameters()},
            "buffers": {n: (hasattr(b, "ds_id"), b.numel(), b.element_size()) for n, b in module.named_buffers()},
            "state_dict": sorted(module.state_dict().keys()),
            "weights": {n: safe_get_full_fp32_param(p).flatten().tolist()
                        for n, p in module.named_parameters() if p.requires_grad},
        }
        engine.destroy()
    result["sana_teacher"] = _sana_tied_teacher(world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _sana_tied_teacher(world: int) -> dict:
    """A trained Sana LoRA student (its trainable tensors moved from the converted init, the same on every rank) under
    ZeRO-3 with everything partitioned: its tied teacher's output against an independent copy of the init's."""
    import deepspeed

    from asymflow.families import get_family
    from asymflow.families.conversion import convert_family_transformer
    from asymflow.families.tiny import build_tiny_family_transformer
    from asymflow.teacher import TiedTeacher
    from asymflow.trainable import LoRASettings, apply_trainable, build_teacher, param_groups
    from orchestration.config import TrainSection
    from orchestration.deepspeed_config import build_deepspeed_config
    from tests.asymflow.helpers import random_basis
    from tests.asymflow.test_teacher import _perturb_trainables

    sana = get_family("sana")
    basis = random_basis(sana.pixel_dim, sana.latent_dim, seed=0, dtype=torch.float32)
    student = convert_family_transformer(sana, build_tiny_family_transformer("sana", seed=0), basis, 1.3)
    copied = build_teacher(student, share_base=False, own_modules=sana.full_modules)
    tied = TiedTeacher(student)
    torch.manual_seed(1)
    apply_trainable(student, "lora", LoRASettings(rank=4, alpha=4.0, targets=sana.lora_targets), sana.full_modules)
    _perturb_trainables(student)
    train = TrainSection(global_batch=world, micro_batch=1, workers=world, use_gpu=False, lr=1e-3)
    ds_config = build_deepspeed_config(train, world, False)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the 2×32 table partitioned too
    optimizer = torch.optim.AdamW(param_groups(student, train.lr, {}, 0.0), lr=train.lr)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    table = engine.module.scale_shift_table
    g = torch.Generator().manual_seed(2)
    x, sigma, text = torch.randn(2, 3, 64, 64, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 8, 32, generator=g)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = copied(x, sigma, text, encoder_attention_mask=mask)
        got = tied(x, sigma, text, encoder_attention_mask=mask)
        engine.module.eval()
        own = engine.module(x, sigma, text, encoder_attention_mask=mask)
    out = {"table_partitioned": table.ds_tensor.numel() < table.ds_numel,
           "tied_equals_copied": torch.equal(got, want), "student_differs": not torch.equal(own, want),
           "table_restored": engine.module.scale_shift_table is table}
    engine.destroy()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("frozen-params")
    mp.start_processes(_rank, args=(2, free_ports(1)[0], str(out)), nprocs=2, join=True, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_replicated_keeps_exactly_the_frozen_parameters_whole(two_ranks):
    for rank in two_ranks:
        part, rep = rank["partitioned"], rank["replicated"]
        frozen = {n for n, (grad, *_) in part["params"].items() if not grad}
        trainable = {n for n, (grad, *_) in part["params"].items() if grad}
        assert frozen and trainable
        # partitioned: every parameter is a ZeRO-3 one holding ceil(n/2) elements on each of the 2 ranks
        assert all(local == -(-full // 2) for _, full, local, _ in part["params"].values())
        # replicated: the frozen ones are whole buffers outside ZeRO-3, the trainable ones partitioned as before
        assert set(rep["params"]) == trainable and set(rep["buffers"]) == set(part["buffers"]) | frozen
        assert all(not zero and numel == part["params"][n][1] for n, (zero, numel, _) in rep["buffers"].items()
                   if n in frozen)
        assert {n: v[1:3] for n, v in rep["params"].items()} == {n: part["params"][n][1:3] for n in trainable}
        assert rep["moved_bytes"] == sum(part["params"][n][1] * 4 for n in frozen)  # fp32 on CPU
        # non-persistent buffers: the frozen weights leave the module's state dict (checkpoints exclude them anyway)
        assert set(rep["state_dict"]) == set(part["state_dict"]) - frozen


def test_replicated_gathers_no_frozen_bytes(two_ranks):
    """Partitioned: the frozen base is gathered in every step, at least once per pass over it (teacher forward,
    student forward, backward; the recompute adds the checkpointed blocks' share), so ≥ 3 × its bytes per
    micro-batch. Replicated: no frozen bytes at all; the trainable parameters' gathers are the same in both."""
    for rank in two_ranks:
        part, rep = rank["partitioned"], rank["replicated"]
        gathered = sum(full * 4 for grad, full, _, small in part["params"].values() if not grad and not small)
        assert gathered > 0.9 * rep["moved_bytes"]  # the threshold keeps only a few small frozen tensors whole
        for step in range(STEPS):
            assert part["gathers"][step]["frozen_bytes"] >= 3 * 2 * gathered  # 2 micro-batches per step
            assert rep["gathers"][step]["frozen_bytes"] == 0
            assert part["gathers"][step]["trainable_bytes"] == rep["gathers"][step]["trainable_bytes"] > 0


def test_the_policy_changes_where_bytes_live_not_the_maths(two_ranks):
    for rank in two_ranks:
        part, rep = rank["partitioned"], rank["replicated"]
        assert part["losses"] == rep["losses"]  # bitwise: floats round-trip exactly through JSON
        assert part["weights"].keys() == rep["weights"].keys() and part["weights"] == rep["weights"]
    assert two_ranks[0]["replicated"]["weights"] == two_ranks[1]["replicated"]["weights"]


def test_sanas_tied_teacher_under_zero3_equals_a_copied_teacher(two_ranks):
    """The teacher computes the converted init bitwise although the student's partitioned scale_shift_table (and
    read-in, read-out, LoRA) moved; the student computes with its own again afterwards."""
    for rank in two_ranks:
        assert rank["sana_teacher"] == {"table_partitioned": True, "tied_equals_copied": True,
                                        "student_differs": True, "table_restored": True}


def test_replicated_is_refused_for_full_fine_tuning():
    assert load_config(TINY).trainable.frozen_params == "partitioned"
    assert load_config(TINY, ["trainable.frozen_params=replicated"]).trainable.frozen_params == "replicated"
    with pytest.raises(ConfigError, match="trainable.frozen_params 'replicated' needs trainable.mode 'lora'"):
        load_config(TINY, ["trainable.mode=full", "trainable.frozen_params=replicated"])


def test_replicated_frozen_tensors_take_the_engines_parameter_dtype():
    """DeepSpeed casts parameters to bf16 on GPU but keeps fp32 buffers fp32: the frozen buffers are cast up front,
    trainable parameters are left to DeepSpeed."""
    from asymflow.convert import convert_transformer
    from asymflow.tiny import build_tiny_transformer
    from asymflow.trainable import LoRASettings, apply_trainable
    from orchestration.frozen_params import apply_frozen_params
    from tests.asymflow.helpers import random_basis

    student = convert_transformer(build_tiny_transformer(seed=0), random_basis(768, 128, seed=0, dtype=torch.float32),
                                  1.3)
    apply_trainable(student, "lora", LoRASettings(rank=8, alpha=8.0))
    frozen = {n: p.numel() for n, p in student.named_parameters() if not p.requires_grad}
    assert apply_frozen_params(student, "partitioned", torch.bfloat16) == 0 and len(frozen) > 0
    assert apply_frozen_params(student, "replicated", torch.bfloat16) == 2 * sum(frozen.values())
    buffers = dict(student.named_buffers())
    assert all(buffers[n].dtype == torch.bfloat16 for n in frozen)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    assert set(frozen).isdisjoint(student.state_dict())
