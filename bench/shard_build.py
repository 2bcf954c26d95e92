"""Benchmark `prep shards` throughput (~1024² buckets from large JPEGs/PNGs) against a naive PIL loop, and 1 vs 2 workers, in one interleaved run.

    .venv/bin/python bench/shard_build.py [--count 48] [--reps 3] [--formats png,jpg]

Naive loop = what one writes first: PIL open → full decode → EXIF transpose → RGB → Lanczos resize to
cover → crop → encode with the *same* encoder and settings as ours → webdataset.ShardWriter (TarWriter per shard). Both use the same
bucket geometry, so the difference is the pipeline (reduced-size JPEG decoding, one-pass crop+resize with
reducing_gap, no intermediate copies) plus process parallelism for the scaling figure. Repetitions are
interleaved (naive, ours×1, ours×2, naive, …) so machine-load drift hits all variants alike; medians are
reported. Results are appended to bench/results.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.corpus import build_large_corpus  # noqa: E402
from data_prep.images import ImageSpec, cover_crop_box, encode, make_buckets, nearest_bucket, process_image  # noqa: E402
from data_prep.shards import BuildConfig, build_shards  # noqa: E402


def naive_image(data: bytes, spec: ImageSpec) -> tuple[bytes, tuple[int, int]]:
    """Full decode → EXIF transpose → RGB → Lanczos resize to cover → crop → encode (same encoder settings as ours)."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    bucket = nearest_bucket(im.width, im.height, spec.buckets)
    s, _ = cover_crop_box(im.width, im.height, bucket)
    rw, rh = math.ceil(im.width * s), math.ceil(im.height * s)
    im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - bucket[0]) // 2, (rh - bucket[1]) // 2
    im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    return encode(im, spec.format, spec.quality, spec.png_compress_level), bucket


def naive_build(files: list[Path], out_dir: Path, spec: ImageSpec, shard_size: int) -> int:
    import webdataset as wds

    written = 0
    with wds.ShardWriter(str(out_dir / "naive-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i, path in enumerate(files):
            encoded, bucket = naive_image(path.read_bytes(), spec)
            meta = {"source": str(path), "width": bucket[0], "height": bucket[1]}
            sink.write({"__key__": f"{i:09d}", spec.format: encoded, "txt": b"", "json": json.dumps(meta).encode()})
            written += 1
    return written


def per_image_ms(files: list[Path], spec: ImageSpec, reps: int) -> dict[str, dict[str, float]]:
    """Median in-process ms per image for naive_image vs process_image, by source format (no I/O, no pool)."""
    out: dict[str, dict[str, list[float]]] = {}
    for path in files:
        data = path.read_bytes()
        times: dict[str, list[float]] = {"naive": [], "ours": []}
        for _ in range(reps):
            for variant, fn in (("naive", naive_image), ("ours", process_image)):
                t = time.perf_counter()
                fn(data, spec)
                times[variant].append(time.perf_counter() - t)
        by_format = out.setdefault(path.suffix.lstrip("."), {"naive": [], "ours": []})
        for variant, ts in times.items():
            by_format[variant].append(statistics.median(ts) * 1e3)
    return {f: {v: statistics.mean(ms) for v, ms in d.items()} for f, d in out.items()}


def output_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.tar"))


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"{model}, {len(os.sched_getaffinity(0))} cores usable, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=48, help="images in the corpus")
    ap.add_argument("--long-side", type=int, default=2560, help="long side of the corpus images (px)")
    ap.add_argument("--png-every", type=int, default=4, help="every k-th image is a PNG, the rest JPEG q95 (web corpora are mostly JPEG)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--formats", default="png,jpg", help="stored formats to measure")
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "bench_shard_build"), help="corpus cache directory")
    ap.add_argument("--results", default=str(REPO / "bench" / "results.jsonl"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    corpus = Path(args.cache) / "corpus"
    files = build_large_corpus(corpus, count=args.count, long_side=args.long_side, png_every=args.png_every)
    source_bytes = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} images ({sum(f.suffix == '.png' for f in files)} PNG), long side {args.long_side}px, "
          f"{source_bytes / 1e6:.1f} MB ({time.perf_counter() - t0:.1f}s); machine: {machine()}; load average {os.getloadavg()[0]:.1f}")

    records = []
    for image_format in args.formats.split(","):
        spec = ImageSpec(buckets=make_buckets(args.resolution), format=image_format)  # type: ignore[arg-type]
        times: dict[str, list[float]] = {"naive": [], "ours_1": [], "ours_2": []}
        out_bytes: dict[str, int] = {}
        for rep in range(args.reps):
            for variant in times:
                with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
                    out = Path(tmp) / "out"
                    out.mkdir()
                    t = time.perf_counter()
                    if variant == "naive":
                        n = naive_build(files, out, spec, args.shard_size)
                    else:
                        cfg = BuildConfig(str(corpus), str(out), spec, args.shard_size)
                        report = build_shards(cfg, workers=int(variant[-1]), show_progress=False, log=lambda _: None)
                        assert report.exit_code == 0, report.message
                        n = report.written
                    times[variant].append(time.perf_counter() - t)
                    assert n == len(files), (variant, n)
                    out_bytes[variant] = output_bytes(out)
                print(f"  [{image_format}] rep {rep + 1}/{args.reps} {variant:7s} {times[variant][-1]:6.2f}s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        ips = {k: len(files) / v for k, v in med.items()}
        mbs = {k: source_bytes / 1e6 / v for k, v in med.items()}
        print(f"[{image_format}] images/s: naive {ips['naive']:.2f}, ours 1 worker {ips['ours_1']:.2f} ({ips['ours_1'] / ips['naive']:.2f}x), "
              f"ours 2 workers {ips['ours_2']:.2f} ({ips['ours_2'] / ips['ours_1']:.2f}x over 1 worker)")
        print(f"[{image_format}] source MB/s: naive {mbs['naive']:.1f}, ours 1 worker {mbs['ours_1']:.1f}, ours 2 workers {mbs['ours_2']:.1f}; "
              f"output MB per image: naive {out_bytes['naive'] / len(files) / 1e6:.2f}, ours {out_bytes['ours_1'] / len(files) / 1e6:.2f}")
        common = {"machine": machine(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "config": {"count": len(files), "long_side": args.long_side, "png_every": args.png_every, "resolution": args.resolution, "format": image_format, "reps": args.reps}}
        breakdown = per_image_ms(files, spec, args.reps)
        for src, ms in sorted(breakdown.items()):
            print(f"[{image_format}] per image, {src} sources (in-process, no I/O): naive {ms['naive']:.0f} ms, ours {ms['ours']:.0f} ms ({ms['naive'] / ms['ours']:.2f}x)")
            records.append({"benchmark": "shard_build", "metric": f"ms_per_image_{src}_source_{image_format}", "value": ms["ours"], "baseline_value": ms["naive"],
                            "ratio": ms["naive"] / ms["ours"], "unit": "ms/image (lower is better; ratio = naive/ours)", **common})
        records += [
            {"benchmark": "shard_build", "metric": f"images_per_s_1worker_{image_format}", "value": ips["ours_1"], "baseline_value": ips["naive"], "ratio": ips["ours_1"] / ips["naive"], "unit": "images/s", **common},
            {"benchmark": "shard_build", "metric": f"source_MB_per_s_1worker_{image_format}", "value": mbs["ours_1"], "baseline_value": mbs["naive"], "ratio": mbs["ours_1"] / mbs["naive"], "unit": "MB/s", **common},
            {"benchmark": "shard_build_scaling", "metric": f"images_per_s_2workers_{image_format}", "value": ips["ours_2"], "baseline_value": ips["ours_1"], "ratio": ips["ours_2"] / ips["ours_1"], "unit": "images/s", **common},
        ]
    with open(args.results, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(records)} results to {args.results}")
    shutil.rmtree(Path(args.cache) / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
