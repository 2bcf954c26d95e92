"""Spec §14 #5: patchify round trips and feature order."""
import pytest
import torch

from asymflow.patching import (
    pack,
    patchify,
    patchify_grid,
    patchify_unpacked_channels,
    unpack,
    unpatchify,
    unpatchify_grid,
    unpatchify_unpacked_channels,
)


@pytest.mark.parametrize("order", ["channel_first", "channel_last"])
def test_round_trip(order):
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    tokens = patchify(x, 16, order)
    assert tokens.shape == (2, 3 * 2, 768)
    assert torch.equal(unpatchify(tokens, 16, 48, 32, order), x)


def test_channel_first_feature_index_and_token_order():
    p, c, h, w = 4, 3, 8, 12
    x = torch.zeros(1, c, h, w)
    # mark pixel (c=2, row 5, col 9): token row 1, col 2 of a 2x3 grid -> n = 1*3 + 2; inside: i=1, j=1
    x[0, 2, 5, 9] = 1.0
    tokens = patchify(x, p)
    n, f = (tokens[0] == 1).nonzero()[0].tolist()
    assert n == 1 * (w // p) + 2
    assert f == 2 * p * p + 1 * p + 1


def test_channel_last_feature_index():
    p, c = 4, 3
    x = torch.zeros(1, c, 4, 4)
    x[0, 1, 2, 3] = 1.0
    f = (patchify(x, p, "channel_last")[0, 0] == 1).nonzero()[0].item()
    assert f == (2 * p + 3) * c + 1


def test_pack_unpack_and_grid():
    x = torch.randn(2, 128, 3, 5)
    assert torch.equal(unpack(pack(x), 3, 5), x)
    assert pack(x)[0, 1 * 5 + 2].tolist() == x[0, :, 1, 2].tolist()  # row-major tokens
    img = torch.randn(2, 3, 32, 16)
    assert torch.equal(unpatchify_grid(patchify_grid(img, 16), 16), img)
    assert torch.equal(pack(patchify_grid(img, 16)), patchify(img, 16))


def test_latent_packing_matches_flux2_pipeline():
    """FLUX.2's own `_patchify_latents` + `_pack_latents` give the same token layout as ours (p = 2)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = torch.randn(2, 32, 8, 6)
    theirs = Flux2Pipeline._pack_latents(Flux2Pipeline._patchify_latents(z))
    assert torch.equal(patchify(z, 2), theirs)
    assert torch.equal(patchify_grid(z, 2), Flux2Pipeline._patchify_latents(z))


def test_unpacked_channels_round_trip():
    img = torch.randn(2, 3, 32, 48)
    u = patchify_unpacked_channels(img, 16)
    assert u.shape == (2, 3, 256, 2, 3)
    assert torch.equal(unpatchify_unpacked_channels(u, 16), img)
    # same numbers as the channel-first token layout
    assert torch.equal(u.reshape(2, 768, 6).permute(0, 2, 1), patchify(img, 16))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        patchify(torch.zeros(1, 3, 40, 32), 16)
    with pytest.raises(ValueError, match="tokens"):
        unpatchify(torch.zeros(1, 5, 768), 16, 32, 32)
