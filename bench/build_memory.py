"""Host memory of building the trainer's models: peak RSS per rank over the model's bytes in its load dtype.

    .venv/bin/python bench/build_memory.py [--heads 12 --double 3 --single 6]

Every rank builds the base, converts it and makes its teacher before ZeRO-3 partitions anything, so the build's peak
host RSS is what decides how many ranks fit on a node (klein 9B: 18 GB in bf16 per rank). A ~400 M-parameter
FLUX.2-shaped latent transformer (12 heads × 128 = 1536 wide, 3 double + 6 single blocks, random weights) is saved
once as a bf16 diffusers directory; then each path runs in a fresh process (peak RSS is per process):

  current  — the worker's path, `orchestration.model_build.build_student_and_teacher` (base loaded in its dtype,
             conversion takes over the base's tensors, tied teacher), then `deepspeed.initialize` (ZeRO-3, 1 rank, gloo)
  previous — the path before issue 12: `from_pretrained` without a dtype (fp32) then a cast to bf16, conversion
             with cloned tensors, a full deep-copied teacher, then the same `deepspeed.initialize`

Figure: (peak RSS − RSS after imports) / (parameters × 2 bytes), per path; ratio current / previous. Goal (issue 12):
current ≤ 1.3. LoRA rank 96 keeps the recipe's rank/width ratio (256 / 4096).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import common

MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_parts() -> dict[str, int]:
    """RssAnon (private memory) and RssFile (file pages, e.g. mmapped safetensors: shared by every rank of a node
    through the page cache, and reclaimable) of this process, in bytes."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value, _ = line.split()
                parts[key[:-1]] = int(value) * 1024
    return parts


class PeakSampler:
    """Samples RssAnon/RssFile every 5 ms in a thread; `peak` holds the maxima (ru_maxrss only has their sum)."""

    def __init__(self) -> None:
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            for key, value in _rss_parts().items():
                self.peak[key] = max(self.peak[key], value)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def _latent_config(args) -> dict:
    from asymflow.klein import KLEIN_COMMON

    return dict(KLEIN_COMMON, num_layers=args.double, num_single_layers=args.single, num_attention_heads=args.heads,
                attention_head_dim=128, joint_attention_dim=args.heads * 128)


def write_model(root: Path, args) -> int:
    """The random bf16 latent transformer as a diffusers directory (root/transformer); returns its parameter count."""
    import torch
    from diffusers import Flux2Transformer2DModel

    marker = root / "params.json"
    if marker.exists() and json.loads(marker.read_text())["config"] == _latent_config(args):
        return json.loads(marker.read_text())["params"]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Flux2Transformer2DModel(**_latent_config(args))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(root / "transformer")
    params = sum(p.numel() for p in model.parameters())
    marker.write_text(json.dumps({"config": _latent_config(args), "params": params}))
    return params


def child(path: str, model_dir: str) -> None:
    """One build in this process; prints a JSON line with the RSS figures."""
    common.set_bench_environment()
    import deepspeed
    import diffusers  # noqa: F401  (ZeRO-3 hooks need diffusers and dynamo imported first)
    import torch
    import torch._dynamo  # noqa: F401
    from diffusers import Flux2Transformer2DModel

    from asymflow.convert import convert_transformer
    from asymflow.trainable import LoRASettings, apply_trainable, build_teacher, param_groups
    from orchestration.config import load_config
    from orchestration.deepspeed_config import build_deepspeed_config
    from orchestration.model_build import build_student_and_teacher

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29541"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(str(common.REPO / "configs" / "tiny.yaml"), [
        "model.kind=diffusers", f"model.path={model_dir}", "model.dtype=bfloat16", "train.workers=1",
        "train.global_batch=1", "train.micro_batch=1", "trainable.lora.rank=96", "trainable.lora.alpha=96.0"])
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(768, 128, generator=g, dtype=torch.float64))
    basis = basis.float()
    rss_imports, anon_imports = _rss(), _rss_parts()["RssAnon"]
    sampler = PeakSampler()
    if path == "current":
        student, teacher = build_student_and_teacher(cfg, basis, 2.0, lora_seed=0)
    else:
        latent = Flux2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer").to(torch.bfloat16)
        student = convert_transformer(latent, basis, 2.0)
        del latent
        teacher = build_teacher(student, share_base=False)
        apply_trainable(student, "lora", LoRASettings(rank=96, alpha=96.0))
        student.train()
    rss_built = _rss()
    build_peak = dict(sampler.peak)  # the model build alone, before DeepSpeed adds the trainable set's states
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(student, t.lr, t.lr_multipliers, t.weight_decay), lr=t.lr)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=build_deepspeed_config(t, 1, False))
    params = sum(p.ds_numel for p in engine.module.parameters())
    peak_parts = sampler.stop()
    trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
    print(json.dumps({"path": path, "anon_imports": anon_imports, "peak_anon": peak_parts["RssAnon"],
                      "peak_file": peak_parts["RssFile"], "build_peak_anon": build_peak["RssAnon"],
                      "trainable_state_bytes": trainable * 16,  # fp32 param + master + Adam m, v
                      "rss_imports": rss_imports, "rss_built": rss_built, "rss_engine": _rss(),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": params,
                      "teacher_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters())}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--double", type=int, default=3)
    ap.add_argument("--single", type=int, default=6)
    ap.add_argument("--child", choices=("current", "previous"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model_dir)
        return

    common.set_bench_environment()
    root = common.CACHE / "build-memory-model"
    latent_params = write_model(root, args)
    load_bytes = latent_params * 2  # bf16
    out = {}
    for path in ("previous", "current"):
        proc = subprocess.run([sys.executable, __file__, "--child", path, "--model-dir", str(root)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"build_memory: the {path} build failed:\n{proc.stderr[-3000:]}")
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = out[path]
        print(f"  {path:8s}: peak {(r['peak_rss'] - r['rss_imports']) / MB:.0f} MiB above imports "
              f"({(r['peak_rss'] - r['rss_imports']) / load_bytes:.2f}× the {load_bytes / MB:.0f} MiB bf16 model; "
              f"private {(r['peak_anon'] - r['anon_imports']) / load_bytes:.2f}×, mapped file pages "
              f"{r['peak_file'] / MB:.0f} MiB; build alone {(r['build_peak_anon'] - r['anon_imports']) / load_bytes:.2f}×), "
              f"after build {(r['rss_built'] - r['rss_imports']) / MB:.0f} MiB, teacher {r['teacher_bytes'] / MB:.0f} MiB "
              f"[load {common.load()}]", flush=True)
    config = {"latent": _latent_config(args), "latent_params": latent_params, "load_dtype": "bfloat16",
              "lora_rank": 96, "zero3_ranks": 1}
    peaks = {p: out[p]["peak_rss"] - out[p]["rss_imports"] for p in out}
    for p in out:
        figures = {k: round(v / MB) for k, v in out[p].items() if k.startswith(("rss", "peak", "teacher", "anon"))}
        common.record("build_memory", f"{p}_peak_rss_over_model_bytes", peaks[p] / load_bytes, None, None,
                      "× (peak RSS − RSS after imports) / parameters × 2 bytes; goal for current ≤ 1.3", config=config,
                      figures_MiB=figures)
        build = out[p]["build_peak_anon"] - out[p]["anon_imports"]
        common.record("build_memory", f"{p}_build_peak_private_rss_over_model_bytes", build / load_bytes, None, None,
                      "× (peak RssAnon while loading, converting and making the teacher − RssAnon after imports) / "
                      "parameters × 2 bytes (mmapped weight file pages excluded: a node's ranks share them through the "
                      "page cache)", config=config, figures_MiB=figures)
        private = out[p]["peak_anon"] - out[p]["anon_imports"]
        common.record("build_memory", f"{p}_engine_peak_private_rss_over_model_bytes", private / load_bytes, None,
                      None, "× (peak RssAnon through deepspeed.initialize at 1 rank − after imports) / parameters × 2 "
                      f"bytes; includes the trainable set's fp32 states "
                      f"({out[p]['trainable_state_bytes'] / load_bytes:.2f}× at 1 rank, divided by the rank count)",
                      config=config, figures_MiB=figures)
    common.record("build_memory", "current_vs_previous_peak_rss", peaks["current"] / MB, peaks["previous"] / MB,
                  peaks["current"] / peaks["previous"], "MiB above imports (baseline: the path before issue 12)",
                  config=config)


if __name__ == "__main__":
    main()
