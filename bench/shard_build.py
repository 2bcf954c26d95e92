"""Benchmark `prep shards` throughput (~1024² buckets from large JPEGs/PNGs) against a naive PIL loop per core, and 1 vs 2 workers.

    .venv/bin/python bench/shard_build.py [--count 48] [--reps 3] [--formats png,jpg] [--phases scaling,per_core]

Naive loop = what one writes first: PIL open → full decode → EXIF transpose → RGB → Lanczos resize to cover →
crop → `im.save` with Pillow's defaults except the settings that define the stored quality (JPEG q95 4:4:4,
as ours; for PNG that means Pillow's default zlib level 6 and its per-row adaptive filter) →
webdataset.ShardWriter (a TarWriter per shard). Both use the same bucket geometry. The per-image breakdown
also times the naive loop with *our* encoder settings ("same_encoder"), which isolates the pipeline
(reduced-size JPEG decoding, one-pass crop+resize) from the encoder choice; `output_MB_per_image_*` is the
size cost of our encoder.

Phases, each recorded with the machine load (`load` at the record, `load_at_start`):
- per_core: naive vs ours with 1 worker (in-process), repetitions interleaved (naive, ours, naive, …) so
  load drift hits both alike; medians. The ratio is what the issue calls "per core".
- scaling: ours with 1 vs 2 worker processes, interleaved. Two workers on a 2-core machine only mean
  something when nothing else runs, so this phase first waits (polling every 30 s, up to --wait-quiet s, e.g. 1200)
  for the 1-minute load average to drop below --quiet-load, and records whether it did (`quiet`). It runs
  first when both phases are asked for, so our own per-core runs do not hold the load up.
Results are appended to bench/results.jsonl (bench/common.record); BENCHMARKS.md is rendered by bench/report.py.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, load, record  # noqa: E402
from data_prep.corpus import build_large_corpus  # noqa: E402
from data_prep.images import ImageSpec, cover_crop_box, encode, make_buckets, nearest_bucket, process_image  # noqa: E402
from data_prep.shards import BuildConfig, build_shards  # noqa: E402


def naive_encode(im: Image.Image, spec: ImageSpec) -> bytes:
    """`im.save` as one writes it first: Pillow's defaults, plus the settings that define the stored quality."""
    buf = io.BytesIO()
    if spec.format == "png":
        im.save(buf, "PNG")  # Pillow's default: zlib level 6, adaptive per-row filter
    elif spec.format == "jpg":
        im.save(buf, "JPEG", quality=spec.quality, subsampling=0)  # same quality contract as ours
    else:
        im.save(buf, "WEBP", quality=spec.quality, lossless=spec.quality >= 100)
    return buf.getvalue()


def naive_image(data: bytes, spec: ImageSpec, same_encoder: bool = False) -> tuple[bytes, tuple[int, int]]:
    """Full decode → EXIF transpose → RGB → Lanczos resize to cover → crop → encode."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    bucket = nearest_bucket(im.width, im.height, spec.buckets)
    s, _ = cover_crop_box(im.width, im.height, bucket)
    rw, rh = math.ceil(im.width * s), math.ceil(im.height * s)
    im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - bucket[0]) // 2, (rh - bucket[1]) // 2
    im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    if same_encoder:
        return encode(im, spec.format, spec.quality, spec.png_compress_level, spec.png_filter), bucket
    return naive_encode(im, spec), bucket


def naive_build(files: list[Path], out_dir: Path, spec: ImageSpec, shard_size: int) -> tuple[int, float]:
    import webdataset as wds  # already imported by main() before timing; never at module level (see main)
    written = 0
    with wds.ShardWriter(str(out_dir / "naive-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i, path in enumerate(files):
            encoded, bucket = naive_image(path.read_bytes(), spec)
            meta = {"source": str(path), "width": bucket[0], "height": bucket[1]}
            sink.write({"__key__": f"{i:09d}", spec.format: encoded, "txt": b"", "json": json.dumps(meta).encode()})
            written += 1
    return written, 0.0


def ours_build(corpus: Path, out_dir: Path, spec: ImageSpec, shard_size: int, workers: int) -> tuple[int, float]:
    """Returns (written, CPU seconds of the worker processes; 0 when the build ran in this process)."""
    report = build_shards(BuildConfig(str(corpus), str(out_dir), spec, shard_size), workers=workers, show_progress=False, log=lambda _: None)
    assert report.exit_code == 0, report.message
    return report.written, report.worker_cpu_s if workers > 1 else 0.0


def output_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.tar"))


def interleaved(variants: dict, files: list[Path], reps: int, cache: Path, label: str) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Run each variant `reps` times, alternating; return median wall seconds, median CPU seconds (this process +
    worker processes) and output bytes per variant. CPU time hardly moves with other jobs' load, wall time does."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    out_bytes: dict[str, int] = {}
    for rep in range(reps):
        for name, build in variants.items():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / "out"
                out.mkdir()
                t, c = time.perf_counter(), time.process_time()
                n, worker_cpu = build(out)
                times[name].append(time.perf_counter() - t)
                cpus[name].append(time.process_time() - c + worker_cpu)
                assert n == len(files), (name, n)
                out_bytes[name] = output_bytes(out)
            print(f"  [{label}] rep {rep + 1}/{reps} {name:8s} {times[name][-1]:6.2f}s wall {cpus[name][-1]:6.2f}s CPU  load {load()}", flush=True)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(times), med(cpus), out_bytes


def per_image_ms(files: list[Path], spec: ImageSpec, reps: int) -> dict[str, dict[str, float]]:
    """Mean over images of the median in-process ms per image, by source format (no I/O, no pool), variants interleaved."""
    variants = {
        "naive": lambda d: naive_image(d, spec),
        "naive_same_encoder": lambda d: naive_image(d, spec, same_encoder=True),
        "ours": lambda d: process_image(d, spec),
    }
    out: dict[str, dict[str, list[float]]] = {}
    for path in files:
        data = path.read_bytes()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(reps):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn(data)
                times[name].append(time.perf_counter() - t)
        by_format = out.setdefault(path.suffix.lstrip("."), {k: [] for k in variants})
        for name, ts in times.items():
            by_format[name].append(statistics.median(ts) * 1e3)
    return {f: {v: statistics.mean(ms) for v, ms in d.items()} for f, d in out.items()}


def autogroup_enabled() -> bool:
    """With kernel.sched_autogroup_enabled, CPU is shared between *sessions* first: while another session keeps
    a core busy, this one gets about 1 of 2 cores whatever its worker count (the other session's nice values do
    not change that), so a loaded box can show ~1.0x from 1 to 2 workers; `cores_used` says what it got."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def wait_quiet(threshold: float, max_wait: float, poll: float = 30.0) -> bool:
    """Poll the 1-minute load average until it is below `threshold` (True) or `max_wait` seconds have passed (False)."""
    t0 = time.monotonic()
    while True:
        one = os.getloadavg()[0]
        if one < threshold:
            print(f"quiet: 1-min load {one:.2f} < {threshold}", flush=True)
            return True
        if time.monotonic() - t0 >= max_wait:
            print(f"never quiet within {max_wait:.0f}s (1-min load {one:.2f}); measuring anyway, recorded as not quiet", flush=True)
            return False
        print(f"waiting for a quiet machine: load {load()} ({time.monotonic() - t0:.0f}s)", flush=True)
        time.sleep(poll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=48, help="images in the corpus")
    ap.add_argument("--long-side", type=int, default=2560, help="long side of the corpus images (px)")
    ap.add_argument("--png-every", type=int, default=4, help="every k-th image is a PNG, the rest JPEG q95 (web corpora are mostly JPEG)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--breakdown-count", type=int, default=16, help="images in the in-process per-image breakdown (first N of the corpus)")
    ap.add_argument("--formats", default="png,jpg", help="stored formats for the per-core phase")
    ap.add_argument("--scaling-format", default="png", help="stored format(s) for the scaling phase, comma-separated (png is the default of prep shards)")
    ap.add_argument("--phases", default="scaling,per_core", help="comma-separated: scaling, per_core")
    ap.add_argument("--quiet-load", type=float, default=0.7, help="1-min load average below which the machine counts as quiet")
    ap.add_argument("--wait-quiet", type=float, default=0, help="longest wait (s) for a quiet machine before the scaling phase "
                    "(default 0, so run_all never stalls; the record says whether it was quiet)")
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "bench_shard_build"), help="corpus cache directory")
    ap.add_argument("--results", default=str(REPO / "bench" / "results.jsonl"))
    args = ap.parse_args()
    # Warm imports outside the timed runs: webdataset pulls in torch (~2 s), build_shards' finalize pyarrow.parquet.
    # Here, not at module level: every worker process of every pool re-imports this script as __mp_main__
    # (multiprocessing does that for scripts run by path), and a torch import there cost each 2-worker build
    # ~1 s of CPU per worker before its first chunk.
    import pyarrow.parquet  # noqa: F401
    import webdataset  # noqa: F401

    results = Path(args.results)
    cache = Path(args.cache)
    phases = args.phases.split(",")

    t0 = time.perf_counter()
    corpus = cache / "corpus"
    files = build_large_corpus(corpus, count=args.count, long_side=args.long_side, png_every=args.png_every)
    source_bytes = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} images ({sum(f.suffix == '.png' for f in files)} PNG), long side {args.long_side}px, "
          f"{source_bytes / 1e6:.1f} MB ({time.perf_counter() - t0:.1f}s); load {load()}", flush=True)
    base_config = {"count": len(files), "long_side": args.long_side, "png_every": args.png_every, "resolution": args.resolution,
                   "reps": args.reps, "shard_size": args.shard_size, "source_MB": round(source_bytes / 1e6, 2)}

    if "scaling" in phases:
        quiet = wait_quiet(args.quiet_load, args.wait_quiet)
        for fmt_name in args.scaling_format.split(","):
            load_at_start = load()
            spec = ImageSpec(buckets=make_buckets(args.resolution), format=fmt_name)  # type: ignore[arg-type]
            med, cpu, _ = interleaved({f"ours_{w}": (lambda out, w=w: ours_build(corpus, out, spec, args.shard_size, w)) for w in (1, 2)},
                                      files, args.reps, cache, f"scaling {fmt_name}")
            ips = {k: len(files) / v for k, v in med.items()}
            note = "quiet machine" if quiet else f"machine never quiet (1-min load ≥ {args.quiet_load}) within {args.wait_quiet:.0f}s: figure is load-bound"
            if not quiet and autogroup_enabled():
                note += "; sched_autogroup is on: while another session keeps a core busy this one gets ~1 core (cores_used says what it got)"
            config = {**base_config, "format": fmt_name}
            record("shard_build_scaling", f"images_per_s_2workers_{fmt_name}", ips["ours_2"], ips["ours_1"], ips["ours_2"] / ips["ours_1"],
                   "images/s (ratio = 2 workers / 1 worker)", config=config, note=note, results=results, quiet=quiet, load_at_start=load_at_start)
            record("shard_build_scaling", f"source_MB_per_s_2workers_{fmt_name}", source_bytes / 1e6 / med["ours_2"], source_bytes / 1e6 / med["ours_1"],
                   med["ours_1"] / med["ours_2"], "source MB/s (ratio = 2 workers / 1 worker)", config=config, note=note, results=results, quiet=quiet,
                   load_at_start=load_at_start)
            # Load-independent view: CPU per image with 2 workers vs 1 (≈ 1: the work itself parallelises without
            # contention or serialisation), and how many cores the 2-worker build actually got (CPU / wall).
            record("shard_build_scaling", f"cpu_ms_per_image_2workers_{fmt_name}", cpu["ours_2"] / len(files) * 1e3, cpu["ours_1"] / len(files) * 1e3,
                   cpu["ours_2"] / cpu["ours_1"], "CPU ms/image, driver + workers (ratio = 2 workers / 1 worker; 1 = no parallel overhead)",
                   config=config, note=note, results=results, quiet=quiet, load_at_start=load_at_start)
            record("shard_build_scaling", f"cores_used_2workers_{fmt_name}", cpu["ours_2"] / med["ours_2"], cpu["ours_1"] / med["ours_1"],
                   (cpu["ours_2"] / med["ours_2"]) / (cpu["ours_1"] / med["ours_1"]), "CPU s per wall s (baseline: 1 worker; 2 workers can use 2.0)",
                   config=config, note=note, results=results, quiet=quiet, load_at_start=load_at_start)

    if "per_core" in phases:
        for image_format in args.formats.split(","):
            load_at_start = load()
            spec = ImageSpec(buckets=make_buckets(args.resolution), format=image_format)  # type: ignore[arg-type]
            med, cpu, out_bytes = interleaved({"naive": lambda out: naive_build(files, out, spec, args.shard_size),
                                               "ours_1": lambda out: ours_build(corpus, out, spec, args.shard_size, 1)},
                                              files, args.reps, cache, f"per core {image_format}")
            ips = {k: len(files) / v for k, v in med.items()}
            mbs = {k: source_bytes / 1e6 / v for k, v in med.items()}
            config = {**base_config, "format": image_format}
            extra = {"config": config, "results": results, "load_at_start": load_at_start}
            record("shard_build", f"images_per_s_1worker_{image_format}", ips["ours_1"], ips["naive"], ips["ours_1"] / ips["naive"],
                   "images/s (baseline: naive loop, Pillow's default encoder; ratio = ours/naive)", **extra)
            record("shard_build", f"cpu_ms_per_image_1worker_{image_format}", cpu["ours_1"] / len(files) * 1e3, cpu["naive"] / len(files) * 1e3,
                   cpu["naive"] / cpu["ours_1"], "CPU ms/image (baseline: naive loop; ratio = naive/ours, less load-sensitive than wall time)", **extra)
            record("shard_build", f"source_MB_per_s_1worker_{image_format}", mbs["ours_1"], mbs["naive"], mbs["ours_1"] / mbs["naive"],
                   "source MB/s (baseline: naive loop)", **extra)
            naive_mb, ours_mb = out_bytes["naive"] / len(files) / 1e6, out_bytes["ours_1"] / len(files) / 1e6
            record("shard_build", f"output_MB_per_image_{image_format}", ours_mb, naive_mb, ours_mb / naive_mb,
                   "MB per stored sample in the tars (ratio = ours/naive: size cost of our encoder)", **extra)
            breakdown = per_image_ms(files[: args.breakdown_count], spec, max(2, args.reps - 1))
            extra["config"] = {**config, "breakdown_count": min(args.breakdown_count, len(files))}
            for src, ms in sorted(breakdown.items()):
                record("shard_build", f"ms_per_image_{src}_source_{image_format}", ms["ours"], ms["naive"], ms["naive"] / ms["ours"],
                       "ms/image in-process (baseline: naive, Pillow's default encoder; ratio = naive/ours)", **extra)
                if image_format == "png":  # for jpg/webp the naive encoder already is ours
                    record("shard_build", f"ms_per_image_{src}_source_{image_format}_same_encoder", ms["ours"], ms["naive_same_encoder"],
                           ms["naive_same_encoder"] / ms["ours"], "ms/image in-process (baseline: naive with our encoder; ratio = naive/ours)", **extra)
    shutil.rmtree(cache / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
