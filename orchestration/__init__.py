"""orchestration: typed run config, Ray Train + DeepSpeed ZeRO-3 workers, checkpoints, preemption, CLI."""
