"""Read the parts of a run-config YAML that data prep needs: the base model's `model:` section."""
from __future__ import annotations

from typing import Any

import fsspec
import yaml
from pydantic import ValidationError

from asymflow.components import DATA_PREP_FAMILIES, BaseModelConfig


def read_yaml_file(path: str) -> Any:
    """The parsed YAML at `path` (local or fsspec URL; None for an empty file). Every way reading it can fail is one
    message naming the file: FileNotFoundError for a missing file, ValueError otherwise (the run-config loaders of
    data prep and orchestration share this)."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (UTF-8) file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None


def read_run_config(path: str) -> dict[str, Any]:
    """The YAML mapping at `path` (local or fsspec URL); other sections are validated by orchestration."""
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ValueError(f"run config {path} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def load_model_config(path: str) -> BaseModelConfig:
    """The `model:` section of the run config at `path` as a validated BaseModelConfig, of a family data prep is
    wired for (model.family or the family a local model.path's files name; `DATA_PREP_FAMILIES`)."""
    raw = read_run_config(path)
    if "model" not in raw:
        raise ValueError(f"run config {path} has no `model:` section (data prep takes the base model from it)")
    try:
        cfg = BaseModelConfig.model_validate(raw["model"] or {}, context={"families": DATA_PREP_FAMILIES})
    except ValidationError as exc:
        bad = "; ".join(f"model.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors())
        raise ValueError(f"{path}: invalid `model:` section: {bad}") from None
    try:
        cfg.check_family(DATA_PREP_FAMILIES)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return cfg
