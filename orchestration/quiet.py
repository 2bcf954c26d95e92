"""Library noise filtered at its source in the worker processes, so a run's log shows asymflow's lines (`--verbose`
keeps everything). Each filter names one known message; nothing else is hidden."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_library_output(use_gpu: bool) -> None:
    """Called once per worker process, before DeepSpeed and wandb are imported (they read the environment then)."""
    # torch.distributed's deprecation FutureWarnings for the collectives DeepSpeed calls, repeated on every rank
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not use_gpu:
        # DeepSpeed warns "Setting accelerator to CPU ..." when it has to guess; on a CPU run that is the intent.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # wandb's banner and end-of-run history/summary tables (the run's metrics are in metrics.jsonl and wandb itself)
    os.environ.setdefault("WANDB_SILENT", "true")
    # Ray Train V2 logs the whole TrainingReport(...) dict of every report at INFO (its module logger, named by file)
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)
