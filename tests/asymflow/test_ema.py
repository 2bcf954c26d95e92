"""EMA Karras schedule (spec §9, §14 #14) and the EMA shadow's update and checkpoint round trip."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from asymflow.ema import EMA, karras_beta


def test_karras_beta_values():
    assert karras_beta(1) == 0.0
    assert karras_beta(1000) == pytest.approx(0.999**8, rel=1e-12)
    assert karras_beta(1000) == pytest.approx(0.9920, abs=5e-5)
    assert karras_beta(14900) == pytest.approx(0.99946, abs=5e-6)
    assert karras_beta(2, gamma=0) == 0.5
    with pytest.raises(ValueError):
        karras_beta(0)


def _params(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value, dtype=torch.bfloat16), "b": torch.full((3,), value)}


def test_ema_copies_before_start_then_averages():
    ema = EMA(_params(0.0), start_iter=100, gamma=7)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    for step in (0, 50, 99):
        assert ema.update(step, _params(float(step))) == 0.0
        assert torch.equal(ema.shadow["b"], torch.full((3,), float(step)))
    # At step 100, t = 1 -> β = 0 (still a copy); at step 101, t = 2 -> β = (1/2)^8.
    assert ema.update(100, _params(4.0)) == 0.0
    beta = ema.update(101, _params(8.0))
    assert beta == pytest.approx(0.5**8)
    assert ema.shadow["w"][0, 0].item() == pytest.approx(beta * 4.0 + (1 - beta) * 8.0, rel=1e-6)
    # t = max(step + 1 − start, 1): step 1099 -> t = 1000.
    assert ema.beta(1099) == pytest.approx(karras_beta(1000))


def test_ema_copy_keys_and_name_checks():
    ema = EMA({"p": torch.zeros(2), "buf": torch.zeros(2)}, start_iter=0, copy_keys=["buf"])
    ema.update(5, {"p": torch.ones(2), "buf": torch.ones(2)})
    assert torch.equal(ema.shadow["buf"], torch.ones(2))
    assert (ema.shadow["p"] < 1).all()
    with pytest.raises(KeyError, match="missing"):
        ema.update(6, {"p": torch.ones(2)})


def test_ema_state_dict_round_trip_through_safetensors(tmp_path):
    ema = EMA(_params(1.0), start_iter=0)
    ema.update(3, _params(2.0))
    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))
    other = EMA(_params(0.0), start_iter=0)
    other.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
