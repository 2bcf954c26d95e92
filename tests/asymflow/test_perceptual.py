"""Perceptual distances keep only the prediction's activations for backward (issue #12): the target's VGG features
are computed in a separate pass without autograd. Checked against the former single cat([pred, target]) pass."""
from __future__ import annotations

import pytest
import torch

from asymflow.perceptual import LPIPSDistance, TinyConvDistance, lpips_map

from .helpers import saved_for_backward_bytes


def _single_pass(distance, pred, target):
    """The former formulation: prediction and target through the trunk together, in one autograd graph."""
    x = (torch.cat([pred, target]).to(distance.shift.dtype) - distance.shift) / distance.scale
    feats, n = distance.trunk(x), pred.shape[0]
    return lpips_map([f[:n] for f in feats], [f[n:] for f in feats], distance.lins, tuple(pred.shape[-2:])).float()


def _images(b: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return LPIPSDistance()._freeze()  # the real architecture, random weights


@pytest.mark.parametrize("kind", ["lpips", "tiny"])
@pytest.mark.parametrize("batch", [1, 2])
def test_two_passes_give_the_single_pass_map_and_gradient(kind, batch, lpips_random):
    distance = lpips_random if kind == "lpips" else TinyConvDistance()
    pred, target = _images(batch, 32, 1), _images(batch, 32, 2)
    pred_old, pred_new = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    old, new = _single_pass(distance, pred_old, target), distance(pred_new, target)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7)  # the convs see another batch: fp32 rounding only
    weight = torch.rand(old.shape, generator=torch.Generator().manual_seed(3))
    (grad_old,) = torch.autograd.grad((old * weight).sum(), pred_old)
    (grad_new,) = torch.autograd.grad((new * weight).sum(), pred_new)
    assert grad_new.abs().max() > 0
    torch.testing.assert_close(grad_new, grad_old, rtol=1e-5, atol=1e-6 * grad_old.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # spec §3.4a: the distance runs under the caller's autocast
        old_bf16, new_bf16 = _single_pass(distance, pred, target), distance(pred, target)
    torch.testing.assert_close(new_bf16, old_bf16, rtol=1e-2, atol=1e-3)
    assert not torch.equal(new_bf16, new)  # autocast did reach the convs


def test_a_target_that_requires_grad_still_gets_its_gradient():
    distance = TinyConvDistance()
    pred, target = _images(2, 16, 1), _images(2, 16, 2)
    t_old, t_new = target.clone().requires_grad_(), target.clone().requires_grad_()
    (grad_old,) = torch.autograd.grad(_single_pass(distance, pred, t_old).sum(), t_old)
    (grad_new,) = torch.autograd.grad(distance(pred, t_new).sum(), t_new)
    assert grad_new.abs().max() > 0
    torch.testing.assert_close(grad_new, grad_old, rtol=1e-5, atol=1e-6 * grad_old.abs().max().item())


def test_lpips_keeps_only_the_predictions_activations_for_backward(lpips_random):
    """Saved-for-backward bytes of one LPIPS-VGG evaluation of one fp32 64² image, from VGG16's shapes.

    Per image the trunk saves its input, every conv's ReLU output (the ReLU's result and the next layer's input:
    one storage), every max-pool output and the pool's int64 indices; per tap, lpips_map saves the normalised
    difference and its square, and for each normalised image two one-channel maps (the norm and norm + 1e-10).
    Before, both images went through the trunk in one graph; now only the prediction does."""
    size = 64
    px = [size * size // 4**k for k in range(5)]  # pixels at the 5 VGG stages
    convs = 64 * 2 * px[0] + 128 * 2 * px[1] + 256 * 3 * px[2] + 512 * 3 * px[3] + 512 * 3 * px[4]
    pools = 64 * px[1] + 128 * px[2] + 256 * px[3] + 512 * px[4]
    taps = 64 * px[0] + 128 * px[1] + 256 * px[2] + 512 * px[3] + 512 * px[4]  # relu1_2 … relu5_3
    trunk = 3 * px[0] + convs + pools  # fp32 values of one image's trunk
    norms = 2 * sum(px)  # per normalised image: norm and norm + 1e-10 at each tap
    expected_new = 4 * (trunk + 2 * taps + norms) + 8 * pools
    expected_old = 4 * (2 * trunk + 2 * taps + 2 * norms) + 8 * 2 * pools

    weights = [*lpips_random.parameters(), *lpips_random.buffers()]
    pred, target = _images(1, size, 1).requires_grad_(), _images(1, size, 2)
    new = saved_for_backward_bytes(lambda: lpips_random(pred, target), weights)
    old = saved_for_backward_bytes(lambda: _single_pass(lpips_random, pred, target), weights)
    assert (new, old) == (expected_new, expected_old)
    # the saving is the target's own graph: its trunk, pool indices and norm maps (the tap tensors were never its)
    assert old - new == 4 * (trunk + norms) + 8 * pools
