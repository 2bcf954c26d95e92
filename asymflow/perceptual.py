"""Perceptual image distances returning spatial maps: LPIPS-VGG from local weights and a tiny in-code conv net."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# VGG16 `features` layout (torchvision indices); ints are conv widths, "M" a 2×2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input scaling layer: x ↦ (x − shift)/scale for images in [−1,1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class ImageDistance(Protocol):
    """(pred, target) RGB images in [−1,1] [B,3,H,W] -> per-pixel distance map [B,1,H,W] (differentiable in pred)."""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


def lpips_map(
    feats_pred: Sequence[torch.Tensor], feats_target: Sequence[torch.Tensor], heads: Sequence[nn.Module], size: tuple[int, int]
) -> torch.Tensor:
    """LPIPS spatial map: Σ_l upsample( head_l( (f̂_l(pred) − f̂_l(target))² ) ) -> [B,1,H,W].

    f̂ = f / (‖f‖_channels + 1e-10) (unit-norm features per pixel); head_l is a 1×1 conv to one channel;
    bilinear upsampling to `size` as in lpips' spatial mode.
    """
    total = None
    for fp, ft, head in zip(feats_pred, feats_target, heads, strict=True):
        fp = fp / (fp.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        ft = ft / (ft.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        layer = F.interpolate(head((fp - ft) ** 2), size=size, mode="bilinear", align_corners=False)
        total = layer if total is None else total + layer
    return total


class _TappedFeatures(nn.Module):
    """Runs a Sequential trunk and returns the activations after the listed layer indices."""

    def __init__(self, features: nn.Sequential, taps: Sequence[int]):
        super().__init__()
        self.features = features
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
                if len(out) == len(self.taps):
                    break
        return out


class _Distance(nn.Module):
    """Frozen feature trunk + non-negative 1×1 heads, combined by `lpips_map`; computes in the module dtype."""

    def __init__(self, trunk: _TappedFeatures, channels: Sequence[int], shift: Sequence[float], scale: Sequence[float]):
        super().__init__()
        self.trunk = trunk
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1))

    def _freeze(self) -> _Distance:
        self.requires_grad_(False)
        return self.eval()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"expected two RGB batches [B,3,H,W] of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        # Two passes: the target's features without autograd (it is a constant: the objective makes it under no_grad),
        # so backward keeps only the prediction's activations — one pass over cat([pred, target]) kept both halves
        # (issue #12). A target that does require grad still gets its graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            feats_target = self._features(target)
        return lpips_map(self._features(pred), feats_target, self.lins, tuple(pred.shape[-2:])).float()

    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk((image.to(self.shift.dtype) - self.shift) / self.scale)


def _vgg16_features() -> nn.Sequential:
    # Hand-written because torchvision is not a dependency; the indices match torchvision's vgg16().features
    # so its state-dict keys `features.{i}.weight` load unchanged.
    layers: list[nn.Module] = []
    in_ch = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = int(item)
    return nn.Sequential(*layers)


def _canonical_lpips_key(key: str) -> str:
    """Map the key layouts we accept onto ours: torchvision `features.i.*`, lpips `net.sliceN.i.*` and `linK.model.1.weight`."""
    key = re.sub(r"^(?:net\.slice\d+|vgg\.features|features)\.(\d+)\.", r"trunk.features.\1.", key)
    key = re.sub(r"^lins?\.?(\d+)\.model\.1\.", r"lins.\1.", key)
    key = re.sub(r"^lin(\d+)\.", r"lins.\1.", key)
    return key.replace("scaling_layer.", "")


class LPIPSDistance(_Distance):
    """LPIPS-VGG (v0.1) spatial distance built from a local safetensors file; never downloads anything."""

    def __init__(self):
        super().__init__(_TappedFeatures(_vgg16_features(), LPIPS_TAPS), LPIPS_CHANNELS, LPIPS_SHIFT, LPIPS_SCALE)

    @classmethod
    def from_local_weights(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> LPIPSDistance:
        """Load VGG16 conv weights + the five LPIPS linear heads from one safetensors file.

        Accepted keys: `features.{i}.weight|bias` (torchvision vgg16) or `net.slice{n}.{i}.*` (lpips module),
        and `lin{k}.model.1.weight` (lpips heads) or `lins.{k}.weight`; optional `scaling_layer.shift|scale`.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weights not found at {path}; make them with `asymflow prep lpips --vgg16 FILE --out {path}` "
                "(nothing is downloaded), or use the 'tiny'/'none' image distance"
            )
        model = cls()
        state = {_canonical_lpips_key(k): v for k, v in load_file(str(path)).items()}
        own = model.state_dict()
        required = {k for k in own if k not in ("shift", "scale")}
        missing = sorted(required - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"{path} is not an LPIPS-VGG weight file: missing {missing[:6]}, unexpected {unexpected[:6]}")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"{path}: shape mismatch for {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad[:6]]}")
        model.load_state_dict(state, strict=False)
        return model.to(dtype)._freeze()


class TinyConvDistance(_Distance):
    """A small deterministic LPIPS-shaped distance (two conv stages, mean-over-channel heads) for tests and tiny runs."""

    def __init__(self, seed: int = 0, channels: tuple[int, int] = (8, 16)):
        c1, c2 = channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trunk = nn.Sequential(
                nn.Conv2d(3, c1, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
                nn.ReLU(),
            )
        super().__init__(_TappedFeatures(trunk, (1, 3)), channels, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        for lin, c in zip(self.lins, channels):
            nn.init.constant_(lin.weight, 1.0 / c)  # non-negative heads, as LPIPS' trained ones
        self._freeze()


def build_image_distance(
    kind: Literal["none", "tiny", "lpips"], weights_path: str | Path | None = None, seed: int = 0
) -> ImageDistance | None:
    """The perceptual distance named in the config: None, a TinyConvDistance, or LPIPS-VGG from local weights."""
    if kind == "none":
        return None
    if kind == "tiny":
        return TinyConvDistance(seed)
    if kind == "lpips":
        if weights_path is None:
            raise ValueError("image distance 'lpips' needs weights_path (a local safetensors file)")
        return LPIPSDistance.from_local_weights(weights_path)
    raise ValueError(f"unknown image distance {kind!r}; expected 'none', 'tiny' or 'lpips'")
