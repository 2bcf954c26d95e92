"""Subspace fits (spec §4): streaming float64 PCA and Procrustes accumulators, and the subspace artifact."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .parameterisation import check_basis
from .patching import FeatureOrder

ARTIFACT_VERSION = 1


class PCAFit:
    """Top-r eigenvectors of the uncentred Gram G = Σ x xᵀ of pixel tokens (spec §4.1); s = 1."""

    def __init__(self, rank: int):
        if rank < 0:
            raise ValueError(f"rank must be ≥ 0, got {rank}")
        self.rank = rank
        self.gram: torch.Tensor | None = None
        self.num_tokens = 0

    def update(self, pixel_tokens: torch.Tensor) -> None:
        """Accumulate tokens [n,D] (any float dtype; summed in float64)."""
        if pixel_tokens.ndim != 2:
            raise ValueError(f"pixel_tokens must be [n, D], got {tuple(pixel_tokens.shape)}")
        x = pixel_tokens.detach().to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("pixel_tokens contain NaN or inf")
        if self.gram is None:
            if self.rank > x.shape[1]:
                raise ValueError(f"rank {self.rank} exceeds the patch dimension {x.shape[1]}")
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.gram.shape[0]:
            raise ValueError(f"pixel token dim {x.shape[1]} differs from earlier updates ({self.gram.shape[0]})")
        self.gram += x.T @ x
        self.num_tokens += x.shape[0]

    def merge(self, other: PCAFit) -> None:
        """Add another accumulator's sums (e.g. from another worker)."""
        if other.gram is None:
            return
        if self.gram is None:
            self.gram = other.gram.clone()
        else:
            self.gram += other.gram
        self.num_tokens += other.num_tokens

    def solve(self) -> torch.Tensor:
        """basis [D,r] float64, columns = eigenvectors of the r largest eigenvalues."""
        if self.gram is None:
            raise ValueError("PCAFit.solve() called before any update()")
        _, vectors = torch.linalg.eigh(self.gram)  # ascending eigenvalues
        return vectors[:, vectors.shape[1] - self.rank :].flip(-1).contiguous()


class ProcrustesFit:
    """Orthonormal B [D,r] and scale s with pixel tokens ≈ s·B·z (spec §4.2), accumulated in float64."""

    def __init__(self) -> None:
        self.cross: torch.Tensor | None = None  # K = Zᵀ X, [r, D]
        self.gram: torch.Tensor | None = None  # G = Xᵀ X, [D, D]
        self.latent_energy = torch.zeros((), dtype=torch.float64)  # E_z = Σ‖z‖²
        self.num_tokens = 0

    def update(self, latent_tokens: torch.Tensor, pixel_tokens: torch.Tensor) -> None:
        """Accumulate co-located token pairs: latent [n,r], pixel [n,D]."""
        if latent_tokens.ndim != 2 or pixel_tokens.ndim != 2:
            raise ValueError(
                f"expected latent [n,r] and pixel [n,D] tokens, got {tuple(latent_tokens.shape)} "
                f"and {tuple(pixel_tokens.shape)}"
            )
        if latent_tokens.shape[0] != pixel_tokens.shape[0]:
            raise ValueError(
                f"{latent_tokens.shape[0]} latent tokens but {pixel_tokens.shape[0]} pixel tokens; they must pair up"
            )
        z = latent_tokens.detach().to(torch.float64)
        x = pixel_tokens.detach().to(device=z.device, dtype=torch.float64)
        if not (torch.isfinite(z).all() and torch.isfinite(x).all()):
            raise ValueError("tokens contain NaN or inf")
        r, d = z.shape[1], x.shape[1]
        if r > d:
            raise ValueError(f"latent rank {r} exceeds the pixel patch dimension {d}")
        if self.cross is None:
            self.cross = torch.zeros(r, d, dtype=torch.float64, device=z.device)
            self.gram = torch.zeros(d, d, dtype=torch.float64, device=z.device)
            self.latent_energy = self.latent_energy.to(z.device)
        elif self.cross.shape != (r, d):
            raise ValueError(f"token dims ({r}, {d}) differ from earlier updates {tuple(self.cross.shape)}")
        self.cross += z.T @ x
        self.gram += x.T @ x
        self.latent_energy += (z * z).sum()
        self.num_tokens += z.shape[0]

    def merge(self, other: ProcrustesFit) -> None:
        if other.cross is None:
            return
        if self.cross is None:
            self.cross, self.gram = other.cross.clone(), other.gram.clone()
            self.latent_energy = other.latent_energy.clone()
        else:
            self.cross += other.cross
            self.gram += other.gram
            self.latent_energy += other.latent_energy
        self.num_tokens += other.num_tokens

    def solve(self) -> tuple[torch.Tensor, float]:
        """B = V_r U_rᵀ from the thin SVD K = U Σ Vᵀ; s = sqrt(tr(BᵀGB)/E_z) (energy matching)."""
        if self.cross is None:
            raise ValueError("ProcrustesFit.solve() called before any update()")
        u, _, vh = torch.linalg.svd(self.cross, full_matrices=False)  # u [r,r], vh [r,D]
        basis = vh.T @ u.T  # [D, r]
        energy = torch.trace(basis.T @ self.gram @ basis)
        scale = torch.sqrt(energy / self.latent_energy.clamp_min(1e-12)).clamp_min(1e-12)
        return basis.contiguous(), float(scale)


def basis_hash(basis: torch.Tensor) -> str:
    """sha256 of the fp32 little-endian bytes of the basis, as stored."""
    data = basis.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class SubspaceArtifact:
    """Basis B [D,r] and scale s with what they were fitted for; stored as one safetensors file."""

    basis: torch.Tensor
    scale: float
    patch_size: int
    feature_order: FeatureOrder = "channel_first"
    channels: int = 3
    method: str = "procrustes"
    manifest_hash: str = ""
    num_tokens: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.basis = self.basis.detach().to(torch.float32).contiguous().cpu()
        self.scale = float(self.scale)
        check_basis(self.basis, dim=self.channels * self.patch_size**2)
        if not self.scale > 0:
            raise ValueError(f"subspace scale must be positive, got {self.scale}")

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def save(self, path: str | Path) -> None:
        """Write `proj_mat_p{p}` (fp32 [D,r]) and `scale_p{p}` (fp32 scalar) plus string metadata."""
        p = self.patch_size
        meta = {
            "format": "asymflow-subspace",
            "version": str(ARTIFACT_VERSION),
            "patch_size": str(p),
            "rank": str(self.rank),
            "channels": str(self.channels),
            "feature_order": self.feature_order,
            "method": self.method,
            "basis_sha256": basis_hash(self.basis),
            "manifest_hash": self.manifest_hash,
            "num_tokens": str(self.num_tokens),
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        tensors = {f"proj_mat_p{p}": self.basis, f"scale_p{p}": torch.tensor(self.scale, dtype=torch.float32)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        patch_size: int | None = None,
        rank: int | None = None,
        feature_order: FeatureOrder | None = None,
    ) -> SubspaceArtifact:
        """Load and validate; refuses an artifact whose patch size / rank / feature order differ from the model's."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "asymflow-subspace":
            raise ValueError(f"{path} is not an asymflow subspace artifact (metadata 'format' missing)")
        p = int(meta["patch_size"])
        if patch_size is not None and p != patch_size:
            raise ValueError(f"subspace artifact {path} is for patch size {p}, but the model uses patch size {patch_size}")
        if feature_order is not None and meta["feature_order"] != feature_order:
            raise ValueError(
                f"subspace artifact {path} uses feature order {meta['feature_order']!r}, the model expects {feature_order!r}"
            )
        tensors = load_file(str(path))
        basis = tensors[f"proj_mat_p{p}"]
        if rank is not None and basis.shape[1] != rank:
            raise ValueError(f"subspace artifact {path} has rank {basis.shape[1]}, but the model expects rank {rank}")
        if basis_hash(basis) != meta["basis_sha256"]:
            raise ValueError(f"subspace artifact {path} is corrupt: basis hash does not match its metadata")
        return cls(
            basis=basis,
            scale=float(tensors[f"scale_p{p}"]),
            patch_size=p,
            feature_order=meta["feature_order"],  # type: ignore[arg-type]
            channels=int(meta["channels"]),
            method=meta["method"],
            manifest_hash=meta["manifest_hash"],
            num_tokens=int(meta["num_tokens"]),
            extra=json.loads(meta.get("extra", "{}")),
        )
