"""RankLoader on real shards: plan order, world-size/worker independence, exact resume, corrupt shards skipped."""
from __future__ import annotations

import itertools
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from data_prep.reader import DatasetIndex, read_cached
from orchestration.data_plan import DataSection, DataState, plan_epoch
from orchestration.cli import main as cli_main
from orchestration.loader import RankLoader, UnreadableBucketError

pytestmark = pytest.mark.timeout(120)

G = 4
# (world_size, micro_batch, grad_accum) with world_size × micro × accum = G
LAYOUTS = [(1, 2, 2), (2, 1, 2), (4, 1, 1)]
N_STEPS = 9


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return build_dataset(tmp_path_factory.mktemp("data"))


def build_dataset(root: Path) -> str:
    """scikit-image's photos → `asymflow prep shards` (64 px, 4 per shard) → `asymflow prep cache` (tiny model)."""
    import skimage

    source, data_dir = root / "photos", root / "data"
    source.mkdir()
    for photo in Path(skimage.__file__).parent.joinpath("data").iterdir():
        if photo.suffix in (".png", ".jpg"):
            shutil.copy(photo, source)
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    assert cli_main(["prep", "shards", str(source), str(data_dir), "--resolution", "64", "--aspect-ratios", "1:1,4:3,3:4",
                     "--shard-size", "4", "--workers", "1", "--no-progress"]) == 0
    assert cli_main(["prep", "cache", str(data_dir), "--config", str(config)]) == 0
    return str(data_dir)


def loader(data_dir: str, rank: int, layout: tuple[int, int, int], **kw) -> RankLoader:
    world_size, micro, accum = layout
    section = DataSection(path=data_dir, window_shards=2, **{k: v for k, v in kw.items() if k != "state"})
    return RankLoader(DatasetIndex.open(data_dir), section, rank=rank, world_size=world_size, micro_batch=micro,
                      grad_accum=accum, global_batch=G, state=kw.get("state"))


def global_keys(data_dir: str, layout: tuple[int, int, int], n_steps: int = N_STEPS, **kw) -> list[list[str]]:
    """Per step, the keys of all ranks concatenated in rank order (ranks run one after another here)."""
    per_rank = []
    for rank in range(layout[0]):
        with loader(data_dir, rank, layout, **kw) as it:
            per_rank.append([[k for m in step for k in m["keys"]] for step in itertools.islice(it, n_steps)])
    return [sum((r[i] for r in per_rank), []) for i in range(n_steps)]


def planned_keys(data_dir: str, n_steps: int = N_STEPS) -> list[list[str]]:
    index = DatasetIndex.open(data_dir)
    keys = index.table.column("key").to_pylist()
    batches = itertools.chain.from_iterable(plan_epoch(index.table, 0, e, G, window_shards=2) for e in itertools.count())
    return [[keys[r] for r in b.rows] for b in itertools.islice(batches, n_steps)]


def test_steps_follow_the_plan_with_stacked_bucket_homogeneous_tensors(dataset):
    index = DatasetIndex.open(dataset)
    bucket_of = dict(zip(index.table.column("key").to_pylist(), index.table.column("bucket").to_pylist()))
    with loader(dataset, 0, (1, 2, 2)) as it:
        assert it.steps_per_epoch < N_STEPS, "the test should cross an epoch boundary"
        steps = list(itertools.islice(it, N_STEPS))
        assert it.state() == DataState(epoch=N_STEPS // it.steps_per_epoch, batches_done=N_STEPS % it.steps_per_epoch,
                                       seed=0, manifest_hash=index.manifest_hash, global_batch=G)
        assert it.data_wait_seconds > 0 and it.replaced_samples == 0 and it.corrupt_reads == 0
        assert list(it.keys_consumed) == planned_keys(dataset)
    assert not [t for t in threading.enumerate() if t.name.startswith("loader-r")], "close() must stop the readers"
    for step in steps:
        assert len(step) == 2
        (bucket,) = {bucket_of[k] for m in step for k in m["keys"]}
        w, h = (int(v) for v in bucket.split("x"))
        for m in step:
            assert m["images"].shape == (2, 3, h, w) and m["images"].dtype == torch.float32
            assert m["images"].min() >= -1 and m["images"].max() <= 1
            assert m["latents"].shape == (2, 128, h // 16, w // 16) and m["latents"].dtype == torch.float32
            assert m["text_embeds"].ndim == 3 and m["text_embeds"].shape[0] == 2
            assert m["text_embeds"].dtype == torch.bfloat16  # half the bytes of fp32 to move, and exact:
    key = steps[0][0]["keys"][0]  # the bf16 cache's values survive the bf16 batch bit for bit
    row = next(i for i in range(len(index)) if index.row(i)["key"] == key)
    assert torch.equal(steps[0][0]["text_embeds"][0].float(), read_cached(index, index.row(row))["text_embeds"])


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("workers", [0, 3])
def test_order_is_independent_of_world_size_and_loader_workers(dataset, layout, workers):
    assert global_keys(dataset, layout, loader_workers=workers) == planned_keys(dataset)


def test_resume_from_state_continues_exactly_with_same_and_other_world_size(dataset):
    reference = planned_keys(dataset)
    k = 3
    with loader(dataset, 0, (2, 1, 2)) as it:
        list(itertools.islice(it, k))
        saved = DataState.model_validate_json(it.state().model_dump_json())
    for layout in [(2, 1, 2), (1, 2, 2), (4, 1, 1)]:
        assert global_keys(dataset, layout, n_steps=N_STEPS - k, state=saved) == reference[k:]


def test_resume_refuses_another_dataset_or_global_batch(dataset):
    with loader(dataset, 0, (1, 2, 2)) as it:
        good = it.state()
    with pytest.raises(ValueError, match="manifest hash"):
        loader(dataset, 0, (1, 2, 2), state=good.model_copy(update={"manifest_hash": "0" * 64}))
    with pytest.raises(ValueError, match="global batch is 8"):
        loader(dataset, 0, (1, 2, 2), state=good.model_copy(update={"global_batch": 8}))
    with pytest.raises(ValueError, match=r"global batch 4 is not divisible by .* 3 × 1 × 1 = 3"):
        loader(dataset, 0, (3, 1, 1))


def corrupt_copy(dataset: str, root: Path) -> tuple[str, str]:
    """A copy of the dataset whose second image shard is garbage of the same size; returns (dir, shard)."""
    data_dir = str(root / "corrupt")
    shutil.copytree(dataset, data_dir)
    shard = DatasetIndex.open(data_dir).manifest["shards"][1]["name"]
    path = Path(data_dir, shard)
    path.write_bytes(os.urandom(path.stat().st_size))
    return data_dir, shard


def test_corrupt_shard_is_skipped_deterministically_with_a_count_and_no_hang(dataset, tmp_path):
    data_dir, shard = corrupt_copy(dataset, tmp_path)
    index = DatasetIndex.open(data_dir)
    bad = {r["key"] for r in index.table.to_pylist() if r["shard"] == shard}
    bucket_of = dict(zip(index.table.column("key").to_pylist(), index.table.column("bucket").to_pylist()))

    with loader(data_dir, 0, (1, 2, 2), loader_workers=2) as it:
        steps = [[k for m in step for k in m["keys"]] for step in itertools.islice(it, N_STEPS)]
        assert it.replaced_samples > 0 and it.corrupt_reads > 0
        assert {r.shard for r in it.replacements} == {shard} and all(r.key in bad for r in it.replacements)
        assert it.replaced_samples == sum(k in bad for k in itertools.chain(*planned_keys(data_dir)))
    for step in steps:
        assert len(step) == G and not bad & set(step)
        assert len({bucket_of[k] for k in step}) == 1
    # Stand-ins are chosen on the global plan: other world sizes and thread counts train on the same keys.
    assert global_keys(data_dir, (2, 1, 2), loader_workers=0) == steps
    assert global_keys(data_dir, (4, 1, 1), loader_workers=3) == steps


def test_a_dataset_with_nothing_readable_fails_loudly(dataset, tmp_path):
    data_dir = str(tmp_path / "dead")
    shutil.copytree(dataset, data_dir)
    for shard in DatasetIndex.open(data_dir).manifest["shards"]:
        Path(data_dir, shard["name"]).unlink()
    with loader(data_dir, 0, (1, 2, 2)) as it, pytest.raises(UnreadableBucketError, match="no readable sample left"):
        next(it)
