"""`prep subspace` end to end: shards → cache → Procrustes/PCA artifact that loads in asymflow."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from asymflow.oklab import oklab_encode
from asymflow.subspace import ProcrustesFit, SubspaceArtifact
from data_prep.cache import CacheMismatchError
from data_prep.reader import DatasetIndex, read_cached, read_image_sample
from data_prep.run_config import load_model_config
from data_prep.subspace_job import fit_subspace
from tests.data_prep.test_cache import TINY_CONFIG, cached_dataset, copy_dataset, run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return cached_dataset(tmp_path_factory.getbasetemp())


def test_cli_writes_a_procrustes_artifact_that_loads_in_asymflow(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    result = run_cli("prep", "subspace", str(data), "--config", TINY_CONFIG)
    assert result.returncode == 0, result.stderr
    index = DatasetIndex.open(str(data))
    artifact = SubspaceArtifact.load(data / "subspace.safetensors", patch_size=16, rank=128, feature_order="channel_first")
    basis = artifact.basis.double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(128, dtype=torch.float64), atol=1e-5, rtol=0)
    assert artifact.method == "procrustes" and artifact.scale > 0
    assert artifact.manifest_hash == index.manifest_hash
    assert artifact.num_tokens == sum((index.row(i)["width"] // 16) * (index.row(i)["height"] // 16) for i in range(len(index)))
    assert artifact.extra["num_images"] == str(len(index)) and artifact.extra["colour"] == "oklab"


def test_procrustes_fit_equals_a_direct_fit_on_the_seeded_sample(dataset: Path, tmp_path: Path) -> None:
    cfg = load_model_config(TINY_CONFIG)
    artifact, path = fit_subspace(str(dataset), cfg, num_images=4, seed=7, output=str(tmp_path / "s.safetensors"), progress=False)
    assert Path(path).exists() and artifact.extra["num_images"] == "4"

    # Recompute by hand: the first 4 rows of the seed-7 permutation, tokens paired by grid position.
    index = DatasetIndex.open(str(dataset))
    fit = ProcrustesFit()
    for i in np.random.default_rng(7).permutation(len(index))[:4]:
        row = index.row(int(i))
        image, _ = read_image_sample(str(dataset), row)
        z = read_cached(index, row)["latents"]  # [128, h, w]
        lab = oklab_encode(image[None])[0]  # [3, 16h, 16w]
        h, w = z.shape[1:]
        x = lab.reshape(3, h, 16, w, 16).permute(1, 3, 0, 2, 4).reshape(h * w, 768)  # channel-first: c·256 + i·16 + j
        fit.update(z.reshape(128, h * w).T, x)
    basis, scale = fit.solve()
    projector = basis @ basis.T
    torch.testing.assert_close(artifact.basis.double() @ artifact.basis.double().T, projector, atol=1e-5, rtol=0)
    assert artifact.scale == pytest.approx(scale, rel=1e-5)

    again, _ = fit_subspace(str(dataset), cfg, num_images=4, seed=7, output=str(tmp_path / "t.safetensors"), progress=False)
    assert torch.equal(again.basis, artifact.basis)
    other, _ = fit_subspace(str(dataset), cfg, num_images=4, seed=8, output=str(tmp_path / "u.safetensors"), progress=False)
    assert not torch.equal(other.basis, artifact.basis)


def test_pca_artifact_is_channel_last_with_unit_scale(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "pca.safetensors"
    fit_subspace(str(dataset), load_model_config(TINY_CONFIG), method="pca", rank=8, output=str(out), progress=False)
    artifact = SubspaceArtifact.load(out, patch_size=16, rank=8, feature_order="channel_last")
    assert artifact.method == "pca" and artifact.scale == 1.0 and artifact.extra["colour"] == "rgb"
    torch.testing.assert_close(artifact.basis.T @ artifact.basis, torch.eye(8), atol=1e-5, rtol=0)


def test_corrupt_samples_are_skipped_and_replaced(dataset: Path, tmp_path: Path) -> None:
    data = copy_dataset(dataset, tmp_path / "data")
    index = DatasetIndex.open(str(data))
    first = index.row(int(np.random.default_rng(2021).permutation(len(index))[0]))
    (data / "cache" / first["cache_shard"]).write_bytes(b"")
    artifact, _ = fit_subspace(str(data), load_model_config(TINY_CONFIG), num_images=2, progress=False)
    assert artifact.extra["num_images"] == "2" and int(artifact.extra["skipped"]) >= 1


def test_procrustes_needs_a_cache_of_the_configured_model(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  kind: tiny\n  seed: 3\n")
    with pytest.raises(CacheMismatchError, match="tiny:seed=3"):
        fit_subspace(str(dataset), load_model_config(str(other)), output=str(tmp_path / "x.safetensors"), progress=False)
    data = copy_dataset(dataset, tmp_path / "data")
    shutil.rmtree(data / "cache")
    with pytest.raises(FileNotFoundError, match="prep cache"):
        fit_subspace(str(data), load_model_config(TINY_CONFIG), progress=False)
