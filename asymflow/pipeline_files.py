"""A saved pipeline directory that diffusers' own `DiffusionPipeline.from_pretrained` loads: the custom-pipeline file
diffusers looks for (model_index.json `_class_name = [module, class]`) as a one-line shim importing asymflow's class."""
from __future__ import annotations

import json
from pathlib import Path

SHIM_MODULE = "pipeline_asymflow"  # <dir>/pipeline_asymflow.py; diffusers copies and imports it
SHIM = (
    '"""Custom-pipeline entry point for diffusers: DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)."""\n'
    "from {module} import {name}  # noqa: F401\n"
)
DEFAULT_MODULE = "asymflow.pipeline"  # AsymFlux2KleinPipeline's; the family pipeline passes its own


def shim_text(class_name: str, module: str = DEFAULT_MODULE) -> str:
    return SHIM.format(name=class_name, module=module)


def write_custom_pipeline_files(directory: str | Path, class_name: str, module: str = DEFAULT_MODULE) -> None:
    """Write the shim (importing `class_name` from `module`) and point model_index.json's `_class_name` at it
    (diffusers' `_resolve_custom_pipeline_and_cls`: a [module, class] pair whose module file sits in the directory)."""
    directory = Path(directory)
    (directory / f"{SHIM_MODULE}.py").write_text(shim_text(class_name, module))
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [SHIM_MODULE, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def has_own_shim(directory: str | Path, class_name: str, module: str = DEFAULT_MODULE) -> bool:
    """True when the directory's custom-pipeline file is byte for byte the shim we write: running it only imports
    asymflow's own class, so our `from_pretrained` may trust it. Anything else is left to the caller's
    `trust_remote_code` decision."""
    path = Path(directory) / f"{SHIM_MODULE}.py"
    return path.is_file() and path.read_text() == shim_text(class_name, module)
