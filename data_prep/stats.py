"""`prep stats`: bucket histogram, stored-sample and source-image size distributions and skip reasons of a dataset, printed and plotted to a PNG."""
from __future__ import annotations

import io

import numpy as np

from data_prep import format as fmt
from data_prep.shards import put_atomic

STATS_PLOT_NAME = "stats.png"


def _quantiles(values: np.ndarray, unit: str, scale: float = 1.0) -> str:
    if values.size == 0:
        return "n/a"
    q = np.quantile(values / scale, [0.0, 0.1, 0.5, 0.9, 1.0])
    return "  ".join(f"{name} {v:.2f}{unit}" for name, v in zip(("min", "p10", "median", "p90", "max"), q))


def stats_figure(manifest: dict, buckets: list[tuple[str, int]], sample_bytes: np.ndarray, source_mp: np.ndarray):
    """Four panels: bucket histogram, stored-sample size, source-image size, skip reasons. Count axes get integer
    ticks only (a count of 2.5 samples means nothing)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    axes[0].bar([b for b, _ in buckets], [c for _, c in buckets], color="tab:blue")
    axes[0].set_title("bucket histogram")
    axes[0].set_ylabel("samples")
    axes[0].tick_params(axis="x", labelrotation=60)
    axes[1].hist(sample_bytes / 1e6, bins=40, color="tab:green")
    axes[1].set_title("stored sample size")
    axes[1].set_xlabel("MB per sample")
    axes[2].hist(source_mp, bins=40, color="tab:orange")
    axes[2].set_title("source image size (after EXIF orientation)")
    axes[2].set_xlabel("megapixels")
    reasons = manifest.get("totals", {}).get("skipped_by_reason", {})
    axes[3].bar(list(reasons), list(reasons.values()), color="tab:red")
    axes[3].set_title("skip reasons (skipped.jsonl)" if reasons else "skip reasons: none skipped")
    axes[3].tick_params(axis="x", labelrotation=60)
    for ax in axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{manifest['num_samples']} samples, {len(manifest['shards'])} shards")
    fig.tight_layout()
    return fig


def dataset_stats(data_dir: str, plot: str | None = None) -> tuple[str, str]:
    """Text report and the path of the PNG plot (default DATA/stats.png)."""
    manifest = fmt.load_manifest(data_dir)
    table = fmt.load_sample_table(data_dir)
    # Configured buckets with no samples are shown too: an empty bucket is information about the corpus.
    counts = {b: 0 for b in manifest.get("builder", {}).get("buckets", [])} | manifest["buckets"]
    buckets = sorted(counts.items(), key=lambda kv: fmt.parse_bucket(kv[0]))
    n = max(manifest["num_samples"], 1)
    sample_bytes = table.column("size").to_numpy()
    source_mp = table.column("original_width").to_numpy().astype(np.float64) * table.column("original_height").to_numpy() / 1e6
    totals = manifest.get("totals", {})

    width = max((c for _, c in buckets), default=1)
    lines = [f"{data_dir}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, {totals.get('bytes', 0) / 1e6:.1f} MB"]
    lines.append("buckets (WxH  count  share):")
    for b, c in buckets:
        lines.append(f"  {b:>10}  {c:>8}  {100 * c / n:5.1f}%  {'#' * round(40 * c / width)}")
    lines.append(f"stored sample size: {_quantiles(sample_bytes, ' MB', 1e6)}")
    lines.append(f"source image size:  {_quantiles(source_mp, ' MP')}")
    if totals.get("skipped_by_reason"):
        lines.append(f"skipped {totals['skipped']} of {totals['inputs']} inputs: " + ", ".join(f"{r} {c}" for r, c in totals["skipped_by_reason"].items()))

    fig = stats_figure(manifest, buckets, sample_bytes, source_mp)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    plot = plot or fmt.join(data_dir, STATS_PLOT_NAME)
    put_atomic(plot, buf.getvalue())
    return "\n".join(lines), plot
