"""The released checkpoints of the other families (asymflow/families/released.py) at their real sizes, latent and
converted pixel model built on the meta device with the real diffusers classes: the configs are what the classes
take, the counts are the publishers' sizes, and converting widens only the read-in/read-out (closed form from the
config's dimensions and the family's patch geometry). Nothing of the models' size is allocated."""
import resource

import pytest

from asymflow.families import get_family
from asymflow.families.released import RELEASED, build_released_pixel, build_released_transformer


def _width(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def _growth(family, d: int) -> int:
    """Weights the conversion adds: the read-in takes 3·p² instead of C·q² features per token (a Linear's or a
    kernel = stride conv's weight, d per feature; its bias stays d), the read-out writes 3·p² instead of C·q²
    (weight d per row, plus its bias)."""
    more = family.pixel_dim - family.latent_dim
    return more * d + more * d + more


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_checkpoint_on_meta(name):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    entry = RELEASED[name]
    family = get_family(entry.family)
    latent = build_released_transformer(name)
    assert type(latent).__name__ == family.transformer_class
    for key, value in entry.config.items():  # from_config drops unknown keys silently: each one must have landed
        got = latent.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, tuple) else value), key
    params = sum(p.numel() for p in latent.parameters())
    weights = params + sum(b.numel() for b in latent.buffers())  # SD3's positional table is in its checkpoint
    # The published sizes are rounded to two digits ("20B" for Qwen-Image's 20.43 B): within 2.5 %.
    assert weights / 1e9 == pytest.approx(entry.published_b, rel=0.025)

    pixel = build_released_pixel(name)
    assert type(pixel).__name__ == family.pixel_class().__name__
    assert all(p.device.type == "meta" for p in pixel.parameters())
    d = _width(entry.config)
    read_in = pixel.get_submodule(family.read_in.module).weight
    assert read_in.shape[0] == d and read_in[0].numel() == family.pixel_dim  # 3·p² features per token
    assert pixel.get_submodule(family.read_out.module).weight.shape == (family.pixel_dim, d)
    assert sum(p.numel() for p in pixel.parameters()) == params + _growth(family, d)
    assert tuple(pixel.proj_buffer.shape) == (family.pixel_dim, family.latent_dim)

    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 1024 * 1024, f"peak RSS grew by {grown_kb / 1024:.0f} MB"


def test_released_entries_cite_a_source_and_name_a_registered_family():
    for entry in RELEASED.values():
        assert entry.source and "/" in entry.repo
        get_family(entry.family).check_latent_config(entry.config)  # the family's token geometry
