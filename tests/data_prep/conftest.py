"""Fixtures shared by the data-prep test modules."""
from __future__ import annotations

from pathlib import Path

import pytest

# Bucket sides are multiples of 32, Sana's pixel patch (DC-AE 32× × latent patch 1), so every family can cache the
# same shards; two aspect buckets (64×64, 96×64) exercise same-bucket batching.
FAMILY_BUCKETS = "64x64,96x64,64x96"


@pytest.fixture(scope="session")
def family_shards(tmp_path_factory) -> Path:
    """Image shards of the clean scikit-image corpus (12 samples, 4 per shard: 3 shards) built once by `prep shards`
    for the family data-prep tests (tests/data_prep/test_family_cache.py, test_family_prep.py); copy before caching."""
    from data_prep.corpus import build_clean_corpus
    from tests.data_prep.test_cache import run_cli

    base = tmp_path_factory.mktemp("family-shards")
    build_clean_corpus(base / "corpus")
    data = base / "data"
    shards = run_cli("prep", "shards", str(base / "corpus"), str(data), "--buckets", FAMILY_BUCKETS,
                     "--shard-size", "4", "--workers", "1", "--no-progress")
    assert shards.returncode == 0, shards.stderr
    return data
