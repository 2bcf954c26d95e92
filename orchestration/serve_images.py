"""Images `asymflow serve` writes: the PNG with prompt and settings in its metadata, the latent comparison panel."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from orchestration.png_metadata import png_info


def png_with_metadata(image: Image.Image, path: Path, settings: dict[str, Any]) -> Path:
    """Save `image` as PNG with the text chunks of `orchestration.png_metadata` (as `asymflow sample` writes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "PNG", pnginfo=png_info(settings, "asymflow serve"))
    return path


def zoomed_crop(image: Image.Image, fraction: int = 4) -> Image.Image:
    """The centre 1/fraction of each side, enlarged back to full size with nearest neighbour (pixels stay pixels)."""
    w, h = image.size
    cw, ch = max(1, w // fraction), max(1, h // fraction)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.NEAREST)


def compare_panel(pixel: Image.Image, latent: Image.Image, label_height: int = 16) -> Image.Image:
    """2×2 grid with labels: pixel | latent+AE on top, their zoomed centre crops below (the crop outlined above)."""
    w, h = pixel.size
    panel = Image.new("RGB", (2 * w + 4, 2 * (h + label_height) + 4), "white")
    draw = ImageDraw.Draw(panel)
    for col, (name, im) in enumerate((("pixel (AsymFlow)", pixel), ("latent + autoencoder", latent))):
        x = col * (w + 4)
        draw.text((x + 2, 2), name, fill="black")
        panel.paste(im, (x, label_height))
        cw, ch = w // 4, h // 4
        box = (x + (w - cw) // 2, label_height + (h - ch) // 2)
        draw.rectangle((box[0], box[1], box[0] + cw, box[1] + ch), outline="red")
        draw.text((x + 2, h + label_height + 4), "centre, 4x zoom", fill="black")
        panel.paste(zoomed_crop(im), (x, h + 2 * label_height + 4))
    return panel
