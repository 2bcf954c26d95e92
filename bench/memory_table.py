"""docs/SCALING.md's per-GPU memory table, printed from the memory model `asymflow train --dry-run` uses.

    .venv/bin/python bench/memory_table.py            # print the markdown
    .venv/bin/python bench/memory_table.py --write    # replace the table between the markers in docs/SCALING.md

4B / 9B (the recipe configs, built on the meta device) × {LoRA, full} × frozen parameters {partitioned, replicated}
× micro-batch {1, 2, 4, 8, 16} at 1024² with 512 text tokens, LPIPS on, activation checkpointing on, bf16 on GPU,
each at its recipe's world size. Every figure comes from `orchestration.dry_run.predict_memory`, so the document
and the dry run cannot disagree (tests/orchestration/test_memory_table.py checks the document). Predictions: no
GPU measured them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCALING = REPO / "docs" / "SCALING.md"
BEGIN, END = "<!-- memory-table:begin (bench/memory_table.py --write) -->", "<!-- memory-table:end -->"
MICRO_BATCHES = (1, 2, 4, 8, 16)
SIZE = 1024
MOONSHOT = ("9b", 8, 40e9)  # the 9B recipe at micro-batch 8 within 40 GB per GPU
SMALL_GPU = 24e9


def predictions() -> list[dict]:
    """One row per (model, mode, policy): the memory terms and the total per micro-batch, in bytes."""
    from asymflow.klein import build_klein_transformer
    from orchestration.config import load_config
    from orchestration.dry_run import count_model_parameters, predict_memory

    rows = []
    for name in ("4b", "9b"):
        for mode in ("lora", "full"):
            cfg = load_config(str(REPO / "configs" / f"flux2-klein-{name}.yaml"), [f"trainable.mode={mode}"])
            p = count_model_parameters(build_klein_transformer(name, device="meta"), cfg.trainable)
            for policy in ("partitioned", "replicated"):
                if mode == "full" and policy == "replicated":
                    continue  # refused by the config: a fully trained model has no frozen base
                t = cfg.train
                m = {mb: predict_memory(p, world=t.workers, gpu=True, teacher=cfg.trainable.teacher_kind(),
                                        frozen_params=policy, micro_batch=mb, height=SIZE, width=SIZE,
                                        text_tokens=cfg.model.max_sequence_length,
                                        checkpointing=t.activation_checkpointing,
                                        lpips=cfg.perceptual.kind == "lpips") for mb in MICRO_BATCHES}
                one = m[1]
                rows.append({"model": name, "mode": mode, "policy": policy, "world": t.workers, "params": p,
                             "states": one.states, "fixed": one.gathered + one.context,
                             "act": one.activations_per_sample, "lpips": one.lpips_per_sample,
                             "total": {mb: m[mb].total for mb in MICRO_BATCHES}})
    return rows


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def markdown(rows: list[dict]) -> str:
    head = ("| model | trained | frozen params | GPUs | states | gathered + context | activations / sample | "
            "LPIPS / sample | " + " | ".join(f"mb {mb}" for mb in MICRO_BATCHES) + " |")
    lines = [head, "|" + "---|" * (8 + len(MICRO_BATCHES))]
    for r in rows:
        lines.append(f"| {r['model'].upper()} | {r['mode']} | {r['policy']} | {r['world']} | {_gb(r['states'])} | "
                     f"{_gb(r['fixed'])} | {_gb(r['act'])} | {_gb(r['lpips'])} | "
                     + " | ".join(_gb(r["total"][mb]) for mb in MICRO_BATCHES) + " |")
    name, mb, limit = MOONSHOT
    moon = next(r for r in rows if (r["model"], r["mode"], r["policy"]) == (name, "lora", "partitioned"))
    verdict = "within" if moon["total"][mb] <= limit else "**over**"
    fits = [b for b in MICRO_BATCHES if moon["total"][b] <= SMALL_GPU]
    small = (f"micro-batch {max(fits)} ({_gb(moon['total'][max(fits)])} GB) with gradient accumulation "
             f"{mb // max(fits)} keeps the recipe's global batch 256 on {moon['world']} GPUs" if fits
             else "no micro-batch of the table fits")
    lines += [
        "",
        f"GB per GPU (10⁹ bytes), {SIZE}², 512 text tokens, bf16, activation checkpointing, LPIPS on, tied teacher "
        "for LoRA and a whole frozen copy for full fine-tuning; *predictions*, no GPU measured them. Full fine-tuning "
        "has no replicated row: the config refuses it (no frozen base).",
        "",
        f"**Moonshot:** 9B LoRA (frozen params partitioned) on {moon['world']} GPUs at micro-batch {mb}: "
        f"{_gb(moon['total'][mb])} GB per GPU, {verdict} {limit / 1e9:.0f} GB. "
        f"**24 GB GPUs (9B LoRA, partitioned):** {small}.",
    ]
    return "\n".join(lines)


def document_section() -> str:
    """The text between the markers in docs/SCALING.md."""
    text = SCALING.read_text(encoding="utf-8")
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the table in docs/SCALING.md")
    args = ap.parse_args()
    table = markdown(predictions())
    if args.write:
        text = SCALING.read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        SCALING.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
