"""`prep verify` catches a flipped byte and a missing shard (naming them); `prep stats` prints the histograms and writes a PNG plot."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_prep import format as fmt
from data_prep.cli import add_prep_commands
from data_prep.corpus import build_clean_corpus
from data_prep.images import ImageSpec, make_buckets
from data_prep.shards import BuildConfig, build_shards
from data_prep.stats import dataset_stats
from data_prep.verify import verify_dataset


def prep(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="asymflow prep")
    add_prep_commands(parser)
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    build_clean_corpus(root / "in")
    cfg = BuildConfig(str(root / "in"), str(root / "out"), ImageSpec(buckets=make_buckets(256)), shard_size=3)
    assert build_shards(cfg, workers=1, show_progress=False).exit_code == 0
    return root / "out"


def test_verify_passes_on_a_fresh_dataset(dataset: Path) -> None:
    problems, summary = verify_dataset(str(dataset), full=True, show_progress=False)
    assert problems == [] and summary.endswith("OK")
    assert prep("verify", str(dataset), "--full", "--no-progress") == 0


def test_verify_names_a_flipped_byte_and_a_missing_shard(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shards = [s["name"] for s in fmt.load_manifest(str(broken))["shards"]]
    flipped, missing = shards[1], shards[-1]
    data = bytearray((broken / flipped).read_bytes())
    data[len(data) // 3] ^= 0x01
    (broken / flipped).write_bytes(bytes(data))
    (broken / missing).unlink()

    problems, _ = verify_dataset(str(broken), show_progress=False)
    assert len(problems) == 2
    assert problems[0].startswith(f"{flipped}: sha256 mismatch")
    assert problems[1] == f"{missing}: missing"
    assert prep("verify", str(broken), "--no-progress") == 1


def test_verify_full_decodes_samples(dataset: Path, tmp_path: Path) -> None:
    """A shard whose bytes match its manifest entry but whose table lies about a sample is caught by --full."""
    import pyarrow.parquet as pq

    broken = tmp_path / "lying-table"
    shutil.copytree(dataset, broken)
    table = fmt.load_sample_table(str(broken))
    rows = table.to_pylist()
    rows[0]["width"], rows[0]["height"] = rows[0]["height"] + 16, rows[0]["width"]
    pq.write_table(table.from_pylist(rows, schema=table.schema), broken / fmt.SAMPLES_NAME)
    assert verify_dataset(str(broken), show_progress=False)[0] == []
    problems, _ = verify_dataset(str(broken), full=True, show_progress=False)
    assert len(problems) == 1 and problems[0].startswith(f"{rows[0]['shard']}: sample {rows[0]['key']}")


def test_stats_plot_shows_skip_reasons_with_integer_count_ticks(dataset: Path) -> None:
    """The plot `prep stats --help` promises: a skip-reason panel with the manifest's counts; count axes have only
    whole-number ticks."""
    import numpy as np

    from data_prep.stats import stats_figure

    manifest = fmt.load_manifest(str(dataset))
    manifest["totals"]["skipped_by_reason"] = {"too_small": 3, "decode_error": 1}
    fig = stats_figure(manifest, sorted(manifest["buckets"].items()), np.array([1e5, 2e5]), np.array([0.5, 1.5]))
    axes = fig.axes
    assert [a.get_title() for a in axes][3] == "skip reasons (skipped.jsonl)"
    assert [p.get_height() for p in axes[3].patches] == [3, 1]
    for ax in axes:
        ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_stats_prints_histogram_and_writes_png(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, plot = dataset_stats(str(dataset), plot=str(tmp_path / "stats.png"))
    manifest = fmt.load_manifest(str(dataset))
    for bucket, count in manifest["buckets"].items():
        assert any(line.split()[:2] == [bucket, str(count)] for line in text.splitlines())
    assert "stored sample size" in text and "source image size" in text
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 800
    assert prep("stats", str(dataset)) == 0
    assert (dataset / "stats.png").exists() and "buckets" in capsys.readouterr().out
