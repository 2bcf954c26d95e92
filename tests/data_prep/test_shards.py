"""`prep shards` on real files: the messy corpus's accounting and skip reasons, stored sizes, EXIF, captions, the format contract, stock webdataset, table and img2dataset inputs, exit codes."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import format as fmt
from data_prep.corpus import MESSY_RESOLUTION, build_messy_corpus, jpeg_bytes, photo, write_img2dataset_tars
from data_prep.images import ImageSpec, make_buckets
from data_prep.shards import EXIT_FATAL, EXIT_NOTHING_WRITTEN, EXIT_OK, EXIT_STRICT, BuildConfig, build_shards

BUCKETS = make_buckets(MESSY_RESOLUTION)


def build(input_: str | Path, output: Path, *, workers: int = 1, strict: bool = False, shard_size: int = 4, **spec: object):
    cfg = BuildConfig(str(input_), str(output), ImageSpec(buckets=BUCKETS, **spec), shard_size)
    return build_shards(cfg, workers=workers, strict=strict, show_progress=False, log=lambda _: None)


def read_dir(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None], Path]:
    root = tmp_path_factory.mktemp("messy")
    expect = build_messy_corpus(root / "in")
    report = build(root / "in", root / "out", workers=2)
    assert report.exit_code == EXIT_OK, report.message
    return root / "in", expect, root / "out"


def test_every_input_accounted_for_with_the_right_reason(messy) -> None:
    inp, expect, out = messy
    manifest = fmt.load_manifest(str(out))
    skipped = [json.loads(line) for line in (out / fmt.SKIPPED_NAME).read_text().splitlines()]
    table = fmt.load_sample_table(str(out)).to_pylist()
    assert manifest["totals"]["inputs"] == len(expect)
    assert manifest["num_samples"] + len(skipped) == len(expect) == manifest["totals"]["written"] + manifest["totals"]["skipped"]
    got = {s["source"]: s["reason"] for s in skipped}
    for row in table:
        meta = json.loads(fmt.read_sample_bytes(str(out), row)["json"])
        assert meta["source"] not in got
        got[meta["source"]] = None
    assert got == {f"{inp}/{rel}": reason for rel, reason in expect.items()}
    assert all(reason in fmt.SKIP_REASONS for reason in got.values() if reason)


def test_samples_follow_the_format_contract(messy) -> None:
    inp, _, out = messy
    manifest = fmt.load_manifest(str(out))
    table = fmt.load_sample_table(str(out)).to_pylist()
    assert [r["shard"] for r in table] == [s["name"] for s in manifest["shards"] for _ in range(s["num_samples"])]
    assert manifest["buckets"] == {b: sum(r["bucket"] == b for r in table) for b in manifest["buckets"]}
    assert len(fmt.manifest_hash(manifest)) == 64
    captions = {}
    for row in table:
        members = fmt.read_sample_bytes(str(out), row)
        assert set(members) == {"png", "txt", "json"}
        meta = json.loads(members["json"])
        for field in ("source", "width", "height", "original_width", "original_height", "bucket", "crop_box", "sha256"):
            assert field in meta
        with Image.open(io.BytesIO(members["png"])) as im:
            assert im.mode == "RGB" and im.size == (row["width"], row["height"]) == (meta["width"], meta["height"])
        assert (row["width"], row["height"]) in BUCKETS and row["bucket"] == fmt.bucket_str(row["width"], row["height"])
        assert meta["key"] == row["key"] and row["index"] == [r["key"] for r in table if r["shard"] == row["shard"]].index(row["key"])
        src = Path(meta["source"])
        import hashlib

        assert meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        # Bucket = nearest aspect ratio of the (oriented) source.
        ar = meta["original_width"] / meta["original_height"]
        assert min(BUCKETS, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(ar))) == (row["width"], row["height"])
        captions[src.name] = members["txt"].decode("utf-8")
    assert captions["a_astronaut.jpg"] == "an astronaut with a flag"
    assert captions["b_coffee.png"] == "a cup of coffee"
    assert captions["c_chelsea.webp"] == ""


def test_exif_rotated_copy_is_stored_upright(messy) -> None:
    _, _, out = messy
    by_name = {}
    for row in fmt.load_sample_table(str(out)).to_pylist():
        members = fmt.read_sample_bytes(str(out), row)
        by_name[Path(json.loads(members["json"])["source"]).name] = np.asarray(Image.open(io.BytesIO(members["png"]))).astype(float)
    reference = by_name["d_rocket.bmp"]
    for name in ("rocket_orientation6.jpg", "rocket_orientation3.jpg"):
        assert by_name[name].shape == reference.shape and reference.shape[1] > reference.shape[0]
        assert np.mean(np.abs(by_name[name] - reference)) < 4  # JPEG noise only; a wrong rotation gives ~40


def test_stock_webdataset_reads_the_shards(messy) -> None:
    _, _, out = messy
    manifest = fmt.load_manifest(str(out))
    table = {r["key"]: r for r in fmt.load_sample_table(str(out)).to_pylist()}
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        row = table[sample["__key__"]]
        assert sample["png"].size == (row["width"], row["height"])
        assert sample["json"]["bucket"] == row["bucket"]
        assert isinstance(sample["txt"], str)
        seen.append(sample["__key__"])
    assert seen == list(table)


def test_wids_opens_the_dataset_by_its_shard_index(messy, tmp_path: Path) -> None:
    """webdataset's indexed reader, `wids.ShardListDataset`, opens DATA/wids-index.json: same samples, same order
    as the per-sample table, each decodable."""
    import wids

    _, _, out = messy
    table = fmt.load_sample_table(str(out)).to_pylist()
    ds = wids.ShardListDataset(str(out / fmt.WIDS_INDEX_NAME), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == len(table) == fmt.load_manifest(str(out))["num_samples"]
    for i in (0, len(table) // 2, len(table) - 1):
        sample = ds[i]
        assert sample["__key__"] == table[i]["key"]
        assert sample[".png"].size == (table[i]["width"], table[i]["height"])


def test_output_does_not_depend_on_worker_count_and_rerun_is_a_noop(messy, tmp_path: Path) -> None:
    inp, _, out = messy
    report = build(inp, tmp_path / "one", workers=1)
    assert report.exit_code == EXIT_OK
    assert read_dir(tmp_path / "one") == read_dir(out)
    again = build(inp, tmp_path / "one", workers=1)
    assert again.exit_code == EXIT_OK and "nothing to do" in again.message
    other = build(inp, tmp_path / "one", workers=1, format="jpg")
    assert other.exit_code == EXIT_FATAL and "use a new OUTPUT" in other.message


def test_strict_and_nothing_usable(messy, tmp_path: Path) -> None:
    inp, _, _ = messy
    assert build(inp, tmp_path / "strict", strict=True).exit_code == EXIT_STRICT
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_bytes(b"hello")
    report = build(bad, tmp_path / "none")
    assert report.exit_code == EXIT_NOTHING_WRITTEN and report.skipped == {"zero_byte": 1, "not_an_image": 1}


def test_caption_tables(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(photo(name)).save(imgs / f"{name}.jpg", quality=90)
    rows = [("imgs/astronaut.jpg", "an astronaut"), ("imgs/coffee.jpg", "coffee, with a comma"), ("imgs/missing.jpg", "gone"), ("imgs/chelsea.jpg", None)]
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        w.writerows([(p, c or "") for p, c in rows])
    with open(tmp_path / "t.csv", "ab") as f:
        f.write(b"imgs/rocket.jpg,caf\xe9\n")  # latin-1 caption: that row only is skipped
    lines = [json.dumps({"path": p, "caption": c}) for p, c in rows] + ["{not json"]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_path": [p for p, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "t.parquet")

    for table, extra in (("t.csv", {"bad_caption_encoding": 1}), ("t.jsonl", {"bad_row": 1}), ("t.parquet", {})):
        out = tmp_path / f"out-{table}"
        report = build(tmp_path / table, out)
        assert report.exit_code == EXIT_OK, report.message
        assert report.written == 3 and report.skipped == {"unreadable": 1, **extra}, (table, report.message)
        caps = [fmt.read_sample_bytes(str(out), r)["txt"].decode() for r in fmt.load_sample_table(str(out)).to_pylist()]
        assert caps == ["an astronaut", "coffee, with a comma", ""]


def test_img2dataset_tars_are_accepted(tmp_path: Path) -> None:
    samples = [(jpeg_bytes(Image.fromarray(photo(n))), f"caption {n}") for n in ("astronaut", "coffee", "rocket", "chelsea", "camera")]
    samples.append((b"", "an empty image"))
    write_img2dataset_tars(tmp_path / "i2d", samples, per_tar=4)
    out = tmp_path / "out"
    report = build(tmp_path / "i2d", out)
    assert report.exit_code == EXIT_OK and report.written == 5 and report.skipped == {"zero_byte": 1}
    rows = fmt.load_sample_table(str(out)).to_pylist()
    metas = [json.loads(fmt.read_sample_bytes(str(out), r)["json"]) for r in rows]
    assert [fmt.read_sample_bytes(str(out), r)["txt"].decode() for r in rows] == [f"caption {n}" for n in ("astronaut", "coffee", "rocket", "chelsea", "camera")]
    assert metas[0]["source"].endswith("00000.tar#000000000") and metas[0]["url"].startswith("https://example.invalid/")
    # The brace syntax webdataset users already know selects the same tars.
    report = build(f"{tmp_path}/i2d/{{00000..00001}}.tar", tmp_path / "out2")
    assert report.written == 5


def test_cli_help_and_exit_codes(messy, tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "orchestration.cli", "prep"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    helptext = subprocess.run(exe + ["shards", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    for flag in ("--resolution", "--shard-size", "--workers", "--strict", "--ray-address", "exit codes"):
        assert flag in helptext
    inp, _, _ = messy
    proc = subprocess.run(exe + ["shards", str(inp), str(tmp_path / "o"), "--resolution", "256", "--strict", "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == EXIT_STRICT and "--strict" in proc.stderr


@pytest.mark.integration
def test_ray_runner_writes_the_same_bytes(messy, tmp_path: Path) -> None:
    inp, _, out = messy
    cfg = BuildConfig(str(inp), str(tmp_path / "ray"), ImageSpec(buckets=BUCKETS), 4)
    report = build_shards(cfg, ray_address="local", show_progress=False, log=lambda _: None)
    assert report.exit_code == EXIT_OK
    assert read_dir(tmp_path / "ray") == read_dir(out)
