"""The PNG text chunks of every image we write (`asymflow sample`, `asymflow serve`): one layout, so one reader
finds the prompt and settings whichever command made the image."""
from __future__ import annotations

import json
from typing import Any

from PIL.PngImagePlugin import PngInfo

METADATA_KEY = "asymflow"  # text chunk holding every setting as JSON


def png_info(settings: dict[str, Any], software: str) -> PngInfo:
    """Chunks `prompt`, `negative_prompt`, `seed` (when the settings have them), every setting as JSON under
    'asymflow', and `Software`."""
    info = PngInfo()
    for key in ("prompt", "negative_prompt", "seed"):
        if key in settings:
            info.add_text(key, str(settings[key]))
    info.add_text(METADATA_KEY, json.dumps(settings, sort_keys=True))
    info.add_text("Software", software)
    return info
