"""The memory model's recompute transient, per block kind, measured on tiny instances of the real classes.

    .venv/bin/python bench/block_transient.py

docs/SCALING.md's activation model keeps, with activation checkpointing, each block's input plus the tensors ONE
block holds for its backward while it is recomputed. This script measures that transient for every family's blocks
(FLUX.2's included): the bytes autograd saves inside each block (its inputs, parameters and buffers left out; a
storage counted once) during one training-mode forward of a tiny pixel model in bf16, trained as the recipe's LoRA
(rank scaled to the width as 256 is to the released model's, dropout 0.05, on the family's targets) or fully (every
weight trained: each linear saves its input), over T·d·2 bytes (T = the tokens in the block's stream: image + text
for joint attention, image for Sana's cross-attention). `orchestration.dry_run.BLOCK_TRANSIENT` holds these values
per trainable mode (rounded to 0.1 T·d) and a model takes its largest block's; tests/orchestration/
test_family_configs.py re-measures them and checks this count against an independent one (a walk of the autograd
graph's saved tensors). What a GPU saves and CPU does not: CPU attention is torch's flash kernel (it saves q, k, v,
output and log-sum-exp, no T² matrix), as flash/SDPA on GPUs; LoRA's dropout runs through `torch.native_dropout`
here, the fused kernel `F.dropout` uses on CUDA (a bool mask, 1 byte per element), not CPU's unfused path (a bf16
noise tensor, 2 bytes).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WIDTH = 256  # d of the tiny instances
IMAGE_SIDE = 16  # 16×16 image tokens
# Text tokens in the tiny stream in the released pipelines' proportion to 1024²'s image tokens (FLUX/Qwen-Image:
# 512 / 4096, SD3: (77 + 256) / 4096, Sana: 300 / 1024), and the released width the LoRA rank 256 is scaled from.
TEXT_TOKENS = {"flux2": 32, "flux1": 32, "sd3": 21, "qwen_image": 32, "sana": 75}
RELEASED_WIDTH = {"flux2": 4096, "flux1": 3072, "sd3": 2432, "qwen_image": 3072, "sana": 2240}
TINY = {  # the released blocks' shapes (head size, MLP ratio, SD3.5's qk-norm and dual attention) at width 256
    "flux2": dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=2, joint_attention_dim=64, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
    "flux1": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56)),
    "sd3": dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=WIDTH, pooled_projection_dim=32,
                out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,)),
    "qwen_image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                       num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 56, 56)),
    "sana": dict(in_channels=32, out_channels=32, num_attention_heads=8, attention_head_dim=32, num_layers=1,
                 num_cross_attention_heads=2, cross_attention_head_dim=128, cross_attention_dim=WIDTH,
                 caption_channels=64, mlp_ratio=2.5, attention_bias=False, sample_size=IMAGE_SIDE, patch_size=1,
                 norm_elementwise_affine=False, norm_eps=1e-6),
}


def _pixel(family: str) -> torch.nn.Module:
    import diffusers

    from asymflow.families import get_family
    from asymflow.families.released import build_pixel_from_latent_config

    torch.manual_seed(0)
    if family == "flux2":
        from asymflow.convert import convert_transformer

        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16, like the other families' pixel models here
        try:
            latent = diffusers.Flux2Transformer2DModel(**TINY["flux2"])
        finally:
            torch.set_default_dtype(previous)
        basis = torch.linalg.qr(torch.randn(768, 128, dtype=torch.float64))[0].float()
        return convert_transformer(latent, basis, 1.0)
    spec = get_family(family)
    config = {"_class_name": spec.transformer_class, **TINY[family]}
    return build_pixel_from_latent_config(family, config, device="cpu")


def _conditioning(family: str, batch: int) -> dict:
    if family == "flux1":
        return {"pooled_projections": torch.randn(batch, 32), "guidance": torch.full((batch,), 3.5)}
    if family == "sd3":
        return {"pooled_projections": torch.randn(batch, 32)}
    return {}


def _fused_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """nn.Dropout's training forward as CUDA runs it (at::dropout takes the fused native_dropout there): autograd
    saves a bool mask, where CPU's unfused path would save a noise tensor of x's dtype."""
    return torch.native_dropout(x, p, True)[0] if 0 < p < 1 else x


def trainable_pixel(family: str, mode: str = "lora") -> torch.nn.Module:
    """`family`'s tiny pixel model in bf16 in training mode with the recipe's trainable set: LoRA (rank scaled to the
    width; its dropout as CUDA runs it) or every parameter trained ("full")."""
    from asymflow.families import get_family
    from asymflow.trainable import LoRASettings, apply_trainable

    spec = get_family(family)
    model = _pixel(family)
    rank = round(256 * WIDTH / RELEASED_WIDTH[family])
    lora = LoRASettings(rank=rank, alpha=float(rank), targets=spec.lora_targets)
    apply_trainable(model, mode, lora, spec.full_modules, upcast_trainable=False)  # bf16 compute, as autocast
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.forward = functools.partial(_fused_dropout, p=module.p)
    return model


def forward(model: torch.nn.Module, family: str) -> torch.Tensor:
    """One forward of `family`'s tiny pixel model on a random 1-sample batch (IMAGE_SIDE² image tokens)."""
    from asymflow.families import get_family

    side, text = IMAGE_SIDE * get_family(family).pixel_patch, TEXT_TOKENS[family]
    x = torch.randn(1, 3, side, side, requires_grad=True)
    encoder = torch.randn(1, text, TINY[family].get("joint_attention_dim", TINY[family].get("caption_channels")))
    return model(x, torch.full((1,), 0.5), encoder, **_conditioning(family, 1))


@functools.lru_cache(maxsize=None)
def block_transients(family: str, mode: str = "lora") -> dict[str, float]:
    """Bytes each block saves for its backward / (T·d·2), by block name, for `family`'s tiny pixel model trained
    with `mode` ("lora" or "full")."""
    from asymflow.families import get_family

    spec = get_family(family)
    model = trainable_pixel(family, mode)
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[str, dict[int, int]] = {}
    current: list[str] = []
    skip: dict[str, set[int]] = {}
    keep: list[torch.Tensor] = []  # everything seen stays alive: no address is reused while storages are told apart

    def enter(name):
        def hook(module, args, kwargs):
            inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            inputs += [t for v in kwargs.values() if isinstance(v, tuple) for t in v if isinstance(t, torch.Tensor)]
            keep.extend(inputs)
            skip[name] = weights | {t.untyped_storage().data_ptr() for t in inputs}  # its inputs: counted apart
            current.append(name)
            saved.setdefault(name, {})
        return hook

    def leave(module, args, kwargs, output):
        current.pop()

    blocks = [(f"{name}.{i}", block) for name, m in model.named_children()
              if isinstance(m, torch.nn.ModuleList) and name.endswith("transformer_blocks") for i, block in enumerate(m)]
    for name, block in blocks:
        block.register_forward_pre_hook(enter(name), with_kwargs=True)
        block.register_forward_hook(leave, with_kwargs=True)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current and ptr not in skip[current[-1]]:
            keep.append(t)
            bucket = saved[current[-1]]
            bucket[ptr] = max(bucket.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(model, family)
    tokens = IMAGE_SIDE**2 + (TEXT_TOKENS[family] if spec.text_stream == "joint" else 0)
    return {name: sum(b.values()) / (tokens * WIDTH * 2) for name, b in saved.items()}


def measured_transients() -> dict[str, dict[str, float]]:
    """Each block kind's measured transient in T·d, per trainable mode (`orchestration.dry_run.block_kind` names the
    kinds; the memory model's BLOCK_TRANSIENT holds these, rounded to 0.1)."""
    from orchestration.dry_run import block_kind

    transients: dict[str, dict[str, float]] = {"lora": {}, "full": {}}
    for mode, kinds in transients.items():
        for family in TINY:
            model = _blocks(family)
            for name, value in block_transients(family, mode).items():
                kind = block_kind(model.get_submodule(name))
                kinds[kind] = max(kinds.get(kind, 0.0), value)
    return transients


def backward_peak(family: str = "flux2", name: str = "transformer_blocks.0") -> float:
    """CPU bytes allocated at the peak of one checkpointed block's backward (LoRA) above what was allocated when it
    began, / (T·d·2), from torch.profiler's memory timeline: the recomputed saved tensors plus the gradients in
    flight, which the memory model does not count (a check of the transient, not a term of it)."""
    import json
    import tempfile

    from torch.utils.checkpoint import checkpoint

    from asymflow.families import get_family

    model = trainable_pixel(family, "lora")
    block, captured = model.get_submodule(name), {}

    class _Captured(Exception):
        pass

    def capture(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Captured

    hook = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        forward(model, family)
    except _Captured:
        pass
    finally:
        hook.remove()

    def leaf(v):
        return v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    out = checkpoint(block, *map(leaf, captured["args"]), use_reentrant=False,
                     **{k: leaf(v) for k, v in captured["kwargs"].items()})
    loss = sum((o.float() ** 2).sum() for o in (out if isinstance(out, tuple) else (out,)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        loss.backward()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
    totals = [sum(categories) for categories in sizes]
    tokens = IMAGE_SIDE**2 + (TEXT_TOKENS[family] if get_family(family).text_stream == "joint" else 0)
    return (max(totals) - totals[0]) / (tokens * WIDTH * 2)


@functools.lru_cache(maxsize=None)
def _blocks(family: str) -> torch.nn.Module:
    return _pixel(family)


def main() -> None:
    for mode in ("lora", "full"):
        for family in TINY:
            per_block = block_transients(family, mode)
            print(f"{mode:4s} {family:11s} " + "  ".join(f"{k} {v:.2f}" for k, v in per_block.items()))
    for mode, kinds in measured_transients().items():
        print(f'    "{mode}": {{' + ", ".join(f'"{kind}": {value:.1f}' for kind, value in kinds.items()) + "},")
    print(f"flux2 double block, backward peak above its start (saved tensors + gradients in flight): "
          f"{backward_peak():.1f} T·d")


if __name__ == "__main__":
    main()
