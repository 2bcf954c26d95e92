"""README's "Model families" example, run as written on a tiny random FLUX.1 directory (real diffusers classes saved
with save_pretrained), and the public names it imports from `asymflow`."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from asymflow.families import get_family
from asymflow.families.tiny import build_tiny_family_transformer, build_tiny_family_vae
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)
from tests.asymflow.test_families_convert import conditioning, image_size

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Model families", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_family_example_runs(tmp_path, monkeypatch) -> None:
    import json

    import diffusers

    root = tmp_path / "FLUX.1-tiny"
    latent = build_tiny_family_transformer("flux1")
    latent.save_pretrained(root / "transformer")
    build_tiny_family_vae("flux1").save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    code = readme_example()
    assert 'MODEL = "models/FLUX.1-dev"' in code
    code = code.replace('MODEL = "models/FLUX.1-dev"', f'MODEL = "{root}"').replace("torch.rand(8, 3, 256, 256)",
                                                                                  "torch.rand(2, 3, 64, 64)")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Model families)", "exec"), scope)

    family, pixel, model = scope["family"], scope["pixel"], scope["model"]
    assert family is get_family("flux1") and isinstance(model, family.pixel_class())
    assert torch.equal(model.proj_buffer, scope["basis"].to(torch.float32))
    trainable = {n for n, p in pixel.named_parameters() if p.requires_grad}
    assert "proj_out.weight" in trainable and not any(n.startswith("single_transformer_blocks.0.proj_out.base")
                                                      for n in trainable)
    x_t = torch.randn(2, 3, *image_size("flux1"), generator=torch.Generator().manual_seed(0))
    text, extra = conditioning("flux1", 2, torch.float32)
    with torch.no_grad():  # lora_B = 0 at init: the loaded adapter computes what the converted model does
        assert torch.equal(model.eval()(x_t, 0.4, text, **extra), pixel.eval()(x_t, 0.4, text, **extra))


def test_family_api_is_public() -> None:
    import asymflow
    from asymflow.families import adapter, conversion, fit

    assert asymflow.get_family("sana") is get_family("sana")
    assert asymflow.convert_family_transformer is conversion.convert_family_transformer
    assert asymflow.fit_family_subspace is fit.fit_family_subspace
    assert (asymflow.export_family_adapter, asymflow.load_family_adapter) == (adapter.export_family_adapter,
                                                                              adapter.load_family_adapter)
    assert {"detect_family", "get_family", "load_family_adapter"} <= set(asymflow.__all__)
