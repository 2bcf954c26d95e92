"""Text cache bytes per sample: the raw Qwen3 states vs the projected context (the frozen context_embedder's output).

    .venv/bin/python bench/text_cache.py

Baseline: today's cache, raw states in bf16. Two kinds of figures, each a ratio against that baseline:
- klein 4B / 9B shapes: one `{key}.text.safetensors` member serialised by `data_prep.cache.tensor_to_bytes` (what
  `prep cache` writes) from a tensor of the real shape — raw [512, 3·hidden] vs projected [512, inner] — as the tar
  member it becomes (512-byte header block + data padded to blocks). fp8 rows are the spec's format (not exact).
- the real cache files of the demo dataset (photos at ~128² buckets, tiny model: joint_attention_dim 96, inner 64),
  built both ways by `build_cache`: text member bytes per sample from the caches' samples.parquet.
The maths: payload ratio = inner / joint_attention_dim (1/3 at 9B, 0.4 at 4B), plus per-member headers.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import common
import pyarrow.parquet as pq
import torch

from asymflow.klein import KLEIN_TRANSFORMER_CONFIGS
from data_prep.cache import _member_extent, build_cache, tensor_to_bytes

MAX_LENGTH = 512  # klein's max_sequence_length


def member_bytes(width: int, dtype: str) -> int:
    """Bytes one text member of [512, width] takes in a cache shard (tar header block + padded safetensors)."""
    x = torch.randn(MAX_LENGTH, width, generator=torch.Generator().manual_seed(0))
    return _member_extent(len(tensor_to_bytes("text_embeds", x, dtype)))


def klein_figures() -> None:
    for name in ("4b", "9b"):
        config = KLEIN_TRANSFORMER_CONFIGS[name]
        joint, inner = config["joint_attention_dim"], config["num_attention_heads"] * config["attention_head_dim"]
        baseline = member_bytes(joint, "bf16")
        shapes = {"raw [512, joint_attention_dim]": joint, "projected [512, inner]": inner}
        for (form, width), dtype in ((f, d) for f in shapes.items() for d in ("bf16", "fp8")):
            if form.startswith("raw") and dtype == "bf16":
                continue
            value = member_bytes(width, dtype)
            kind = form.split()[0]
            common.record("text_cache", f"klein_{name}_{kind}_{dtype}_bytes_per_sample", value, baseline,
                          value / baseline, "bytes per sample (ratio: / raw bf16)",
                          config={"model": f"klein {name}", "text_form": form, "dtype": dtype, "joint": joint,
                                  "inner": inner},
                          tb_per_million_images=round(value * 1e6 / 1e12, 2),
                          baseline_tb_per_million_images=round(baseline * 1e6 / 1e12, 2))


def text_bytes_per_sample(data: str) -> float:
    table = pq.read_table(Path(data) / "cache" / "samples.parquet", columns=["size", "latent_size"])
    sizes = [s - l for s, l in zip(table["size"].to_pylist(), table["latent_size"].to_pylist())]
    return sum(sizes) / len(sizes)


def dataset_figures() -> None:
    from asymflow.components import BaseModelConfig

    raw_data = common.ensure_dataset(128)  # raw bf16 cache of the tiny model
    baseline = text_bytes_per_sample(raw_data)
    with tempfile.TemporaryDirectory(dir=common.CACHE) as tmp:
        data = shutil.copytree(raw_data, Path(tmp) / "data")
        build_cache(str(data), BaseModelConfig(kind="tiny", seed=0), batch_size=4, overwrite=True, progress=False,
                    text_form="projected")
        value = text_bytes_per_sample(str(data))
    common.record("text_cache", "demo_dataset_projected_bf16_text_bytes_per_sample", value, baseline, value / baseline,
                  "bytes per sample (ratio: / raw bf16)",
                  config={"dataset": "demo photos ~128², tiny model", "joint": 96, "inner": 64,
                          "payload_ratio": 64 / 96})


def main() -> None:
    common.set_bench_environment()
    torch.set_num_threads(1)
    klein_figures()
    dataset_figures()


if __name__ == "__main__":
    main()
