"""Spec §14 #8–9: Procrustes and PCA fits; the subspace artifact's validation."""
import pytest
import torch

from asymflow import PCAFit, ProcrustesFit, SubspaceArtifact
from tests.asymflow.helpers import random_basis


def _synthetic(n=4000, d=768, r=128, s_true=2.0, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    b_true = random_basis(d, r, seed=seed + 1)
    z = torch.randn(n, r, generator=g, dtype=torch.float64)
    x = s_true * z @ b_true.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z, x, b_true


def test_procrustes_recovers_basis_and_scale():
    z, x, b_true = _synthetic()
    fit = ProcrustesFit()
    for i in range(0, len(z), 1000):  # streaming in chunks equals one big update
        fit.update(z[i : i + 1000], x[i : i + 1000])
    basis, scale = fit.solve()
    assert (basis.T @ basis - torch.eye(128, dtype=torch.float64)).abs().max() < 1e-10
    # noise 1e-3 on D dims vs signal 2·|z|: basis and scale are recovered to ~1e-3
    assert (basis - b_true).abs().max() < 1e-3
    assert abs(scale - 2.0) < 1e-3
    assert fit.num_tokens == 4000


def test_procrustes_merge_equals_single_stream():
    z, x, _ = _synthetic(n=600, d=48, r=8)
    one, a, b = ProcrustesFit(), ProcrustesFit(), ProcrustesFit()
    one.update(z, x)
    a.update(z[:250], x[:250])
    b.update(z[250:], x[250:])
    a.merge(b)
    assert torch.allclose(one.solve()[0], a.solve()[0], atol=1e-12)


def test_procrustes_rank_larger_than_dim_raises():
    with pytest.raises(ValueError, match="exceeds"):
        ProcrustesFit().update(torch.randn(5, 10), torch.randn(5, 8))


def test_pca_top_eigenspace():
    g = torch.Generator().manual_seed(0)
    # anisotropic data: variances decay so the top-r eigenspace is well separated
    scales = torch.logspace(1, -2, 48, dtype=torch.float64)
    x = torch.randn(5000, 48, generator=g, dtype=torch.float64) * scales
    rot = random_basis(48, 48, seed=3)
    x = x @ rot.T
    fit = PCAFit(rank=8)
    fit.update(x[:2500])
    fit.update(x[2500:])
    basis = fit.solve()
    assert basis.shape == (48, 8)
    assert (basis.T @ basis - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-10
    gram = x.T @ x
    _, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -8:]
    assert (basis @ basis.T - top @ top.T).abs().max() < 1e-10  # same span (projectors agree)


def test_pca_rank_too_large():
    with pytest.raises(ValueError, match="exceeds"):
        PCAFit(rank=49).update(torch.randn(3, 48))


def test_artifact_round_trip_and_validation(tmp_path):
    basis = random_basis(768, 128, dtype=torch.float32)
    art = SubspaceArtifact(basis=basis, scale=2.25, patch_size=16, manifest_hash="abc", num_tokens=10)
    path = tmp_path / "subspace.safetensors"
    art.save(path)
    back = SubspaceArtifact.load(path, patch_size=16, rank=128, feature_order="channel_first")
    assert torch.equal(back.basis, basis) and back.scale == 2.25 and back.manifest_hash == "abc"
    with pytest.raises(ValueError, match="patch size 16, but the model uses patch size 8"):
        SubspaceArtifact.load(path, patch_size=8)
    with pytest.raises(ValueError, match="rank 128, but the model expects rank 64"):
        SubspaceArtifact.load(path, rank=64)
    with pytest.raises(ValueError, match="feature order"):
        SubspaceArtifact.load(path, feature_order="channel_last")


def test_artifact_refuses_bad_basis():
    with pytest.raises(ValueError, match="not orthonormal"):
        SubspaceArtifact(basis=torch.ones(768, 4), scale=1.0, patch_size=16)
    with pytest.raises(ValueError, match="rows but the patch dimension is 768"):
        SubspaceArtifact(basis=random_basis(192, 4), scale=1.0, patch_size=16)
