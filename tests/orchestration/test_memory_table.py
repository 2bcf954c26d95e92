"""docs/SCALING.md's per-GPU memory table is the dry run's memory model (bench/memory_table.py's output), and the
model's policy and LPIPS terms match their closed forms."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from orchestration.dry_run import ParamCounts, gathered_bytes, lpips_bytes_per_sample, state_bytes_per_rank

from tests.asymflow.helpers import saved_for_backward_bytes

REPO = Path(__file__).resolve().parents[2]


def _memory_table():
    spec = importlib.util.spec_from_file_location("memory_table", REPO / "bench" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_md_table_is_the_scripts_output():
    table = _memory_table()
    assert table.document_section() == table.markdown(table.predictions()), (
        "docs/SCALING.md's memory table is stale: run .venv/bin/python bench/memory_table.py --write")


def test_frozen_policy_moves_only_the_frozen_bytes():
    """bf16 + fp32 master + Adam: partitioned = (2 N + 14 N_t)/r + teacher; replicated = 2 (N − N_t) + 16 N_t/r +
    teacher (the trainable bf16 copy stays partitioned)."""
    p = ParamCounts(total=9_000, trainable=1_000, full_modules=100, layers=10, width=8)
    r = 4
    assert state_bytes_per_rank(p, r, True, "tied") == (2 * 9_000 + 14 * 1_000) / r + 2 * 100
    assert state_bytes_per_rank(p, r, True, "tied", "replicated") == 2 * 8_000 + 16 * 1_000 / r + 2 * 100
    assert state_bytes_per_rank(p, 1, True, "tied", "replicated") == state_bytes_per_rank(p, 1, True, "tied")
    assert gathered_bytes(p, True) == 2 * 2 * 9_000 / 10  # two blocks of the whole model in bf16
    assert gathered_bytes(p, True, "replicated") == 2 * 2 * 1_000 / 10  # only the trainable share is gathered


def test_lpips_term_counts_vgg16_activations_and_taps():
    h = w = 1024
    px = [h * w // 4**k for k in range(5)]  # pixels at each VGG stage
    convs = 64 * 2 * px[0] + 128 * 2 * px[1] + 256 * 3 * px[2] + 512 * 3 * px[3] + 512 * 3 * px[4]
    pools = 64 * px[1] + 128 * px[2] + 256 * px[3] + 512 * px[4]
    taps = 64 * px[0] + 128 * px[1] + 256 * px[2] + 512 * px[3] + 512 * px[4]  # relu1_2 … relu5_3
    # the prediction only (the target's pass keeps no graph): input, conv/ReLU and pool outputs in bf16, pool
    # indices in int64, the normalised tap difference and its square
    expected = 2 * (3 * px[0] + convs + pools + 2 * taps) + 8 * pools
    assert lpips_bytes_per_sample(h, w, gpu=True) == expected
    assert lpips_bytes_per_sample(h, w, gpu=True) == pytest.approx(1.40e9, rel=0.01)  # quoted in SCALING.md


def test_lpips_term_is_what_autograd_keeps():
    """The CPU check of the LPIPS term: the bytes of the tensors autograd saves for backward in one LPIPS-VGG
    evaluation (architecture of the real one, random weights; the weights themselves not counted)."""
    import torch

    from asymflow.perceptual import LPIPSDistance

    torch.manual_seed(0)
    distance = LPIPSDistance()._freeze()
    pred = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_()
    saved = saved_for_backward_bytes(lambda: distance(pred, torch.rand(1, 3, 64, 64) * 2 - 1),
                                     [*distance.parameters(), *distance.buffers()])
    assert saved == pytest.approx(lpips_bytes_per_sample(64, 64, gpu=False), rel=0.01)
