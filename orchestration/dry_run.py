"""`asymflow train --dry-run`: the resolved config, world size, batch arithmetic, epoch and checkpoint schedule and the
predicted memory per worker (docs/SCALING.md's model), after the same preflight as a real run; nothing is started."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml

from orchestration.config import RunConfig, TrainableSection

PIXEL_TOKEN = 768  # 3 Oklab channels × 16² pixels: the converted model's x_embedder input / proj_out output
IMAGE_ALGEBRA_TENSORS = 20  # fp32 image-space tensors of one AsymFlow step (SCALING.md: x_0, x_t, twins, targets, …)
# T·d values one checkpointed block holds for its backward while it is recomputed (q, k, v, attention output, MLP
# in/out, norms; LoRA's inputs and dropout masks, or with every weight trained each linear's input), per trainable
# mode and block kind (`block_kind`), MEASURED on tiny instances of the real classes: bench/block_transient.py counts
# the bytes autograd saves inside each block in a bf16 training forward (dropout through CUDA's fused kernel) over
# T·d·2 bytes; tests/orchestration/test_family_configs.py re-measures them and checks the count against a walk of
# the autograd graph. A model's transient is its largest block's (`model_transient`). Replaces the unmeasured FLUX.2
# estimate of 20 T·d (29 % low for LoRA).
BLOCK_TRANSIENT: dict[str, dict[str, float]] = {
    "lora": {
        "Flux2TransformerBlock": 28.2, "Flux2SingleTransformerBlock": 27.1,
        "FluxTransformerBlock": 24.8, "FluxSingleTransformerBlock": 22.7,
        "JointTransformerBlock": 28.4, "JointTransformerBlock+dual_attention": 38.6,
        "JointTransformerBlock+context_pre_only": 27.1,
        "QwenImageTransformerBlock": 28.2,
        "SanaTransformerBlock": 46.2,
    },
    "full": {
        "Flux2TransformerBlock": 31.1, "Flux2SingleTransformerBlock": 30.1,
        "FluxTransformerBlock": 27.1, "FluxSingleTransformerBlock": 25.1,
        "JointTransformerBlock": 28.2, "JointTransformerBlock+dual_attention": 41.2,
        "JointTransformerBlock+context_pre_only": 27.2,
        "QwenImageTransformerBlock": 27.1,
        "SanaTransformerBlock": 42.1,
    },
}
GATHERED_BLOCKS = 2  # ZeRO-3 holds about this many blocks' gathered parameters at once (the current and the next)
GPU_CONTEXT_BYTES = 3e9  # assumption: CUDA context, NCCL buffers and allocator slack per GPU (not measured here)
LPIPS_TAP_TENSORS = 2  # per LPIPS tap of the prediction: the normalised difference and its square


@dataclass(frozen=True)
class ParamCounts:
    total: int  # the converted pixel model
    trainable: int
    full_modules: int  # fully trained modules (the tied teacher keeps frozen copies of these)
    layers: int  # transformer blocks (double + single): each one checkpointed
    width: int  # hidden size d
    patch: int = 16  # pixel patch p: one image token per p×p pixels
    text_in_blocks: bool = True  # the text tokens travel through the blocks with the image tokens (joint attention)
    buffers: int = 0  # module buffers of the model (SD3's positional table): whole on every rank, not partitioned
    # T·d values one block holds while recomputed (its largest block; default: FLUX.2 double block, LoRA)
    transient: float = BLOCK_TRANSIENT["lora"]["Flux2TransformerBlock"]


def count_parameters(cfg: RunConfig) -> ParamCounts:
    """Parameter counts of the run's pixel model and trainable set, from the latent base's config on the meta
    device (a klein-sized model costs no memory): converting changes only x_embedder/proj_out's token width. Another
    family's pixel model is built on meta from model.path's transformer/config.json (`count_family_parameters`)."""
    family = cfg.family()
    if family != "flux2":
        return count_family_parameters(family, _family_pixel_on_meta(cfg, family), cfg.trainable)
    return count_model_parameters(_latent_on_meta(cfg), cfg.trainable)


def count_model_parameters(latent: torch.nn.Module, trainable_cfg: TrainableSection) -> ParamCounts:
    """`count_parameters` for a given latent base (modified: the trainable set is applied to it)."""
    from asymflow.trainable import apply_trainable

    r = latent.x_embedder.weight.shape[1]
    d = latent.x_embedder.weight.shape[0]
    growth = (PIXEL_TOKEN - r) * (d + latent.proj_out.weight.shape[1])
    if getattr(latent.proj_out, "bias", None) is not None:
        growth += PIXEL_TOKEN - r
    total = sum(p.numel() for p in latent.parameters()) + growth
    apply_trainable(latent, trainable_cfg.mode, trainable_cfg.lora, trainable_cfg.full_modules)
    trainable = sum(p.numel() for p in latent.parameters() if p.requires_grad) + growth
    full = sum(p.numel() for name, p in latent.named_parameters()
               if p.requires_grad and "lora_" not in name) + growth if trainable_cfg.mode == "lora" else total
    blocks = [*latent.transformer_blocks, *latent.single_transformer_blocks]
    return ParamCounts(total, trainable, full, len(blocks), d,
                       transient=model_transient(blocks, trainable_cfg.mode))


def count_family_parameters(family: str, pixel: torch.nn.Module, trainable_cfg: TrainableSection) -> ParamCounts:
    """`count_parameters` for a non-FLUX.2 family, from its converted pixel model (on the meta device; modified:
    the trainable set is applied to it): the checkpointed blocks are the top-level `*transformer_blocks` lists, the
    width d the read-in's output features, buffers all but the fp32 B and s (`asymflow.families.pixel`)."""
    from asymflow.families import get_family
    from asymflow.families.pixel import FP32_BUFFERS
    from asymflow.trainable import apply_trainable

    spec = get_family(family)
    total = sum(p.numel() for p in pixel.parameters())
    buffers = sum(b.numel() for name, b in pixel.named_buffers() if name not in FP32_BUFFERS)
    width = pixel.get_submodule(spec.read_in.module).weight.shape[0]
    blocks = [block for name, m in pixel.named_children()
              if isinstance(m, torch.nn.ModuleList) and name.endswith("transformer_blocks") for block in m]
    transient = model_transient(blocks, trainable_cfg.mode)
    with torch.device("meta"):
        apply_trainable(pixel, trainable_cfg.mode, trainable_cfg.lora, trainable_cfg.full_modules)
    trainable = sum(p.numel() for p in pixel.parameters() if p.requires_grad)
    full = sum(p.numel() for name, p in pixel.named_parameters()
               if p.requires_grad and "lora_" not in name) if trainable_cfg.mode == "lora" else total
    return ParamCounts(total, trainable, full, len(blocks), width, spec.pixel_patch, spec.text_stream == "joint",
                       buffers, transient)


def block_kind(block: torch.nn.Module) -> str:
    """The block's class, with the SD3 variants that hold more or less (a second self-attention, the last block's
    text stream without MLP): the key of BLOCK_TRANSIENT[mode]."""
    kind = type(block).__name__
    for flag in ("dual_attention", "context_pre_only"):
        if getattr(block, f"use_{flag}" if flag == "dual_attention" else flag, False):
            kind += f"+{flag}"
    return kind


def model_transient(blocks, mode: str) -> float:
    """The recompute transient (T·d) of a model whose checkpointed blocks are `blocks`, trained with `mode` ("lora"
    or "full"): its largest block's."""
    measured = BLOCK_TRANSIENT[mode]
    kinds = {block_kind(block) for block in blocks}
    unmeasured = sorted(kinds - measured.keys())
    if unmeasured:  # a new block class: measure it (bench/block_transient.py) rather than guess
        raise ValueError(f"no measured recompute transient for block kind(s) {', '.join(unmeasured)}: add them to "
                         "orchestration.dry_run.BLOCK_TRANSIENT (bench/block_transient.py measures them)")
    return max(measured[kind] for kind in kinds)


def stream_text_tokens(family: str, max_sequence_length: int) -> int:
    """Text tokens per sample the family's pipeline makes of `max_sequence_length` (SD3: + the 77 CLIP tokens)."""
    from asymflow.families import get_family

    return max_sequence_length + get_family(family).extra_text_tokens


def _family_pixel_on_meta(cfg: RunConfig, family: str) -> torch.nn.Module:
    from asymflow.families import get_family
    from asymflow.families.released import build_pixel_from_latent_config

    config = get_family(family).transformer_type().load_config(cfg.model.path, subfolder="transformer")
    return build_pixel_from_latent_config(family, config)


def _latent_on_meta(cfg: RunConfig) -> torch.nn.Module:
    from asymflow.components import BUNDLED_PATH, load_base_components
    from asymflow.families import get_family

    m = cfg.model
    if m.kind == "tiny":  # built in code, a few MB: the real thing is as cheap as a meta copy
        return load_base_components(m, ("transformer",)).transformer
    root = m.path or str(BUNDLED_PATH)
    cls = get_family(cfg.family()).transformer_type()  # Flux2Transformer2DModel, FluxTransformer2DModel, ...
    config = cls.load_config(root, subfolder="transformer")
    with torch.device("meta"):
        return cls.from_config(config)


def state_bytes_per_rank(p: ParamCounts, world: int, gpu: bool, teacher: str,
                         frozen_params: str = "partitioned") -> float:
    """ZeRO-3 model states per rank (SCALING.md): every parameter partitioned in the compute dtype, plus gradient,
    fp32 master and Adam m, v of the trainable ones; the teacher's frozen copies (tied: the fully trained modules;
    copy: the whole model) are not partitioned; `frozen_params` replicated keeps the frozen parameters whole on
    every rank (orchestration/frozen_params.py); module buffers are never partitioned. GPU: bf16 (2 B); CPU: fp32."""
    b = 2 if gpu else 4
    per_trainable = b + 4 + 8 if gpu else 4 + 4 + 8  # grad + fp32 master + Adam (CPU: the fp32 param is the master)
    teacher_bytes = b * (p.full_modules if teacher == "tied" else p.total)
    frozen = p.total - p.trainable
    if frozen_params == "replicated":
        return b * frozen + (b + per_trainable) * p.trainable / world + teacher_bytes + b * p.buffers
    return (b * p.total + per_trainable * p.trainable) / world + teacher_bytes + b * p.buffers


def gathered_bytes(p: ParamCounts, gpu: bool, frozen_params: str = "partitioned") -> float:
    """Parameters ZeRO-3 holds gathered at once: about GATHERED_BLOCKS blocks' worth (only their trainable share
    when the frozen ones are replicated, which `state_bytes_per_rank` counts whole already)."""
    b = 2 if gpu else 4
    gathered = p.trainable if frozen_params == "replicated" else p.total
    return GATHERED_BLOCKS * b * gathered / p.layers


def lpips_bytes_per_sample(height: int, width: int, gpu: bool) -> float:
    """LPIPS-VGG16 of one predicted image (spec §10: bf16 on GPU): the tensors autograd keeps for its backward as
    `asymflow.perceptual` computes it — only the prediction's VGG pass is in the graph (the target's features are
    computed without autograd), so for that image every conv/ReLU and max-pool output (and the input) is kept, plus
    the pools' int64 indices, and LPIPS_TAP_TENSORS tensors the size of each tapped feature map (the normalised
    difference and its square). Checked against autograd's saved tensors on CPU (tests/orchestration/
    test_memory_table.py). Not counted: the target's tapped features, alive only during the LPIPS forward."""
    from asymflow.perceptual import LPIPS_TAPS, VGG16_LAYOUT

    b = 2 if gpu else 4
    h, w, channels, index = height, width, 3, 0  # index: position in torchvision's vgg16 `features`
    values, pooled, taps = 3 * height * width, 0, 0
    for layer in VGG16_LAYOUT:
        if layer == "M":
            h, w, index = h // 2, w // 2, index + 1
            pooled += channels * h * w
        else:
            channels, index = layer, index + 2  # a conv and its ReLU
        values += channels * h * w
        if index - 1 in LPIPS_TAPS:  # this conv's ReLU output is an LPIPS tap
            taps += channels * h * w
    return b * (values + LPIPS_TAP_TENSORS * taps) + 8 * pooled


@dataclass(frozen=True)
class MemoryPrediction:
    """Per-GPU (or per-worker) memory of the docs/SCALING.md model, in bytes."""

    states: float
    gathered: float
    context: float
    activations_per_sample: float
    lpips_per_sample: float
    micro_batch: int

    @property
    def total(self) -> float:
        return (self.states + self.gathered + self.context
                + self.micro_batch * (self.activations_per_sample + self.lpips_per_sample))


def predict_memory(p: ParamCounts, *, world: int, gpu: bool, teacher: str, frozen_params: str, micro_batch: int,
                   height: int, width: int, text_tokens: int, checkpointing: bool, lpips: bool) -> MemoryPrediction:
    """The memory model `asymflow train --dry-run` prints and docs/SCALING.md tabulates (bench/memory_table.py)."""
    return MemoryPrediction(
        states=state_bytes_per_rank(p, world, gpu, teacher, frozen_params),
        gathered=gathered_bytes(p, gpu, frozen_params),
        context=GPU_CONTEXT_BYTES if gpu else 0.0,
        activations_per_sample=activation_bytes_per_sample(p, height, width, text_tokens, gpu, checkpointing),
        lpips_per_sample=lpips_bytes_per_sample(height, width, gpu) if lpips else 0.0,
        micro_batch=micro_batch,
    )


def predict_run_memory(p: ParamCounts, cfg_model, trainable: TrainableSection, train, perceptual, family: str,
                       height: int, width: int) -> MemoryPrediction:
    """`predict_memory` with a run's own settings (its model, trainable, train and perceptual sections; the
    sections alone, so a config is predicted without its model, data or subspace on disk) at a height×width bucket."""
    return predict_memory(p, world=train.workers, gpu=train.use_gpu, teacher=trainable.teacher_kind(),
                          frozen_params=trainable.frozen_params, micro_batch=train.micro_batch, height=height,
                          width=width, text_tokens=stream_text_tokens(family, cfg_model.max_sequence_length),
                          checkpointing=train.activation_checkpointing, lpips=perceptual.kind == "lpips")


def activation_bytes_per_sample(p: ParamCounts, height: int, width: int, text_tokens: int, gpu: bool,
                                checkpointing: bool) -> float:
    """Activations of one sample (SCALING.md): with checkpointing, each block's input (L·T·d) plus one block's
    recompute transient (p.transient·T·d, 28.2 for FLUX.2 with LoRA); without, the transient per block; plus the fp32
    image-space AsymFlow algebra.
    T = image tokens (H/p·W/p) + text tokens where the text travels through the blocks (joint attention); where it
    is a cross-attention input (Sana) T is the image tokens and the text (text_tokens·d) is kept once.
    p.transient is the model's largest block's measured BLOCK_TRANSIENT for its trainable mode."""
    b = 2 if gpu else 4
    image = (height // p.patch) * (width // p.patch)
    tokens = image + text_tokens if p.text_in_blocks else image
    blocks = (p.layers + p.transient) if checkpointing else p.transient * p.layers
    shared_text = 0 if p.text_in_blocks else text_tokens * p.width * b
    return blocks * tokens * p.width * b + shared_text + IMAGE_ALGEBRA_TENSORS * 3 * height * width * 4


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def dry_run_report(cfg: RunConfig) -> str:
    """What `train` would do with `cfg` (already resolved and preflighted), as text."""
    from data_prep.format import parse_bucket
    from data_prep.reader import DatasetIndex
    from orchestration import checkpoint as ckpt
    from orchestration.data_plan import bucket_counts, steps_per_epoch

    t, c = cfg.train, cfg.checkpoint
    index = DatasetIndex.open(cfg.data.path)
    buckets = bucket_counts(index.table)
    per_epoch = steps_per_epoch(index.table, t.global_batch, cfg.data.drop_remainder)
    width, height = max((parse_bucket(b) for b in buckets), key=lambda wh: wh[0] * wh[1])
    world = t.workers if cfg.run.min_workers is None else f"{cfg.run.min_workers}..{t.workers} (elastic)"
    saves = sorted({s for s in range(c.every, t.steps + 1, c.every)} | {t.steps})
    restore = ckpt.find_restore_point(cfg.run_dir)
    p = count_parameters(cfg)
    m = predict_run_memory(p, cfg.model, cfg.trainable, t, cfg.perceptual, cfg.family(), height, width)
    device = "GPU, bf16" if t.use_gpu else "CPU, fp32"
    lines = [
        "# dry run: nothing was started. Resolved config:",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "",
        f"run directory: {cfg.run_dir}",
        f"start: {f'resume from step {restore.step} ({restore.path})' if restore else 'pretrained init'}",
        f"world: {world} worker(s) ({device}, {'nccl' if t.use_gpu else 'gloo'})",
        f"batch: global {t.global_batch} = micro {t.micro_batch} x {t.workers} worker(s) x grad_accum {t.accum}",
        f"data: {len(index)} samples in {len(buckets)} bucket(s) {buckets}; {per_epoch} steps per epoch "
        f"({'dropping' if cfg.data.drop_remainder else 'padding'} each bucket's remainder); {t.steps} steps = "
        f"{t.steps / max(per_epoch, 1):.2f} epochs",
        f"lr: {t.lr:g}, warmup {t.warmup_steps} steps, then {t.lr_schedule}"
        + (f" to {t.min_lr:g}" if t.lr_schedule != "constant" else ""),
        f"checkpoints: every {c.every} steps and at the end -> {len(saves)} ({', '.join(map(str, saves[:8]))}"
        f"{', ...' if len(saves) > 8 else ''}), keep the last {c.keep}",
        f"samples: {f'every {cfg.sample.every} steps' if cfg.sample.every else 'off'}",
        f"model: {_count(p.total)} parameters, {_count(p.trainable)} trainable "
        f"({100 * p.trainable / p.total:.1f} %, {cfg.trainable.mode}), {p.layers} blocks of width {p.width}",
        f"predicted memory per worker (docs/SCALING.md model, {device}, frozen parameters "
        f"{cfg.trainable.frozen_params}): model states {_size(m.states)} + gathered parameters {_size(m.gathered)}"
        + (f" + CUDA/NCCL context {_size(m.context)} (assumed)" if m.context else "")
        + f" + activations {_size(m.micro_batch * m.activations_per_sample)}"
        + (f" + LPIPS {_size(m.micro_batch * m.lpips_per_sample)}" if m.lpips_per_sample else "")
        + f" (micro-batch {t.micro_batch} at the largest bucket {width}x{height}) = {_size(m.total)}",
    ]
    return "\n".join(lines)
