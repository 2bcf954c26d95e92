"""The reference side of test_lpips_prep.py, run by .venv-lpips's Python (torch 2.14.1 + torchvision + lpips):

    python lpips_reference_side.py OUT_DIR

writes OUT_DIR/vgg16.pth (a seeded random torchvision vgg16 state dict: features.* + the last classifier layer),
OUT_DIR/lpips_state.pth (the lpips.LPIPS(net='vgg') module's state dict with that backbone) and OUT_DIR/cases.pth
(images and lpips' spatial maps and scalar distances), and prints a JSON line describing the environment.
Nothing may be downloaded: TORCH_HOME is an empty directory and torch.hub's download functions raise.
"""
import json
import os
import sys
from pathlib import Path

out = Path(sys.argv[1])
os.environ["TORCH_HOME"] = str(out / "torch_home")
(out / "torch_home").mkdir(parents=True, exist_ok=True)

import torch  # noqa: E402
import torch.hub  # noqa: E402


def _no_download(*args, **kwargs):
    raise RuntimeError(f"download attempted: {args[:1]}")


torch.hub.load_state_dict_from_url = _no_download
torch.hub.download_url_to_file = _no_download

import lpips  # noqa: E402
import torchvision  # noqa: E402

torch.manual_seed(0)
vgg = torchvision.models.vgg16(weights=None)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for layer in vgg.features:
        if isinstance(layer, torch.nn.Conv2d):  # torchvision zero-inits the biases: make them matter
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
state = vgg.state_dict()
torch.save({k: v for k, v in state.items() if k.startswith("features.") or k.startswith("classifier.6.")}, out / "vgg16.pth")


model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, spatial=True, verbose=False).eval()
with torch.no_grad():
    for name, p in model.net.named_parameters():  # net.slice{n}.{i}.weight holds torchvision's features.{i}
        _, index, kind = name.split(".")
        p.copy_(state[f"features.{index}.{kind}"])
torch.save(model.state_dict(), out / "lpips_state.pth")


def distance(a: torch.Tensor, b: torch.Tensor, spatial: bool) -> torch.Tensor:
    model.spatial = spatial  # read by LPIPS.forward: upsampled maps, or per-layer spatial means
    return model(a, b)


cases = {}
gen = torch.Generator().manual_seed(2)
for h, w in ((64, 64), (48, 80), (37, 50)):
    a = torch.rand(2, 3, h, w, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, h, w, generator=gen)).clamp(-1, 1)
    with torch.no_grad():
        cases[f"{h}x{w}.a"], cases[f"{h}x{w}.b"] = a, b
        cases[f"{h}x{w}.map"] = distance(a, b, spatial=True)
        cases[f"{h}x{w}.scalar"] = distance(a, b, spatial=False)
torch.save(cases, out / "cases.pth")
print(json.dumps({
    "torch": torch.__version__, "torchvision": torchvision.__version__,
    "lpips_dir": str(Path(lpips.__file__).parent), "torch_home": sorted(os.listdir(out / "torch_home")),
}))
