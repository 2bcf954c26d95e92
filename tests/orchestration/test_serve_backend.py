"""`asymflow serve`'s backend without a browser: an export of the bundled base, served through `asymflow sample`'s
resolver, generates what the bundled base converted at start generates; the latent comparison, reference images,
step reports and cancel work on it."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from orchestration.serve_model import GenerationCancelled, GenerationRequest, load_backend
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def bundled():
    return load_backend("bundled", "cpu", compare_latent=True)


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "clock", "negative_prompt": "", "width": 128, "height": 96, "steps": 4,
                                "guidance": 2.0, "seed": 5, **kw})


def test_export_served_through_the_resolver_matches_the_bundled_base(bundled, tmp_path) -> None:
    from asymflow.components import BaseModelConfig
    from asymflow.export import export_adapter
    from asymflow.scheduler import FlowAdapterScheduler

    info = {"model": BaseModelConfig(kind="bundled").model_dump(mode="json"), "sample": {"height": 128, "width": 128}}
    export_adapter(bundled.pipeline.transformer, tmp_path / "export", base_info=info)
    served = load_backend(str(tmp_path / "export"), "cpu", compare_latent=True)
    assert served.resolution == 128 and served.latent is not None
    torch.testing.assert_close(served.latent.basis, bundled.latent.basis)
    served.pipeline.scheduler = FlowAdapterScheduler(shift=bundled.latent.scale)  # the bundled backend's schedule
    a, b = bundled.generate(request(), compare_latent=True), served.generate(request(), compare_latent=True)
    assert a.image.size == (128, 96) and a.latent_image.size == (128, 96)
    for x, y in ((a.image, b.image), (a.latent_image, b.latent_image)):
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1  # 8-bit rounding at most


def test_steps_reference_and_cancel(bundled) -> None:
    seen: list[tuple[int, int]] = []
    plain = bundled.generate(request(), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(1, 5)] and plain.notes == []
    ref = Image.fromarray((np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3))
    conditioned = bundled.generate(request(reference=ref), compare_latent=True)
    assert conditioned.notes == [] and conditioned.latent_image is not None
    assert not np.array_equal(np.asarray(plain.image), np.asarray(conditioned.image))  # the reference was used

    cancel = threading.Event()

    def stop_after_two(i: int, n: int) -> None:
        if i == 2:
            cancel.set()

    seen.clear()
    with pytest.raises(GenerationCancelled):
        bundled.generate(request(steps=50), on_step=lambda i, n: (seen.append((i, n)), stop_after_two(i, n)),
                         cancel=cancel)
    assert seen[-1] == (2, 50)
    assert bundled.generate(request()).image.size == (128, 96)  # the lock was released
