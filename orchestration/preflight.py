"""Driver-side preflight: local paths made absolute, then every input a worker would load or compute, checked.

A run must never fail only inside the workers on something the driver could have checked: there every failure costs
a Ray + DeepSpeed start and `run.max_failures` restarts. Each `ConfigError` names the field it is about.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from asymflow.components import TRAINING_FAMILY
from orchestration.config import ConfigError, RunConfig, local_file

if TYPE_CHECKING:
    from data_prep.reader import DatasetIndex

DIFFUSERS_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")


def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str | None) -> str | None:
    if path is None or _is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _looks_local(path: str) -> bool:
    """A model.path that names a directory here (a hub id like `org/name` does not, unless it exists)."""
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(path))


def resolve_local_paths(cfg: RunConfig) -> RunConfig:
    """The config with every local path absolute (data.path, run.storage, subspace.path, model.path,
    perceptual.weights_path): Ray workers run in another directory, so a relative path would resolve elsewhere.
    URLs and hub ids are kept as written."""
    data = cfg.to_dict()
    data["data"]["path"] = _absolute(data["data"]["path"])
    data["run"]["storage"] = _absolute(data["run"]["storage"])
    data["subspace"]["path"] = _absolute(data["subspace"]["path"])
    data["perceptual"]["weights_path"] = _absolute(data["perceptual"]["weights_path"])
    if data["model"]["path"] and _looks_local(data["model"]["path"]):
        data["model"]["path"] = _absolute(data["model"]["path"])
    return RunConfig.model_validate(data)


def same_model(recorded: str, fingerprint: str) -> bool:
    """A recorded model fingerprint names the run's model. A cache built with a relative `model.path` recorded it
    relative (`diffusers:models/x`); it matches the run's absolute path when that ends with it."""
    if recorded == fingerprint:
        return True
    kind, _, path = recorded.partition(":")
    run_kind, _, run_path = fingerprint.partition(":")
    return kind == run_kind == "diffusers" and not os.path.isabs(path) and not _is_url(path) and \
        run_path.endswith("/" + os.path.normpath(path))


def check_model(cfg: RunConfig) -> None:
    """model.path: the base model's directory and the parts workers load (a hub id is left to the hub client); its
    family (model.family or the one its files name) must be the one training is wired for."""
    m = cfg.model
    try:
        family = m.check_family()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if m.kind == "tiny":
        return
    if m.kind == "bundled":
        from asymflow.components import BUNDLED_PATH

        root, parts = Path(m.path) if m.path else BUNDLED_PATH, ("transformer", "vae")
    else:
        if _is_url(m.path) or not _looks_local(m.path):
            return
        root, parts = Path(m.path), DIFFUSERS_PARTS
        if family != TRAINING_FAMILY:  # the pipeline's own text components (FLUX.1: CLIP + T5 and their tokenizers)
            from asymflow.families.load import text_component_names

            parts = ("transformer", "vae", *text_component_names(family))
    if not root.is_dir():
        raise ConfigError(f"model.path: {root} is not a directory (a diffusers model directory is expected)")
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise ConfigError(f"model.path: {root} lacks {', '.join(f'{p}/' for p in missing)} (expected subfolders "
                          f"{', '.join(parts)})")
    for part in ("transformer", "vae"):
        if not (root / part / "config.json").is_file():
            raise ConfigError(f"model.path: {root / part} has no config.json")
    if family != TRAINING_FAMILY:
        check_family_transformer(cfg, family, root / "transformer" / "config.json")


def check_family_transformer(cfg: RunConfig, family_name: str, config_file: Path) -> None:
    """A non-FLUX.2 base: its transformer config has the family's token geometry, and train.guidance is set only for
    a guidance-distilled model (the step would hand the guidance to a model that has no input for it)."""
    import json

    from asymflow.families import get_family

    try:
        config = json.loads(config_file.read_text())
        get_family(family_name).check_latent_config(config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: {config_file}: {exc}") from None
    if cfg.train.guidance is not None and not config.get("guidance_embeds", False):
        raise ConfigError(f"train.guidance={cfg.train.guidance}: the model in {cfg.model.path} has no guidance "
                          "embedding (its transformer config has no guidance_embeds: true); leave train.guidance unset")


def check_perceptual(cfg: RunConfig) -> None:
    """perceptual.weights_path: a readable safetensors file (LPIPS weights are never downloaded)."""
    p = cfg.perceptual
    if p.kind != "lpips":
        return
    fs, path = fsspec.core.url_to_fs(p.weights_path)
    if not fs.isfile(path):
        raise ConfigError(f"perceptual.weights_path: {p.weights_path} does not exist (make it with "
                          "`asymflow prep lpips`, see README)")
    try:
        from safetensors import safe_open

        with safe_open(local_file(p.weights_path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error classes)
        raise ConfigError(f"perceptual.weights_path: {p.weights_path} is not a safetensors file ({exc})") from None


def check_text_form(cfg: RunConfig, index: DatasetIndex) -> None:
    """A projected text cache (`prep cache --text-form projected`: context_embedder's outputs) is exact only for a run
    that keeps context_embedder frozen and has the very layer, weights and dtype, that computed it."""
    if not index.text_projected:
        return
    from asymflow.components import CONTEXT_EMBEDDER, context_embedder_fingerprint, load_context_embedder
    from asymflow.trainable import why_trained

    t = cfg.trainable
    reason = why_trained(CONTEXT_EMBEDDER, t.mode, t.lora, t.full_modules)
    if reason:
        raise ConfigError(f"trainable: this run trains {CONTEXT_EMBEDDER} ({reason}), but the cache in "
                          f"{index.cache_dir} holds projected text ({CONTEXT_EMBEDDER} outputs, exact only while it is "
                          "frozen); rebuild it with `asymflow prep cache --config CONFIG --text-form raw --overwrite`")
    m = cfg.model
    if m.kind == "diffusers" and (_is_url(m.path) or not _looks_local(m.path)):
        return  # a hub id: checking would load the whole transformer on the driver
    recorded = index.cache_manifest.get("context_embedder")
    actual = context_embedder_fingerprint(load_context_embedder(m))
    if recorded != actual:
        raise ConfigError(f"data.path: the projected text in {index.cache_dir} was computed by another "
                          f"{CONTEXT_EMBEDDER} (fingerprint {recorded}; this run's model, in model.dtype {m.dtype}, has "
                          f"{actual}); rebuild it with `asymflow prep cache --config CONFIG --text-form projected "
                          "--overwrite`")


def check_inputs(cfg: RunConfig) -> None:
    """Everything the workers load, on the driver: the dataset (manifest, shards, cache built by this model), the
    subspace (shape, provenance), the data plan (at least one full global batch), the model and LPIPS weights."""
    from asymflow.subspace import SubspaceArtifact
    from data_prep.format import FormatError, join
    from data_prep.reader import DatasetIndex
    from orchestration.data_plan import bucket_counts, steps_per_epoch

    # The model first: a cache or subspace "built by another model" is the wrong message when the model is missing.
    check_model(cfg)
    check_perceptual(cfg)
    try:
        index = DatasetIndex.open(cfg.data.path)
    except (FormatError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise ConfigError(f"data.path: {exc}") from None
    missing = [s["name"] for s in index.manifest["shards"] if not index.fs.exists(join(cfg.data.path, s["name"]))]
    if missing:
        raise ConfigError(f"data.path: {len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[:3]}")
    if not index.has_cache:
        raise ConfigError(f"data.path: {cfg.data.path} has no latent/text cache; run `asymflow prep cache`")
    family = cfg.family()
    if index.family != family:
        raise ConfigError(f"data.path: the cache in {index.cache_dir} holds {index.family} latents and text, this run "
                          f"trains a {family} model; rebuild it with `asymflow prep cache --config CONFIG --overwrite`")
    fingerprint = cfg.model.fingerprint()
    cached = index.cache_manifest.get("model_fingerprint")
    if cached is not None and not same_model(cached, fingerprint):
        raise ConfigError(f"data.path: the cache in {index.cache_dir} was built by model {cached!r}, this run's model "
                          f"is {fingerprint!r}; rebuild it with `asymflow prep cache --config CONFIG --overwrite`")
    check_text_form(cfg, index)
    path = cfg.subspace_path
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise ConfigError(f"subspace.path: subspace artifact {path} does not exist (run `asymflow prep subspace`)")
    try:
        # The family first: another family's artifact has another shape, and "wrong rank" is the wrong message.
        fitted_family = SubspaceArtifact.load(local_file(path)).extra.get("family", TRAINING_FAMILY)  # FLUX.2: none
        if fitted_family != family:
            raise ConfigError(f"subspace.path: {path} was fitted for a {fitted_family} model, this run trains a "
                              f"{family} model; refit it with `asymflow prep subspace`")
        artifact = SubspaceArtifact.load(local_file(path), patch_size=cfg.objective.patch_size, rank=cfg.subspace.rank)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"subspace.path: {exc}") from None
    fitted = artifact.extra.get("model_fingerprint")
    if fitted is not None and not same_model(fitted, fingerprint):
        raise ConfigError(f"subspace.path: {path} was fitted with model {fitted!r}, this run's model is "
                          f"{fingerprint!r}; refit it with `asymflow prep subspace`")
    g = cfg.train.global_batch
    if steps_per_epoch(index.table, g, cfg.data.drop_remainder) == 0:
        raise ConfigError(f"data.path: no bucket holds a full global batch of {g} samples (buckets: "
                          f"{bucket_counts(index.table)}); lower train.global_batch or set data.drop_remainder=false")
