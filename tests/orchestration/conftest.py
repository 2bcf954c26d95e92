"""Fixtures shared by the orchestration integration modules."""
from __future__ import annotations

from pathlib import Path

import pytest


def _write_images(folder: Path) -> None:
    """A few photos bundled with scikit-image, two crops each (no downloads)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True)
    k = 0
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "cat", "camera", "moon"):
        a = getattr(skimage.data, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        im = Image.fromarray(a[..., :3].astype(np.uint8))
        w, h = im.size
        for crop in range(2):
            im.crop((crop * w // 4, 0, crop * w // 4 + 3 * w // 4, h)).save(folder / f"{k:03d}.png")
            (folder / f"{k:03d}.txt").write_text(f"a photo of {name}, crop {crop}")
            k += 1


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    """Shards (32×32 bucket) + latent/text cache + Procrustes subspace for the tiny model, built by data_prep once
    per session; every test only reads it."""
    from asymflow.components import BaseModelConfig
    from data_prep.cache import build_cache
    from data_prep.images import ImageSpec
    from data_prep.shards import BuildConfig, build_shards
    from data_prep.subspace_job import fit_subspace

    root = tmp_path_factory.mktemp("data")
    _write_images(root / "images")
    out = str(root / "data")
    report = build_shards(BuildConfig(input=str(root / "images"), output=out, image=ImageSpec(buckets=((32, 32),)),
                                      shard_size=6), workers=1, show_progress=False)
    assert report.exit_code == 0, report.message
    model = BaseModelConfig(kind="tiny", seed=0)
    build_cache(out, model, batch_size=4, progress=False)
    fit_subspace(out, model, num_images=16, progress=False)
    return out
