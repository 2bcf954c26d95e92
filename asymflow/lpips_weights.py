"""Build the LPIPS-VGG weight file (`perceptual.weights_path`) from a torchvision VGG16 state dict and the `lpips`
package's v0.1 linear heads, without importing torchvision or lpips (and without downloading anything).

The file written is the `lpips.LPIPS(net='vgg')` module's own state dict in safetensors (`scaling_layer.*`,
`net.slice{n}.{i}.*`, `lin{k}.model.1.weight` and their `lins.{k}.*` aliases), so it loads strictly into lpips itself
as well as into `LPIPSDistance.from_local_weights`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .perceptual import LPIPS_CHANNELS, LPIPS_SCALE, LPIPS_SHIFT, LPIPS_TAPS, VGG16_LAYOUT

HEADS_IN_PACKAGE = "weights/v0.1/vgg.pth"  # inside the lpips package directory (and the wheel, under lpips/)
FORMAT = "lpips-vgg-v0.1"


def vgg16_conv_shapes() -> dict[int, tuple[int, int]]:
    """torchvision `vgg16().features` index of each conv -> (out, in) channels."""
    shapes, index, in_ch = {}, 0, 3
    for item in VGG16_LAYOUT:
        if item == "M":
            index += 1
        else:
            shapes[index] = (int(item), in_ch)
            in_ch = int(item)
            index += 2  # conv, relu
    return shapes


def _slice_of(index: int) -> int:
    """lpips' vgg16 puts features [0,4) in slice1, [4,9) in slice2, ... (cut after each tap)."""
    return 1 + sum(index > tap for tap in LPIPS_TAPS)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path, what: str, member: str | None = None) -> dict[str, torch.Tensor]:
    """A tensor mapping from a safetensors file or a torch `.pth` state dict (loaded with weights_only=True);
    `member` reads that file out of a zip archive (a wheel). Errors are ValueError/FileNotFoundError naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{what} {path}: not a file")
    try:
        if member is not None:
            with zipfile.ZipFile(path) as wheel, wheel.open(member) as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        elif _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except KeyError:
        raise ValueError(f"{what} {path}: the archive has no {member}") from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what} {path}: not a readable safetensors file or torch state dict ({first})") from None
    if isinstance(state, Mapping) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{what} {path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def vgg16_features(state: Mapping[str, torch.Tensor], source: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Conv index -> (weight, bias) in fp32 from a torchvision VGG16 state dict; anything but `features.*` is ignored."""
    expected = vgg16_conv_shapes()
    keys = {f"features.{i}.{p}" for i in expected for p in ("weight", "bias")}
    present = {k for k in state if k.startswith("features.")}
    missing, unexpected = sorted(keys - present, key=_natural), sorted(present - keys, key=_natural)
    if missing or unexpected:
        hint = " (a VGG16 with batch norm or another VGG depth?)" if unexpected and present & keys else ""
        if not present:
            hint = f" (it has no features.* keys at all; first keys: {sorted(state)[:4]})"
        raise ValueError(
            f"{source}: not a torchvision VGG16 state dict{hint}: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    out = {}
    for i, (c_out, c_in) in expected.items():
        w, b = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
        for name, t, shape in ((f"features.{i}.weight", w, (c_out, c_in, 3, 3)), (f"features.{i}.bias", b, (c_out,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, VGG16 has {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{source}: {name} has dtype {t.dtype}, expected floating point weights")
        out[i] = (w.float().contiguous(), b.float().contiguous())
    return out


def lpips_heads(state: Mapping[str, torch.Tensor], source: str) -> list[torch.Tensor]:
    """The five v0.1 VGG heads `lin{k}.model.1.weight` [1, C_k, 1, 1] in fp32, checked non-negative-shaped."""
    out = []
    for k, c in enumerate(LPIPS_CHANNELS):
        key = f"lin{k}.model.1.weight"
        if key not in state:
            raise ValueError(f"{source}: not the lpips package's VGG heads (weights/v0.1/vgg.pth): missing {key}; "
                             f"it has {sorted(state)[:6]}")
        t = state[key]
        if tuple(t.shape) != (1, c, 1, 1):
            raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}, the VGG heads have {(1, c, 1, 1)} "
                             "(the heads of another net, e.g. alex.pth or squeeze.pth?)")
        out.append(t.float().contiguous())
    return out


def default_heads_path() -> Path:
    """`lpips/weights/v0.1/vgg.pth` of the lpips package this Python would import, found without importing it
    (importing lpips imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --heads given and no lpips package is installed in this Python: pass --heads with lpips' "
            "weights/v0.1/vgg.pth or the wheel from `pip download lpips --no-deps`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / HEADS_IN_PACKAGE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed lpips package ({list(spec.submodule_search_locations)}) has no {HEADS_IN_PACKAGE}")


def lpips_state_dict(features: Mapping[int, tuple[torch.Tensor, torch.Tensor]], heads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `lpips.LPIPS(net='vgg')` module's state dict (heads under both of its names)."""
    state = {
        "scaling_layer.shift": torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1),
        "scaling_layer.scale": torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1),
    }
    for i, (w, b) in features.items():
        state[f"net.slice{_slice_of(i)}.{i}.weight"] = w
        state[f"net.slice{_slice_of(i)}.{i}.bias"] = b
    for k, head in enumerate(heads):
        state[f"lin{k}.model.1.weight"] = head
        state[f"lins.{k}.model.1.weight"] = head.clone()  # safetensors stores no shared tensors
    return state


def convert_lpips_weights(vgg16: str | Path, out: str | Path, heads: str | Path | None = None) -> dict[str, str]:
    """Write OUT (safetensors, atomically) from a torchvision VGG16 state dict and lpips' v0.1 VGG heads (`heads`:
    vgg.pth, a safetensors copy, or an lpips wheel; None finds the installed package's). Returns the metadata."""
    from safetensors.torch import save_file

    vgg16, out = Path(vgg16), Path(out)
    heads_path = default_heads_path() if heads is None else Path(heads)
    member = f"lpips/{HEADS_IN_PACKAGE}" if heads_path.suffix == ".whl" else None
    features = vgg16_features(read_state_dict(vgg16, "--vgg16"), str(vgg16))
    head_tensors = lpips_heads(read_state_dict(heads_path, "--heads", member), str(heads_path))
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory (give the file to write)")
    meta = {
        "format": FORMAT,
        "vgg16_source": str(vgg16.resolve()),
        "vgg16_sha256": _sha256(vgg16),
        "heads_source": str(heads_path.resolve()) + (f"!{member}" if member else ""),
        "heads_sha256": _sha256(heads_path),
        "layout": "lpips.LPIPS(net='vgg') state dict; torchvision vgg16 features.{i} = net.slice{n}.{i}",
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(lpips_state_dict(features, head_tensors), str(tmp), metadata=meta)
        os.replace(tmp, out)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _natural(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))
