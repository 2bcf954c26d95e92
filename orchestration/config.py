"""The typed run config (one pydantic tree loaded from YAML, dotted overrides), validated before any worker starts."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from asymflow.components import TRAINING_FAMILY, BaseModelConfig
from asymflow.objective import AsymFlowVRConfig
from asymflow.trainable import FULL_MODULES, LoRASettings
from orchestration.data_plan import DataSection

PIXEL_PATCH = 16  # 8× VAE × 2×2 latent packing: one latent token is one 16×16 pixel patch


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubspaceSection(_Section):
    """The subspace artifact (B, s); defaults to `{data.path}/subspace.safetensors` written by `asymflow prep subspace`."""

    path: str | None = None
    rank: int = Field(128, gt=0, description="latent token width r (128 for FLUX.2)")


class TrainableSection(_Section):
    """What is trained (spec §9): LoRA + fully trained modules, or everything."""

    mode: Literal["lora", "full"] = "lora"
    lora: LoRASettings = LoRASettings()
    full_modules: tuple[str, ...] = FULL_MODULES
    teacher: Literal["auto", "tied", "copy"] = Field(
        "auto",
        description="tied: the student's own modules with LoRA off + frozen copies of full_modules (no second copy of "
        "the base; LoRA only); copy: a whole frozen copy of the converted init per rank (needed for mode full); "
        "auto: tied for lora, copy for full",
    )

    frozen_params: Literal["partitioned", "replicated"] = Field(
        "partitioned",
        description="where the frozen base lives (orchestration/frozen_params.py): partitioned by ZeRO-3 (gathered "
        "for every pass over it, 2·N/r bytes per GPU) or replicated (whole on every rank, outside ZeRO-3: no frozen "
        "traffic, 2·N bytes per GPU); the trainable state is partitioned either way. LoRA only",
    )

    @model_validator(mode="after")
    def _teacher_fits_mode(self) -> TrainableSection:
        if self.teacher == "tied" and self.mode == "full":
            raise ValueError("trainable.teacher 'tied' needs trainable.mode 'lora' (a fully trained student has no "
                             "frozen base to share); use 'copy' or 'auto'")
        if self.frozen_params == "replicated" and self.mode == "full":
            raise ValueError("trainable.frozen_params 'replicated' needs trainable.mode 'lora' (a fully trained "
                             "student has no frozen parameters to replicate); use 'partitioned'")
        return self

    def teacher_kind(self) -> Literal["tied", "copy"]:
        """The teacher the worker builds: `teacher`, with auto resolved from the mode."""
        if self.teacher != "auto":
            return self.teacher
        return "tied" if self.mode == "lora" else "copy"


class PerceptualSection(_Section):
    """The image distance of the perceptual term: LPIPS-VGG from local weights, a tiny stand-in, or none."""

    kind: Literal["none", "tiny", "lpips"] = "lpips"
    weights_path: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _weights(self) -> PerceptualSection:
        if self.kind == "lpips" and not self.weights_path:
            raise ValueError("perceptual.weights_path is required when perceptual.kind is 'lpips' (no downloads)")
        return self


class TrainSection(_Section):
    """Batch arithmetic, optimiser, schedule, clipping: global_batch = micro_batch × workers × grad_accum."""

    steps: int = Field(15_000, gt=0)
    global_batch: int = Field(256, gt=0)
    micro_batch: int = Field(8, gt=0)
    grad_accum: int | None = Field(None, gt=0, description="derived from the other three when omitted")
    workers: int = Field(32, gt=0)
    use_gpu: bool = True
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    adam_eps: float = Field(1e-8, gt=0)
    lr_multipliers: dict[str, float] = {"proj_out": 10.0}
    warmup_steps: int = Field(100, ge=0)
    warmup_start_factor: float = Field(1e-3, gt=0, le=1)
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after warmup: constant (spec §9), or cosine / linear decay to min_lr at train.steps")
    min_lr: float = Field(0.0, ge=0, description="the decaying schedules' final lr (default-group lr; multipliers keep "
                          "their ratio)")
    grad_clip: float | None = Field(200.0, gt=0, description="global L2 norm; None disables clipping")
    grad_clip_from_step: int = Field(100, ge=0)
    seed: int = 0
    activation_checkpointing: bool = True
    # FLUX.1-dev is guidance-distilled: its transformer takes the guidance scale as an input (guidance_embeds) and
    # cannot run without one. The default is the value its own pipeline samples with (the family's
    # SamplerDefaults.embedded_guidance, 3.5 for FLUX.1): the teacher's targets then are the converted model at the
    # guidance it is used at, and the student learns the conditioning it will be sampled with.
    guidance: float | None = Field(
        None, ge=0, description="the guidance value a guidance-distilled model (transformer config guidance_embeds, "
        "e.g. FLUX.1-dev) takes in training, for student and teacher alike; None: the family's sampler default "
        "(FLUX.1: 3.5). Refused for a model without a guidance embedding")

    @model_validator(mode="after")
    def _min_lr(self) -> TrainSection:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}")
        return self

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainSection:
        per_step = self.micro_batch * self.workers
        if self.grad_accum is None:
            if self.global_batch % per_step:
                raise ValueError(
                    f"train.global_batch={self.global_batch} is not divisible by train.micro_batch × train.workers = "
                    f"{self.micro_batch} × {self.workers} = {per_step}"
                )
        elif per_step * self.grad_accum != self.global_batch:
            raise ValueError(
                f"train.global_batch={self.global_batch} must equal train.micro_batch × train.workers × train.grad_accum"
                f" = {self.micro_batch} × {self.workers} × {self.grad_accum} = {per_step * self.grad_accum}"
            )
        return self

    @property
    def accum(self) -> int:
        """Gradient accumulation steps (explicit or derived)."""
        return self.grad_accum or self.global_batch // (self.micro_batch * self.workers)


class EMASection(_Section):
    """EMA of trainable parameters, Karras power schedule (spec §9)."""

    start_iter: int = Field(100, ge=0)
    gamma: float = Field(7.0, gt=0)


class CheckpointSection(_Section):
    every: int = Field(500, gt=0, description="checkpoint every N steps (and always at the end)")
    keep: int = Field(3, ge=2, description="keep the last k complete checkpoints (k ≥ 2)")
    upload_retries: int = Field(5, ge=1, description="tries per object-storage write before the run fails")
    upload_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per try, capped at 30 s")


class RunSection(_Section):
    """Run identity: STORAGE/NAME is the run directory; same name + storage resumes."""

    name: str = Field("asymflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    storage: str = "runs"
    max_failures: int = Field(3, ge=-1, description="Ray Train FailureConfig; -1 retries forever")
    ray_address: str | None = Field(None, description="None: start a local Ray on 127.0.0.1")
    ray_num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray instance (None: all)")
    preemption_poll_every: int = Field(10, ge=0, description="steps between polls of Ray's preemption notice; 0: off")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of the worker group (SPREAD: one worker per node if possible)"
    )
    min_workers: int | None = Field(
        None, gt=0, description="elastic: any worker count in [min_workers, train.workers]; None: fixed"
    )


class LogSection(_Section):
    every: int = Field(10, gt=0)
    wandb_mode: Literal["offline", "online", "disabled"] | None = Field(
        None, description="None: the user's $WANDB_MODE, else offline (the entry points default it to offline)")
    wandb_project: str = "asymflow"
    wandb_entity: str | None = None
    wandb_name: str | None = Field(None, description="display name of the wandb run [run.name]")
    wandb_group: str | None = None
    wandb_tags: tuple[str, ...] = ()

    def wandb_init_kwargs(self, run_name: str) -> dict[str, Any]:
        """The wandb.init arguments this section decides; `mode=None` lets wandb read $WANDB_MODE itself."""
        return {"project": self.wandb_project, "entity": self.wandb_entity, "mode": self.wandb_mode,
                "name": self.wandb_name or run_name, "group": self.wandb_group, "tags": list(self.wandb_tags) or None}


class SampleSection(_Section):
    """In-training samples from the EMA weights, rendered from the consolidated checkpoint on rank 0."""

    every: int = Field(0, ge=0, description="0 disables sampling; otherwise a multiple of checkpoint.every")
    prompts: tuple[str, ...] = ("a photo of a cat",)
    height: int = Field(256, gt=0)
    width: int = Field(256, gt=0)
    steps: int = Field(32, gt=0)
    guidance: float = Field(4.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the sampling Ray task (0: CPU)")

    @model_validator(mode="after")
    def _resolution(self) -> SampleSection:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % PIXEL_PATCH:
                raise ValueError(f"sample.{name}={value} is not a multiple of {PIXEL_PATCH} (the pixel patch size)")
        return self


def _plain(value: Any) -> dict[str, Any]:
    """A section given as a mapping or as its pydantic object, as a new dict."""
    return value.model_dump() if isinstance(value, BaseModel) else dict(value or {})


def _run_family(model: Any) -> str | None:
    """The family of a `model:` section (given or detected), or None when the section does not validate or names
    an unwired family: the field validators and preflight say why."""
    try:
        cfg = model if isinstance(model, BaseModelConfig) else BaseModelConfig.model_validate(model or {})
        return cfg.check_family()
    except (ValueError, ValidationError):
        return None


class RunConfig(_Section):
    """The whole run: each component receives only its own section.

    For a model family other than FLUX.2 the family's geometry and trained set are the defaults of the fields that
    depend on them (`_family_defaults`): subspace.rank (C_lat·q²), objective.patch_size / latent_patch,
    trainable.full_modules and trainable.lora.targets; values written in the config win. A FLUX.2 config is left
    exactly as written (its defaults are FLUX.2's), so its resolved config and hash do not change.
    """

    model: BaseModelConfig = BaseModelConfig()
    data: DataSection
    subspace: SubspaceSection = SubspaceSection()
    objective: AsymFlowVRConfig = AsymFlowVRConfig()
    perceptual: PerceptualSection = PerceptualSection(kind="none")
    trainable: TrainableSection = TrainableSection()
    train: TrainSection = TrainSection()
    ema: EMASection = EMASection()
    checkpoint: CheckpointSection = CheckpointSection()
    run: RunSection = RunSection()
    log: LogSection = LogSection()
    sample: SampleSection = SampleSection()

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        family_name = _run_family(data.get("model"))
        if family_name in (None, TRAINING_FAMILY):
            return data
        from asymflow.families import get_family

        family = get_family(family_name)
        data = dict(data)
        subspace, objective, trainable = (_plain(data.get(k)) for k in ("subspace", "objective", "trainable"))
        subspace.setdefault("rank", family.latent_dim)
        objective.setdefault("patch_size", family.pixel_patch)
        objective.setdefault("latent_patch", family.latent_patch)
        trainable.setdefault("full_modules", family.full_modules)
        lora = _plain(trainable.get("lora"))
        lora.setdefault("targets", family.lora_targets)
        trainable["lora"] = lora
        # The resolved config (state.json of every checkpoint) names the family even if model.path moves later.
        model = {**_plain(data.get("model")), "family": family_name}
        data.update(model=model, subspace=subspace, objective=objective, trainable=trainable)
        return data

    def family(self) -> str:
        """The model family this run trains (model.family or the one model.path's files name; FLUX.2 by default)."""
        return _run_family(self.model) or TRAINING_FAMILY

    @model_validator(mode="after")
    def _cross_sections(self) -> RunConfig:
        from asymflow.families import get_family

        family = get_family(self.family())
        if self.objective.patch_size != family.pixel_patch:
            raise ValueError(f"objective.patch_size={self.objective.patch_size} must be {family.pixel_patch} for "
                             f"{family.title} (VAE factor {family.vae_factor} × latent patch {family.latent_patch})")
        if self.objective.latent_patch != family.latent_patch:
            raise ValueError(f"objective.latent_patch={self.objective.latent_patch} must be {family.latent_patch} for "
                             f"{family.title}")
        if family.name == TRAINING_FAMILY and self.train.guidance is not None:
            raise ValueError(f"train.guidance={self.train.guidance} is for guidance-distilled models of the other "
                             "families (FLUX.1-dev); FLUX.2 training gives the model no guidance value")
        for name in ("height", "width"):
            if getattr(self.sample, name) % family.pixel_patch:
                raise ValueError(f"sample.{name}={getattr(self.sample, name)} is not a multiple of {family.pixel_patch} "
                                 f"({family.title}'s pixel patch size)")
        if self.run.min_workers is not None:
            if self.run.min_workers > self.train.workers:
                raise ValueError(f"run.min_workers={self.run.min_workers} exceeds train.workers={self.train.workers}")
            per_worker = self.train.micro_batch * (self.train.grad_accum or 1)
            bad = [w for w in range(self.run.min_workers, self.train.workers + 1)
                   if self.train.global_batch % (per_worker * w)]
            if bad or self.train.grad_accum is not None:
                raise ValueError(
                    f"run.min_workers={self.run.min_workers}: train.global_batch={self.train.global_batch} must be "
                    f"divisible by train.micro_batch × workers for every count in [min_workers, train.workers] "
                    f"with grad_accum derived (not set); fails for {bad or 'an explicit train.grad_accum'}"
                )
        if self.sample.every and self.sample.every % self.checkpoint.every:
            raise ValueError(
                f"sample.every={self.sample.every} must be a multiple of checkpoint.every={self.checkpoint.every}"
                " (samples are rendered from checkpoints)"
            )
        if self.sample.every and self.train.use_gpu and not self.sample.num_gpus:
            # The sampling task rebuilds the base and the text encoder where it runs: on a CPU that is hours per image
            # at klein sizes, and the trainer waits for the last one before it returns.
            raise ValueError(
                f"sample.every={self.sample.every} on a GPU run renders on the CPU (sample.num_gpus=0): hours per image "
                "for a klein-sized model. Give the sampling task a spare GPU (sample.num_gpus: 1, checked against the "
                "cluster at launch), or set sample.every: 0 and render checkpoints with `asymflow sample RUN_DIR --step N`"
            )
        return self

    def sampling_gpu_shortfall(self, cluster_gpus: float) -> str | None:
        """Why in-training sampling could never be scheduled on a cluster with `cluster_gpus` GPUs, or None.

        The training workers hold `train.workers` GPUs for the whole run, so a sampling task that needs a GPU runs
        only if the cluster has one to spare; otherwise it would wait forever and the run would never finish.
        """
        if not (self.sample.every and self.sample.num_gpus):
            return None
        needed = self.train.workers * (1 if self.train.use_gpu else 0) + self.sample.num_gpus
        if cluster_gpus >= needed:
            return None
        return (f"sample.num_gpus={self.sample.num_gpus:g} needs a GPU beside the {self.train.workers} training "
                f"worker(s): {needed:g} GPUs in all, the cluster has {cluster_gpus:g}. Set sample.every: 0 (and use "
                "`asymflow sample`), lower sample.num_gpus, or add a GPU node")

    @property
    def run_dir(self) -> str:
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"

    @property
    def subspace_path(self) -> str:
        return self.subspace.path or f"{str(self.data.path).rstrip('/')}/subspace.safetensors"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """Hash of what defines the optimisation trajectory: everything but run identity, worker count, step
        budget and logging, which may change between a run and its resume."""
        data = self.to_dict()
        data.pop("run")
        data.pop("log")
        data.pop("sample")
        data["model"].pop("family")  # model.path decides it (a contradicting one is refused); older runs hash alike
        if data["train"]["guidance"] is None:
            data["train"].pop("guidance")  # the family default; runs from before the field hash alike
        data["train"].pop("workers")
        data["train"].pop("grad_accum")
        data["train"].pop("micro_batch")
        data["train"].pop("steps")
        data["data"].pop("loader_workers", None)
        data["data"].pop("prefetch_batches", None)
        data["checkpoint"].pop("upload_retries", None)
        data["checkpoint"].pop("upload_backoff_s", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A run config that cannot start; the message names the offending field(s)."""


def _coerce(text: str) -> Any:
    """YAML scalar semantics for `--set` values (1e-4 → float, true → bool, [1,2] → list, null → None)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. an unbalanced bracket): the string as written, validated by its field
    # PyYAML reads `1e-4` as a string (YAML 1.1 needs a dot); numbers in overrides are meant as numbers.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set(out: dict[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.strip().split(".")
    node = out
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str], flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply dotted `key=value` overrides (YAML-typed) then explicit flags (`{"run.name": "2024"}`, taken as given:
    a flag's string stays a string) to a raw mapping (new dict; sections are created as needed)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: must look like section.key=value")
        key, text = item.split("=", 1)
        kind = _text_field(key.strip())
        value = _coerce(text) if kind is None or (kind == "optional" and text.strip() in ("null", "~")) else text
        _set(out, key, value, f"--set {item}")
    for key, value in (flags or {}).items():
        _set(out, key, value, key)
    return out


def _text_field(key: str) -> str | None:
    """"text" / "optional" for a string field (run.name, data.path, ...), else None: `--set run.name=2024` means
    the text "2024", not the number."""
    model: Any = RunConfig
    field = None
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = field.annotation
    if field is None:
        return None
    return "text" if field.annotation is str else "optional" if field.annotation == (str | None) else None


def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every dotted key of the run config (sections and fields), for suggestions."""
    model = model or RunConfig
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(config_keys(ann, f"{prefix}{name}."))
    return keys


def _suggest(key: str) -> str:
    """` (did you mean `train.lr`?)` for an unknown dotted key, or ''."""
    import difflib

    keys = config_keys()
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    match = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.6))
    return f" (did you mean `{match[0]}`?)" if match else ""


def _origin(field: str, overrides: list[str], flags: dict[str, str]) -> str | None:
    """Which command-line item set `field` (or a value inside it), if any; the last one wins, as when applied."""
    for key, flag in reversed(list(flags.items())):
        if field == key or field.startswith(key + "."):
            return flag
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            return f"--set {item}"
    return None


def _format_errors(exc: ValidationError, source: str, overrides: list[str] = (),
                   flags: dict[str, str] | None = None) -> str:
    """One line: each bad field, blamed on the `--set`/flag that set it or on the YAML file."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{_suggest(field)}"
        origin = _origin(field, list(overrides), flags or {})
        if origin is None and err["type"] == "extra_forbidden":
            origin = source
        parts.append(f"{origin or source}: {field}: {msg}")
    return "invalid run config: " + "; ".join(parts)


def read_yaml(path: str) -> dict[str, Any]:
    """The run config's YAML mapping (an empty file is an empty mapping); unreadable files raise ConfigError."""
    from data_prep.run_config import read_yaml_file

    try:
        raw = read_yaml_file(path) or {}
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any], overrides: list[str] = (), source: str = "<dict>",
                 flags: dict[str, Any] | None = None, flag_names: dict[str, str] | None = None) -> RunConfig:
    """Validate a raw mapping plus overrides and flags; raises ConfigError naming each bad field and where it came
    from. `flag_names` maps a dotted key to the flag that set it (`{"run.name": "--name 2024"}`) for messages."""
    try:
        return RunConfig.model_validate(apply_overrides(raw, list(overrides), flags))
    except ValidationError as exc:
        names = flag_names or {k: f"{k}={v}" for k, v in (flags or {}).items()}
        raise ConfigError(_format_errors(exc, source, list(overrides), names)) from None


def load_config(path: str, overrides: list[str] = (), flags: dict[str, Any] | None = None,
                flag_names: dict[str, str] | None = None) -> RunConfig:
    """Read YAML at `path` (local or fsspec URL) and apply dotted overrides, then explicit flags."""
    return build_config(read_yaml(path), overrides, source=path, flags=flags, flag_names=flag_names)


def local_file(path: str) -> str:
    """A local filename for `path` (itself when local; a cached download for a URL): safetensors needs one."""
    return fsspec.open_local(f"simplecache::{path}") if "://" in path else path


def save_resolved(cfg: RunConfig, run_dir: str) -> str:
    """Write `config.yaml` (the resolved config) into the run directory; returns its path."""
    path = f"{run_dir.rstrip('/')}/config.yaml"
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(str(Path(fs_path).parent), exist_ok=True)
    with fs.open(fs_path, "w") as f:
        f.write("# Resolved run config: the YAML file, then --set overrides, then flags; local paths made absolute.\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return path
