"""Spec §14 #10: Oklab round trip, white/black anchors, finite gradients at 0."""
import torch

from asymflow import oklab_decode, oklab_encode


def test_round_trip_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    assert (oklab_decode(oklab_encode(x)) - x).abs().max() <= 1e-4


def test_white_and_black():
    white = oklab_encode(torch.ones(1, 3, 1, 1, dtype=torch.float64))
    black = oklab_encode(-torch.ones(1, 3, 1, 1, dtype=torch.float64))
    assert abs(white[0, 0].item() - (1 - 0.56) / 0.16) < 1e-6  # L = 1 for white -> 2.75
    assert abs(black[0, 0].item() - (0 - 0.56) / 0.16) < 1e-6  # L = 0 for black -> −3.5
    # a, b ≈ 0 for neutral colours: (lab − mean)/std with mean (0, 0.01) for a, b
    assert abs(white[0, 1].item()) < 1e-3 / 0.16 and abs(white[0, 2].item() + 0.01 / 0.16) < 1e-3 / 0.16
    assert abs(black[0, 1].item()) < 1e-9 and abs(black[0, 2].item() + 0.01 / 0.16) < 1e-9


def test_custom_normalisation():
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    y = oklab_encode(x, mean=(0.5, 0.0, 0.0), std=0.21)
    assert (oklab_decode(y, mean=(0.5, 0.0, 0.0), std=0.21) - x).abs().max() <= 1e-4


def test_gradients_finite_at_zero():
    x = torch.tensor([-1.0, -1.0, -1.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2).requires_grad_()
    oklab_encode(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    y = oklab_encode(-torch.ones(1, 3, 2, 2)).requires_grad_()  # decodes exactly to black (l = 0)
    oklab_decode(y).sum().backward()
    assert torch.isfinite(y.grad).all()
