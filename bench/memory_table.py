"""docs/SCALING.md's per-GPU memory table, printed from the memory model `asymflow train --dry-run` uses.

    .venv/bin/python bench/memory_table.py            # print the markdown
    .venv/bin/python bench/memory_table.py --write    # replace the table between the markers in docs/SCALING.md

4B / 9B (the recipe configs, built on the meta device) × {LoRA, full} × frozen parameters {partitioned, replicated}
× micro-batch {1, 2, 4, 8, 16} at 1024² with 512 text tokens, LPIPS on, activation checkpointing on, bf16 on GPU,
each at its recipe's world size. Every figure comes from `orchestration.dry_run.predict_memory`, so the document
and the dry run cannot disagree (tests/orchestration/test_memory_table.py checks the document). Predictions: no
GPU measured them.

The other families' released checkpoints (asymflow/families/released.py, built on the meta device) × {LoRA, full}
× micro-batch, each with its example config's settings (configs/<checkpoint>.yaml): a second table in
docs/SCALING.md, the README's table of the configs, and each config's own comment block (between its
`# memory:begin` / `# memory:end` lines); --write rewrites all of them (tests/orchestration/test_family_configs.py).
"""
from __future__ import annotations

import argparse
import functools
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


FAMILY_BEGIN = "<!-- family-memory-table:begin (bench/memory_table.py --write) -->"
FAMILY_END = "<!-- family-memory-table:end -->"
CONFIG_BEGIN, CONFIG_END = "# memory:begin (bench/memory_table.py --write)", "# memory:end"


def family_sections(name: str) -> dict:
    """The sections of configs/<name>.yaml the memory model reads, validated one by one (nothing they name needs to
    exist on disk); the model section with every family allowed, as data prep validates it."""
    import yaml

    from asymflow.components import BaseModelConfig
    from asymflow.families import FAMILIES
    from orchestration.config import PerceptualSection, TrainableSection, TrainSection

    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))
    return {
        "model": BaseModelConfig.model_validate(raw["model"], context={"families": tuple(FAMILIES)}),
        "trainable": TrainableSection.model_validate(raw["trainable"]),
        "train": TrainSection.model_validate(raw["train"]),
        "perceptual": PerceptualSection.model_validate(raw["perceptual"]),
    }


@functools.lru_cache(maxsize=None)
def _family_counts(name: str, trainable):
    """Parameter counts of released checkpoint `name`'s pixel model (built on the meta device) with `trainable`."""
    from asymflow.families.released import build_released_pixel, released
    from orchestration.dry_run import count_family_parameters

    return count_family_parameters(released(name).family, build_released_pixel(name), trainable)


def family_prediction(name: str, mode: str | None = None, micro_batch: int | None = None):
    """(ParamCounts, MemoryPrediction) of configs/<name>.yaml for the released checkpoint `name` at SIZE², with
    its own settings, or another trainable mode / micro-batch (teacher: auto)."""
    from asymflow.families.released import released
    from orchestration.dry_run import predict_run_memory

    sec = family_sections(name)
    trainable, train = sec["trainable"], sec["train"]
    if mode is not None:
        trainable = trainable.model_copy(update={"mode": mode})
    if micro_batch is not None:
        train = train.model_copy(update={"micro_batch": micro_batch})
    p = _family_counts(name, trainable)
    return p, predict_run_memory(p, sec["model"], trainable, train, sec["perceptual"], released(name).family, SIZE, SIZE)


def family_predictions() -> list[dict]:
    """One row per (released checkpoint, mode), frozen parameters partitioned, at its config's world size."""
    from asymflow.families.released import RELEASED

    rows = []
    for name in RELEASED:
        for mode in ("lora", "full"):
            m = {mb: family_prediction(name, mode, mb) for mb in MICRO_BATCHES}
            p, one = m[1]
            rows.append({"model": name, "mode": mode, "world": family_sections(name)["train"].workers, "params": p,
                         "states": one.states, "fixed": one.gathered + one.context, "act": one.activations_per_sample,
                         "lpips": one.lpips_per_sample, "total": {mb: m[mb][1].total for mb in MICRO_BATCHES}})
    return rows


def family_markdown(rows: list[dict]) -> str:
    head = ("| checkpoint (config) | trained | parameters N | trainable | GPUs | states | gathered + context | "
            "activations / sample | LPIPS / sample | " + " | ".join(f"mb {mb}" for mb in MICRO_BATCHES) + " |")
    lines = [head, "|" + "---|" * (9 + len(MICRO_BATCHES))]
    for r in rows:
        p = r["params"]
        lines.append(f"| {r['model']} (`configs/{r['model']}.yaml`) | {r['mode']} | {p.total / 1e9:.3f} B | "
                     f"{p.trainable / 1e6:,.1f} M | {r['world']} | {_gb(r['states'])} | {_gb(r['fixed'])} | "
                     f"{_gb(r['act'])} | {_gb(r['lpips'])} | "
                     + " | ".join(_gb(r["total"][mb]) for mb in MICRO_BATCHES) + " |")
    lines += [
        "",
        f"GB per GPU (10⁹ bytes), {SIZE}², each config's text length, bf16, activation checkpointing, LPIPS on, frozen "
        "parameters partitioned, tied teacher for LoRA and a whole frozen copy for full fine-tuning; *predictions*, "
        "no GPU measured them. Counted from each model: blocks, width, tokens, buffers; the recompute transient is its "
        "largest block's measured BLOCK_TRANSIENT (above); the context is assumed.",
    ]
    return "\n".join(lines)


def config_comment(name: str) -> str:
    """The memory comment block of configs/<name>.yaml: its own settings' prediction, term by term."""
    p, m = family_prediction(name)
    sec = family_sections(name)
    t, tr = sec["train"], sec["trainable"]
    return "\n".join([
        f"# Predicted memory per GPU (docs/SCALING.md's model, orchestration/dry_run.py predict_memory; a prediction,",
        f"# no GPU measured it): {p.total / 1e9:.2f} B parameters, {p.trainable / 1e6:.1f} M trainable ({tr.mode}, "
        f"frozen parameters {tr.frozen_params}), {t.workers} GPUs,",
        f"# micro-batch {t.micro_batch} at {SIZE}x{SIZE}, bf16: states {_gb(m.states)} + gathered {_gb(m.gathered)} + "
        f"CUDA/NCCL context {_gb(m.context)} (assumed)",
        f"# + activations {_gb(m.micro_batch * m.activations_per_sample)} + LPIPS "
        f"{_gb(m.micro_batch * m.lpips_per_sample)} = {_gb(m.total)} GB per GPU.",
    ])


README = REPO / "README.md"
README_BEGIN, README_END = "<!-- family-configs:begin (bench/memory_table.py --write) -->", "<!-- family-configs:end -->"


def readme_table() -> str:
    """README's "Model families" table of the example configs and their predicted memory per GPU."""
    from asymflow.families.released import RELEASED

    lines = ["| config | checkpoint | parameters (pixel model) | trainable (LoRA) | GPUs × micro-batch | "
             "predicted memory per GPU |", "|---|---|---|---|---|---|"]
    for name, entry in RELEASED.items():
        p, m = family_prediction(name)
        lines.append(f"| [`configs/{name}.yaml`](configs/{name}.yaml) | `{entry.repo}` | {p.total / 1e9:.2f} B | "
                     f"{p.trainable / 1e6:.0f} M | {family_sections(name)['train'].workers} × {m.micro_batch} | "
                     f"{_gb(m.total)} GB |")
    return "\n".join(lines)


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)].strip("\n")


def config_section(name: str) -> str:
    """The text between the memory markers of configs/<name>.yaml."""
    text = (REPO / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    return text[text.index(CONFIG_BEGIN) + len(CONFIG_BEGIN):text.index(CONFIG_END)].strip("\n")


def _replace_between(path: Path, begin: str, end: str, body: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, stop = text.index(begin) + len(begin), text.index(end)
    path.write_text(text[:start] + "\n" + body + "\n" + text[stop:], encoding="utf-8")


def family_document_section() -> str:
    text = SCALING.read_text(encoding="utf-8")
    return text[text.index(FAMILY_BEGIN) + len(FAMILY_BEGIN):text.index(FAMILY_END)].strip("\n")


def document_section() -> str:
    """The text between the markers in docs/SCALING.md."""
    text = SCALING.read_text(encoding="utf-8")
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the table in docs/SCALING.md")
    args = ap.parse_args()
    from asymflow.families.released import RELEASED

    table, families = markdown(predictions()), family_markdown(family_predictions())
    if args.write:
        _replace_between(SCALING, BEGIN, END, table)
        _replace_between(SCALING, FAMILY_BEGIN, FAMILY_END, families)
        _replace_between(README, README_BEGIN, README_END, readme_table())
        for name in RELEASED:
            _replace_between(REPO / "configs" / f"{name}.yaml", CONFIG_BEGIN, CONFIG_END, config_comment(name))
    print(table + "\n\n" + families)


if __name__ == "__main__":
    main()
