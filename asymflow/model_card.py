"""The README.md model card of an export: YAML front matter (base_model, library_name, tags; license left to the user)
and the training facts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

TAGS = ("asymflow", "text-to-image", "pixel-space", "flux2", "diffusers")


@dataclass
class CardFacts:
    """What a card states; None = unknown (written as such, never guessed)."""

    kind: Literal["adapter", "merged"]
    base_model: str | None
    step: int | None = None
    samples: int | None = None  # training images in the dataset's manifest
    dataset: str | None = None
    rank: int | None = None  # subspace rank r of B
    scale: float | None = None  # s
    final_loss: float | None = None
    lora: dict[str, Any] | None = None  # rank, alpha, targets; None: no LoRA
    trainable_mode: str | None = None
    eval: dict[str, Any] = field(default_factory=dict)  # e.g. {"psnr_db": {...}, "ssim": {...}} from compare


def _fmt(value: Any, spec: str = "") -> str:
    return "unknown" if value is None else format(value, spec)


def render_model_card(facts: CardFacts) -> str:
    """Markdown with YAML front matter; `license:` is present and empty — the base model's licence decides it."""
    front = {"base_model": facts.base_model, "library_name": "diffusers", "tags": list(TAGS)}
    if facts.kind == "adapter":
        front["tags"].append("lora")
    header = yaml.safe_dump(front, sort_keys=False).rstrip("\n")
    lines = [
        "---",
        header,
        "license:  # set this: a derivative of the base model is bound by the base model's licence",
        "---",
        "",
        f"# AsymFlow pixel-space {'adapter' if facts.kind == 'adapter' else 'model (LoRA merged)'}",
        "",
        f"A pixel-space AsymFlow transformer converted from the latent model `{facts.base_model or 'unknown'}` and "
        "fine-tuned with asymflow. It generates 3-channel images in normalised Oklab, decoded to RGB by the pipeline.",
        "",
        "## Training",
        "",
        "| fact | value |",
        "|---|---|",
        f"| optimizer steps | {_fmt(facts.step)} |",
        f"| training images | {_fmt(facts.samples)}{f' (`{facts.dataset}`)' if facts.dataset else ''} |",
        f"| subspace rank r | {_fmt(facts.rank)} |",
        f"| data scale s | {_fmt(facts.scale, '.6g')} |",
        f"| final loss | {_fmt(facts.final_loss, '.5g')} |",
        f"| trained | {_fmt(facts.trainable_mode)}"
        + (f", LoRA rank {facts.lora['rank']} alpha {facts.lora['alpha']}" if facts.lora else "")
        + " |",
    ]
    if facts.eval:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in facts.eval.items()]
    lines += ["", "## Use", ""]
    if facts.kind == "adapter":
        lines += [
            "```bash",
            "asymflow sample THIS_DIR --prompt 'a photo of a cat' --out samples/",
            "```",
            "",
            "```python",
            "from asymflow import load_adapter",
            "model = load_adapter('THIS_DIR', 'LATENT_BASE_TRANSFORMER_DIR')",
            "```",
            "",
            "peft (`PeftModel.from_pretrained(asymflow.load_pixel_base(dir, base, trained_modules=False), dir)`) and "
            "diffusers (`pixel_base.load_lora_adapter(dir, weight_name='pytorch_lora_weights.safetensors')`) load "
            "the same LoRA; see asymflow's README, 'Using the result'.",
        ]
    else:
        lines += [
            "```python",
            "from asymflow import AsymFlux2Transformer2DModel",
            "model = AsymFlux2Transformer2DModel.from_pretrained('THIS_DIR')",
            "```",
        ]
    return "\n".join(lines) + "\n"


def parse_front_matter(card: str) -> dict[str, Any]:
    """The YAML between the leading `---` lines of a card."""
    if not card.startswith("---\n"):
        raise ValueError("model card has no YAML front matter")
    return yaml.safe_load(card[4:card.index("\n---", 4)]) or {}
