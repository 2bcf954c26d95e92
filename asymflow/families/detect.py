"""Which family a diffusers directory or config belongs to, from its `_class_name` entries."""
from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from .core import ModelFamily


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _class_names(source: Any) -> tuple[list[str], str]:
    """The class names that identify `source` (transformer first, then pipeline) and how to name it in errors."""
    if hasattr(source, "config") and not isinstance(source, (str, PathLike, Mapping)):  # a model: its classes
        return [cls.__name__ for cls in type(source).__mro__], type(source).__name__
    if isinstance(source, Mapping):
        return [str(source.get("_class_name"))], "config"
    path = Path(source)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            index = _read_json(path / "model_index.json")
            transformer = index.get("transformer")
            names = [transformer[1]] if isinstance(transformer, list) and len(transformer) == 2 else []
            return [*names, str(index.get("_class_name"))], str(path / "model_index.json")
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{source} holds neither model_index.json nor config.json: not a diffusers directory")
    elif not path.is_file():
        raise ValueError(f"{source} does not exist")
    return [str(_read_json(path).get("_class_name"))], str(path)


def detect_family(source: str | PathLike | Mapping[str, Any] | Any) -> ModelFamily:
    """The family of a diffusers pipeline directory (model_index.json), a transformer directory or config.json
    file, a config mapping as read from JSON (`_class_name`), or a model object (by its class and bases): matched
    by the transformer class, the pixel class or the pipeline class.

    Unknown or unsupported models raise a ValueError naming the class found and the supported families.
    """
    from .registry import FAMILIES, supported_families

    names, where = _class_names(source)
    for family in FAMILIES.values():
        pixel_name = family.pixel_class_path.split(":")[1]
        known = {family.transformer_class, pixel_name, *family.pipeline_classes}
        if any(name in known for name in names):
            return family
    raise ValueError(f"{where} describes {' / '.join(names[:2])}, not a supported model; supported families: "
                     f"{supported_families()}")
