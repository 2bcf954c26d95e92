"""Autocast stops at the transformer blocks (spec §3.4a): codec, twin, calibration and recovery stay fp32 under bf16.

CPU bf16 autocast stands in for the GPU's: it lowers the same op classes (matmul, einsum, linear, conv). Every
comparison below is against the same computation with autocast off, and the tolerance is zero: outside the
blocks the two runs must execute the same fp32 kernels.
"""
import pytest
import torch

from asymflow.model import AsymFlux2Transformer2DModel
from asymflow.objective import AsymFlowVRConfig, asymflow_vr_step, low_rank_twin
from asymflow.oklab import oklab_decode, oklab_encode
from asymflow.parameterisation import calibrate, recover_velocity, recover_x0
from asymflow.patching import patchify
from asymflow.tiny import TINY_TRANSFORMER_CONFIG

from .helpers import random_basis
from .test_trainable import one_thread, tiny_batch, tiny_pair  # noqa: F401  (one_thread: autouse fixture)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
SCALE = 1.7


def _uniform_rgb(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """n uniform sRGB colours in [−1,1] as a [1,3,64,n/64] image."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, 64, n // 64, generator=g) * 2 - 1).float()


def _both(fn, *args, **kwargs):
    """fn under bf16 autocast and without it."""
    with torch.autocast(**BF16):
        lowered = fn(*args, **kwargs)
    return lowered, fn(*args, **kwargs)


def test_bf16_autocast_would_quantise_the_oklab_target():
    """The failure this file guards against, measured: the codec's einsum in bf16 moves colours by whole codes."""
    img = _uniform_rgb()
    with torch.autocast(**BF16):
        m1 = torch.tensor([[0.4122214708, 0.5363325363, 0.0514459929]] * 3)
        lowered = torch.einsum("ij,bj...->bi...", m1, img)
    exact = torch.einsum("ij,bj...->bi...", m1, img)
    assert lowered.dtype == torch.bfloat16 and (lowered.float() - exact).abs().max() > 1e-3


def test_codec_twin_calibration_and_recovery_ignore_autocast():
    img = _uniform_rgb()
    x_0, x_0_ref = _both(oklab_encode, img)
    assert x_0.dtype == torch.float32 and torch.equal(x_0, x_0_ref)
    rgb, rgb_ref = _both(oklab_decode, x_0_ref)
    assert torch.equal(rgb, rgb_ref)
    # 8-bit codes: the decoded colours are the fp32 ones to the code (the issue measured 28 % off by > 5 codes).
    assert torch.equal(((rgb + 1) * 127.5).round(), ((rgb_ref + 1) * 127.5).round())

    basis = random_basis(768, 128, seed=1, dtype=torch.float32)
    z = torch.randn(2, 128, 3, 4, generator=torch.Generator().manual_seed(2))
    twin, twin_ref = _both(low_rank_twin, z, basis, SCALE, 16)
    assert torch.equal(twin, twin_ref)

    sigma = torch.tensor([0.05, 0.93])
    (k, sc), (k_ref, sc_ref) = _both(calibrate, sigma, SCALE)
    assert torch.equal(k, k_ref) and torch.equal(sc, sc_ref)

    g = torch.Generator().manual_seed(3)
    u_a, x_t = torch.randn(2, 12, 768, generator=g), torch.randn(2, 12, 768, generator=g)
    u, u_ref = _both(recover_velocity, u_a, x_t, sigma, basis, SCALE)
    assert u.dtype == torch.float32 and torch.equal(u, u_ref)
    x0_hat, x0_hat_ref = _both(recover_x0, u_a, x_t, sigma, basis, SCALE)
    assert torch.equal(x0_hat, x0_hat_ref)


def test_autocast_state_of_the_caller_is_back_after_the_algebra():
    with torch.autocast(**BF16):
        oklab_encode(_uniform_rgb(64))
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


class ElementwiseBackbone(AsymFlux2Transformer2DModel):
    """A converted model whose blocks use no op that autocast lowers: autocast then has nothing legitimate to change.

    û_a = g·tanh(y)·(1 − σ̃) − 0.5·y·σ̃ + mean(text), per token (nonlinear in y and σ̃, elementwise only).
    """

    def __init__(self, **config):
        super().__init__(**config)
        self.gain = torch.nn.Parameter(torch.tensor(0.9))

    def _backbone(self, hidden_states, encoder_hidden_states, sigma_cal, img_ids, txt_ids, **kwargs):
        s = sigma_cal.view(-1, 1, 1)
        text = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1)
        return self.gain * torch.tanh(hidden_states) * (1 - s) - 0.5 * hidden_states * s + text


def _elementwise_model(seed: int) -> ElementwiseBackbone:
    model = ElementwiseBackbone(**AsymFlux2Transformer2DModel.from_latent_config(TINY_TRANSFORMER_CONFIG))
    model.proj_buffer.copy_(random_basis(768, 128, seed=seed, dtype=torch.float32))
    model.scale_buffer.fill_(SCALE)
    return model


def test_model_forward_under_autocast_equals_fp32_when_the_blocks_are_unaffected():
    model = _elementwise_model(seed=4).eval()
    g = torch.Generator().manual_seed(5)
    x_t, text = torch.randn(2, 3, 32, 48, generator=g), torch.randn(2, 8, 96, generator=g)
    sigma = torch.tensor([0.02, 0.81])
    with torch.no_grad():
        for prediction in ("velocity", "x0"):
            out, out_ref = _both(model, x_t, sigma, text, prediction=prediction)
            assert out.dtype == torch.float32 and torch.equal(out, out_ref), prediction


class ElementwiseDistance(torch.nn.Module):
    """|pred − target| averaged over channels, [B,1,H,W]; records its inputs' dtype (they must be fp32 decodes)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.seen += [pred.dtype, target.dtype]
        return (pred - target).abs().mean(dim=1, keepdim=True)


def _step(student, teacher, perceptual, batch, autocast: bool):
    with torch.autocast(**BF16, enabled=autocast):
        return asymflow_vr_step(student, teacher, batch, torch.Generator().manual_seed(11), AsymFlowVRConfig(),
                                perceptual)


def test_full_step_under_autocast_equals_fp32_when_the_blocks_are_unaffected():
    """Targets (x_0, the twin, d_low, λ), recovery, decodes and both loss terms: all fp32 under autocast."""
    student, teacher = _elementwise_model(seed=6).train(), _elementwise_model(seed=6).eval()
    batch = tiny_batch()
    distance = ElementwiseDistance()
    loss, metrics = _step(student, teacher, distance, batch, autocast=True)
    loss_ref, metrics_ref = _step(student, teacher, distance, batch, autocast=False)
    assert set(distance.seen) == {torch.float32}
    assert metrics["loss_perceptual"] > 0 and metrics["vr_lambda_mean"] > 0
    assert torch.equal(loss, loss_ref)
    for name, value in metrics.items():
        assert torch.equal(value, metrics_ref[name]), name
    loss.backward()
    assert torch.isfinite(student.gain.grad)


def test_real_blocks_are_the_only_bf16_part_of_the_step():
    """With the real tiny FLUX.2 blocks, the step under autocast equals an fp32 step whose blocks alone autocast."""
    student, teacher = tiny_pair(scale=SCALE)
    batch = tiny_batch()
    loss, metrics = _step(student, teacher, ElementwiseDistance(), batch, autocast=True)

    for model in (student, teacher):
        blocks = model._backbone

        def blocks_in_bf16(*args, _blocks=blocks, **kwargs):
            with torch.autocast(**BF16):
                return _blocks(*args, **kwargs)

        model._backbone = blocks_in_bf16
    loss_blocks, metrics_blocks = _step(student, teacher, ElementwiseDistance(), batch, autocast=False)
    assert torch.equal(loss, loss_blocks)
    for name, value in metrics.items():
        assert torch.equal(value, metrics_blocks[name]), name

    # And the blocks do run in bf16 there: the fp32 step differs (by what bf16 blocks explain, not more).
    for model in (student, teacher):
        del model._backbone
    loss_fp32, _ = _step(student, teacher, ElementwiseDistance(), batch, autocast=False)
    loss_fp32, loss = float(loss_fp32.detach()), float(loss.detach())
    assert loss_fp32 != loss and abs(loss_fp32 - loss) < 0.05 * loss_fp32


def test_model_forward_recovers_the_bf16_backbone_output_in_fp32():
    """Inside forward, only û_a is bf16: forward == fp32 recovery of the (autocast) backbone output."""
    student, _ = tiny_pair(scale=SCALE)
    model = student.eval()
    g = torch.Generator().manual_seed(7)
    x_t, text = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 8, 96, generator=g)
    sigma = torch.tensor([0.3, 0.9])
    captured = {}
    blocks = model._backbone

    def capture(*args, **kwargs):
        captured["u_a"] = blocks(*args, **kwargs)
        return captured["u_a"]

    model._backbone = capture
    with torch.no_grad(), torch.autocast(**BF16):
        u = model(x_t, sigma, text)
    assert captured["u_a"].dtype == torch.bfloat16
    tokens = patchify(x_t, 16)
    expected = recover_velocity(captured["u_a"].float(), tokens, sigma, model.proj_buffer, SCALE, sigma_min=1e-4)
    assert torch.equal(patchify(u, 16), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bf16_model_without_autocast_keeps_fp32_algebra(dtype):
    """A bf16-cast model (DeepSpeed's bf16 engine) still recovers in fp32 from fp32 B and s."""
    model = _elementwise_model(seed=8).to(dtype).eval()
    assert model.proj_buffer.dtype == torch.float32
    x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert model(x_t, torch.tensor([0.5]), torch.zeros(1, 4, 96)).dtype == torch.float32
