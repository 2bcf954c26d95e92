"""The worker's library-noise filters (orchestration.quiet), each against the library's own emitter: torch's
deprecation FutureWarning, Ray Train V2's report logger, DeepSpeed's accelerator guess; other warnings pass."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import logging, os, warnings
os.environ.pop("DS_ACCELERATOR", None)
from orchestration.quiet import quiet_library_output
quiet_library_output(use_gpu=False)
from ray.train.v2._internal.execution import context
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    quiet_library_output(use_gpu=False)
    warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated, use all_gather_single", FutureWarning)
    warnings.warn("something else is deprecated", FutureWarning)
print([str(w.message) for w in caught])
print(context.logger.isEnabledFor(logging.INFO), os.environ["DS_ACCELERATOR"])
from deepspeed.accelerator import get_accelerator
print(get_accelerator().device_name())
"""


def test_filters_hit_only_their_own_messages():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines[-3] == "['something else is deprecated']", out.stdout + out.stderr
    assert lines[-2] == "False cpu" and lines[-1] == "cpu"
    assert "Setting accelerator to CPU" not in out.stdout + out.stderr
