"""Shared test setup: offline hubs, deterministic torch, a repo-local extension cache."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

import torch  # noqa: E402

# One intra-op thread: the tiny models are far faster single-threaded on these 2-core machines
# (thread hand-off dominates their small matmuls), and integration tests run several processes.
torch.set_num_threads(1)
