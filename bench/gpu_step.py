"""GPU suite: FLUX.2-klein-4B- and 9B-shaped pixel transformers at 1024² under DeepSpeed ZeRO-3 + activation
checkpointing + bf16 — step time, TFLOP/s, MFU, peak memory, largest micro-batch, LoRA and full fine-tune.

    .venv/bin/python bench/gpu_step.py [--models 4b,9b] [--budget-s 450]
    .venv/bin/python bench/gpu_step.py --smoke     # the same code path on CPU with a tiny shape (no figures kept)

Skips with a message (exit 0) when CUDA is absent. One process, one GPU (world size 1; ZeRO-3 then partitions over
one rank, so the figures are the single-GPU step of the recipe, not its communication).

Models: `AsymFlux2Transformer2DModel` built from the klein transformer configs (random init, real dimensions):
4B = 5 double + 20 single blocks, 24 heads × 128, text width 7680; 9B = 8 double + 24 single, 32 heads × 128, text
width 12288 (the diffusers / Hugging Face configs of black-forest-labs/FLUX.2-klein-{4B,9B}); pixel patch 16,
so a 1024² image is 4096 tokens; 512 text tokens (configs/flux2-klein-*.yaml max_sequence_length).
Step = the real AsymFlowVR step `asymflow.objective.asymflow_vr_step` (teacher forward without grad — the tied
teacher for LoRA, a frozen full copy for full fine-tuning, as the worker builds them — + student forward/backward,
LPIPS-VGG perceptual term on as in the recipe, with random VGG weights since the real ones are not available offline:
same cost) → engine.backward → engine.step, under torch.autocast(bf16) as the worker runs it, with
`enable_gradient_checkpointing()`. LoRA = the recipe's rank 256 on the FLUX.2 targets + full
x_embedder/proj_out/norm_out. Every micro-batch gets 2 warm-up and --steps timed steps.

FLOPs (model FLOPs, counted analytically from the module shapes, the MFU convention — recomputation by activation
checkpointing is not counted):
  per forward  F = Σ_linear 2·d_in·d_out·T_l  +  Σ_blocks 4·T²·d_inner
    T_l = tokens that pass through that linear: image tokens T_i for the image stream / x_embedder / proj_out,
    text tokens T_t for the context stream / context_embedder, T = T_i + T_t for single blocks; the attention term
    (QKᵀ and AV, 2·T²·d each) runs over the joint sequence in every double and single block.
  per step     = teacher forward (F without the LoRA layers) + student forward F + student backward, per sample
    × micro-batch; the backward costs 1× forward for input gradients of every linear, 2× for attention, and 1×
    forward for weight gradients of the TRAINABLE linears only (`step_flops`). Full fine-tuning: the familiar 3F
    (6·N·T + 12·L·T²·d) + F; LoRA: ~2F + F, e.g. 244 TFLOP per 1024² sample at 9B, not 4F = 310. LPIPS is not
    counted (MFU of the transformer).
MFU = FLOPs / step time / the device's dense bf16 peak (H100 SXM 989, H100 PCIe 756, H200 989, A100 312 TFLOP/s;
override with --peak-tflops). Peak memory = torch.cuda.max_memory_allocated. Largest micro-batch: doubling from 1
until CUDA OOM (2 steps each). Whatever does not fit in --budget-s is skipped with a message (the suite must
finish in < 8 min).
"""
from __future__ import annotations

import argparse
import os
import time

import common

SMOKE = dict(patch_size=1, in_channels=128, mlp_ratio=3.0, rope_theta=2000, eps=1e-6, guidance_embeds=False,
             num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=96,
             axes_dims_rope=(8, 8, 8, 8), timestep_guidance_channels=64)
PEAKS_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


def flop_terms(model, t_img: int, t_txt: int) -> dict[str, float]:
    """Forward model FLOPs of one sample (see the module docstring), split by what the backward must do:
    "frozen" linears (input gradients only), "trainable" linears (LoRA A/B and fully trained modules: input and
    weight gradients), "lora" (the part of "trainable" the tied teacher skips) and "attention" (QKᵀ and AV)."""
    import torch

    terms = {"frozen": 0.0, "trainable": 0.0, "lora": 0.0, "attention": 0.0}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name.startswith("single_transformer_blocks"):
            tokens = t_img + t_txt
        elif name.startswith("transformer_blocks"):
            tokens = t_txt if ("context" in name or ".add_" in name or "to_add_out" in name) else t_img
        elif name.startswith("context_embedder"):
            tokens = t_txt
        elif name.startswith(("x_embedder", "proj_out")):
            tokens = t_img
        else:
            tokens = 1  # timestep / modulation projections: once per sample
        flops = 2.0 * m.in_features * m.out_features * tokens
        terms["trainable" if m.weight.requires_grad else "frozen"] += flops
        if ".lora_" in name:
            terms["lora"] += flops
    blocks = model.config.num_layers + model.config.num_single_layers
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    terms["attention"] = blocks * 4.0 * (t_img + t_txt) ** 2 * inner
    return terms


def step_flops(terms: dict[str, float]) -> float:
    """Model FLOPs of one training sample: teacher forward + student forward + student backward.

    The backward computes input gradients through every linear (1× its forward) and attention (2×), and weight
    gradients (1× forward) only for trainable linears: a frozen base needs no weight-gradient matmuls, so LoRA costs
    ~2F + trainable, not 3F. Full fine-tuning gives the familiar 3F. The tied teacher runs without the LoRA layers.
    """
    linear, attention = terms["frozen"] + terms["trainable"], terms["attention"]
    teacher = linear - terms["lora"] + attention
    student = (linear + attention) + (linear + 2.0 * attention) + terms["trainable"]
    return teacher + student


def device_peak(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in PEAKS_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value
    return float("nan")


def build(preset: str, mode: str, device, dtype):
    """Pixel model (random init, real dims), bf16 frozen teacher, trainable set, DeepSpeed ZeRO-3 engine."""
    import deepspeed
    import torch

    from asymflow.model import AsymFlux2Transformer2DModel
    from asymflow.teacher import make_teacher
    from asymflow.trainable import LoRASettings, apply_trainable, param_groups
    from orchestration.config import TrainSection
    from orchestration.deepspeed_config import build_deepspeed_config

    from asymflow.klein import KLEIN_TRANSFORMER_CONFIGS

    latent_cfg = SMOKE if preset == "smoke" else KLEIN_TRANSFORMER_CONFIGS[preset]
    cfg = AsymFlux2Transformer2DModel.from_latent_config(latent_cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init directly in the model dtype (B and s stay fp32 by construction)
    try:
        with torch.device(device):
            student = AsymFlux2Transformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    teacher = make_teacher(student, "tied" if mode == "lora" else "copy")
    lora = LoRASettings(rank=256 if preset != "smoke" else 4, alpha=256.0 if preset != "smoke" else 4.0)
    apply_trainable(student, mode, lora)
    student.train()
    student.enable_gradient_checkpointing()
    train = TrainSection(global_batch=1, micro_batch=1, workers=1, use_gpu=device.type == "cuda")
    groups = param_groups(student, train.lr, train.lr_multipliers, train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.adam_eps)
    ds = build_deepspeed_config(train, 1, device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds)
    n_params = sum(p.ds_numel for p in engine.module.parameters())
    n_trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
    return engine, teacher, n_params, n_trainable


def step_once(engine, teacher, perceptual, mb: int, size: int, text_len: int, device, seed: int) -> None:
    import torch

    from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step

    joint = teacher.config.joint_attention_dim
    g = torch.Generator().manual_seed(seed)
    batch = {
        "images": (torch.rand(mb, 3, size, size, generator=g) * 2 - 1).to(device),
        "latents": torch.randn(mb, 128, size // 16, size // 16, generator=g).to(device),
        "text_embeds": torch.randn(mb, text_len, joint, generator=g).to(device),
    }
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = asymflow_vr_step(engine, teacher, batch, g, AsymFlowVRConfig(), perceptual)
    engine.backward(loss)
    engine.step()


def autocast_precision(device, size: int) -> dict[str, float]:
    """Max |autocast − fp32| of the step's fp32 algebra on this device (spec §3.4a): the Oklab target x_0 of a
    uniform-RGB image, its decode, and the velocity recovery of random tokens. ~0 expected (same fp32 kernels); the
    unprotected bf16 codec measured 2e-2 rms on CPU."""
    import torch

    from asymflow.oklab import oklab_decode, oklab_encode
    from asymflow.parameterisation import recover_velocity

    g = torch.Generator().manual_seed(0)
    img = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
    basis, _ = torch.linalg.qr(torch.randn(768, 128, generator=g, dtype=torch.float64))
    basis = basis.float().to(device)
    u_a, x_t = (torch.randn(1, (size // 16) ** 2, 768, generator=g).to(device) for _ in range(2))
    sigma = torch.tensor([0.9], device=device)

    def run():
        x_0 = oklab_encode(img)
        return x_0, oklab_decode(x_0), recover_velocity(u_a, x_t, sigma, basis, 2.0)

    with torch.autocast(device.type, dtype=torch.bfloat16):
        lowered = run()
    exact = run()
    names = ("oklab_target", "oklab_decode", "recovery")
    return {name: float((a.float() - b).abs().max()) for name, a, b in zip(names, lowered, exact)}


def timed_steps(engine, teacher, perceptual, mb, size, text_len, device, n: int) -> list[float]:
    import torch

    out = []
    for i in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_once(engine, teacher, perceptual, mb, size, text_len, device, seed=i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="4b,9b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="timed steps after 2 warm-up steps")
    ap.add_argument("--max-micro-batch", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new measurements after this")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU (checks the code path; nothing recorded)")
    ap.add_argument("--no-lpips", action="store_true", help="leave the perceptual term out (the recipe has it)")
    args = ap.parse_args()

    common.set_bench_environment()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_step: skipped — CUDA is not available on this machine (the GPU suite needs one NVIDIA GPU; "
              "run `python bench/gpu_step.py` on a GPU host). Nothing recorded.")
        return
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    if args.smoke:
        device, dtype, models, size, text_len = torch.device("cpu"), torch.float32, ["smoke"], 64, 16
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
        gpu_name, peak = "cpu (smoke)", float("nan")
    else:
        device, dtype, models, size, text_len = torch.device("cuda:0"), torch.bfloat16, args.models.split(","), args.size, args.text_len
        torch.cuda.set_device(device)
        deepspeed.init_distributed(dist_backend="nccl")
        gpu_name = torch.cuda.get_device_name(device)
        peak = device_peak(gpu_name, args.peak_tflops)
    t_start = time.perf_counter()
    t_img = (size // 16) ** 2

    def record(metric, value, unit, **extra):
        if args.smoke:
            print(f"[gpu_step smoke] {metric} = {value} {unit} {extra}")
        else:
            common.record("gpu_step", metric, value, None, extra.pop("ratio", None), unit,
                          machine_gpu=gpu_name, peak_bf16_tflops=peak, **extra)

    from asymflow.perceptual import LPIPSDistance, TinyConvDistance

    # Random VGG weights: the real LPIPS file is not available offline, and the cost does not depend on the values.
    perceptual = None if args.no_lpips else (TinyConvDistance() if args.smoke else LPIPSDistance()._freeze()).to(device)
    for name, err in autocast_precision(device, size).items():
        record(f"autocast_{name}_max_abs_err", err, "max |bf16-autocast − fp32| (normalised Oklab / velocity units)")

    for preset in models:
        for mode in ("lora", "full"):
            if time.perf_counter() - t_start > args.budget_s:
                print(f"gpu_step: {preset}/{mode} skipped — time budget of {args.budget_s:.0f} s used up")
                continue
            label = f"{preset}_{mode}"
            try:
                engine, teacher, n_params, n_trainable = build(preset, mode, device, dtype)
            except torch.OutOfMemoryError as exc:
                print(f"gpu_step: {label} does not fit on one {gpu_name} ({str(exc).splitlines()[0]})")
                record(f"{label}_fits", 0, "bool (0: out of memory while building)")
                torch.cuda.empty_cache()
                continue
            per_sample = step_flops(flop_terms(engine.module, t_img, text_len))
            largest, mb = 0, 1
            while mb <= args.max_micro_batch and time.perf_counter() - t_start < args.budget_s:
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    warm = timed_steps(engine, teacher, perceptual, mb, size, text_len, device, 2)
                    times = timed_steps(engine, teacher, perceptual, mb, size, text_len, device, args.steps)
                except torch.OutOfMemoryError:
                    print(f"gpu_step: {label} micro-batch {mb}: out of memory")
                    break
                largest = mb
                st = common.median(times)
                tflops = per_sample * mb / st / 1e12
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                cfg = {"model": preset, "mode": mode, "micro_batch": mb, "image": f"{size}²", "image_tokens": t_img,
                       "text_tokens": text_len, "params": n_params, "trainable": n_trainable,
                       "flops_per_sample": per_sample, "warmup_s": warm}
                record(f"{label}_mb{mb}_step_time_s", st, "s/step", config=cfg)
                record(f"{label}_mb{mb}_tflops", tflops, "TFLOP/s (model FLOPs, analytic)", config=cfg)
                record(f"{label}_mb{mb}_mfu", tflops / peak, "fraction of dense bf16 peak", config=cfg,
                       ratio=tflops / peak)
                record(f"{label}_mb{mb}_peak_mem_GiB", mem, "GiB (max_memory_allocated)", config=cfg)
                mb *= 2
            record(f"{label}_largest_micro_batch", largest, f"samples per micro-batch at {size}² (doubling search)")
            del engine, teacher
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"gpu_step: done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
