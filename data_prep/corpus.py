"""Image corpora built from scikit-image's bundled photos (`skimage.data`, no downloads): clean, messy (every bad case `prep shards` must account for), large (benchmark), and img2dataset-style tars."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Photos that ship inside the scikit-image wheel (others need pooch downloads).
RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
GRAY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "page")
MESSY_RESOLUTION = 256  # the messy corpus's expected outcomes assume `--resolution 256`, no --upscale


def photo(name: str) -> np.ndarray:
    """A bundled skimage photo as uint8 (H, W, 3) or (H, W); stereo_motorcycle gives its left view."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    return arr[0] if isinstance(arr, tuple) else arr


# The 20 photos the bundled tiny base (assets/tiny_base/) was trained on: the 16 above plus 4 more in the wheel.
BASE_PHOTOS = RGB_PHOTOS + GRAY_PHOTOS + ("stereo_motorcycle", "logo", "cell", "text")
BASE_RESOLUTION = 128  # the bundled base's training crops are 128×128


def photo_crop(name: str, resolution: int = BASE_RESOLUTION) -> np.ndarray:
    """A bundled photo as the bundled base saw it: uint8 (resolution, resolution, 3); short side resized to
    `resolution` (Lanczos), centre crop, grey copied to 3 channels, boolean images as 0/255, RGBA composited on white."""
    arr = photo(name)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    im = Image.fromarray(arr)
    if im.mode == "RGBA":  # logo: composite on white
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    w, h = im.size
    k = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * k)), max(resolution, round(h * k))), Image.Resampling.LANCZOS)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution))).copy()


def base_caption(name: str) -> str:
    """The caption the bundled base was trained with: the photo's name with spaces (`hubble deep field`)."""
    return name.replace("_", " ")


def build_base_corpus(root: str | os.PathLike, resolution: int = BASE_RESOLUTION) -> list[str]:
    """The bundled base's training set as an image directory: `{i:02d}_{name}.png` crops (lossless, so `prep shards
    --resolution 128` stores them pixel for pixel) with `.txt` captions; returns the image paths, in BASE_PHOTOS order."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(BASE_PHOTOS):
        rel = f"{i:02d}_{name}.png"
        Image.fromarray(photo_crop(name, resolution)).save(root / rel, "PNG")
        (root / f"{i:02d}_{name}.txt").write_text(base_caption(name) + "\n", encoding="utf-8")
        out.append(rel)
    return out


def _save(path: Path, im: Image.Image, fmt: str, **kw: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes_raw(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG assembled chunk by chunk: lets tests write what Pillow cannot (16-bit RGB, headers that lie)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png16_rgb(arr8: np.ndarray) -> bytes:
    """16-bit-per-channel RGB PNG of an 8-bit RGB array (values ×257, so the 8-bit truth is known)."""
    a16 = arr8.astype(">u2") * 257
    raw = b"".join(b"\x00" + row.tobytes() for row in a16)  # filter type 0 per scanline
    return png_bytes_raw(a16.shape[1], a16.shape[0], 16, 2, zlib.compress(raw, 6))


def bomb_png(width: int, height: int) -> bytes:
    """A 1-kB PNG whose header claims width×height pixels: a decompression bomb as far as any decoder can tell."""
    return png_bytes_raw(width, height, 8, 2, zlib.compress(b"\x00" * 4096))


def jpeg_bytes(im: Image.Image, quality: int = 90, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def build_clean_corpus(root: str | os.PathLike) -> list[str]:
    """Photos in several formats with .txt captions; returns the relative paths of the images."""
    root = Path(root)
    out = []
    for i, name in enumerate(RGB_PHOTOS + GRAY_PHOTOS[:4]):
        ext = ("jpg", "png", "webp")[i % 3]
        rel = f"{name}.{ext}"
        _save(root / rel, Image.fromarray(photo(name)), {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], **({"quality": 90} if ext != "png" else {}))
        (root / f"{name}.txt").write_text(f"a photo: {name.replace('_', ' ')}\n", encoding="utf-8")
        out.append(rel)
    return out


def build_messy_corpus(root: str | os.PathLike) -> dict[str, str | None]:
    """Every case of the acceptance list; returns {relative image path: expected skip reason, None = written}.

    Expected outcomes assume `--resolution 256` (MESSY_RESOLUTION) and default limits.
    """
    root = Path(root)
    expect: dict[str, str | None] = {}

    def put(rel: str, data: bytes, reason: str | None) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expect[rel] = reason

    astronaut = Image.fromarray(photo("astronaut"))
    rocket = Image.fromarray(photo("rocket"))  # 640x427 landscape
    astronaut_jpg = jpeg_bytes(astronaut)
    # Formats and captions (.txt and .json sidecars).
    put("a_astronaut.jpg", astronaut_jpg, None)
    (root / "a_astronaut.txt").write_text("an astronaut with a flag\n", encoding="utf-8")
    _save(root / "b_coffee.png", Image.fromarray(photo("coffee")), "PNG")
    expect["b_coffee.png"] = None
    (root / "b_coffee.json").write_text(json.dumps({"caption": "a cup of coffee"}), encoding="utf-8")
    _save(root / "c_chelsea.webp", Image.fromarray(photo("chelsea")), "WEBP", quality=90)
    expect["c_chelsea.webp"] = None
    _save(root / "d_rocket.bmp", rocket, "BMP")
    expect["d_rocket.bmp"] = None
    _save(root / "e_hubble.tif", Image.fromarray(photo("hubble_deep_field")), "TIFF")
    expect["e_hubble.tif"] = None
    # Modes: grayscale, palette, 16-bit, alpha, CMYK.
    _save(root / "modes/camera_gray.png", Image.fromarray(photo("camera")), "PNG")
    _save(root / "modes/coins_palette.gif", Image.fromarray(photo("coins")).convert("P"), "GIF")
    _save(root / "modes/moon_16bit.png", Image.fromarray(photo("moon").astype(np.uint16) * 257), "PNG")
    put("modes/astronaut_16bit_rgb.png", png16_rgb(photo("astronaut")), None)
    _save(root / "modes/logo_rgba.png", Image.fromarray(photo("logo")), "PNG")
    camera = photo("camera")
    alpha = np.tile(np.linspace(0, 255, camera.shape[1], dtype=np.uint8), (camera.shape[0], 1))
    _save(root / "modes/camera_gray_alpha.png", Image.fromarray(np.stack([camera, alpha], -1), "LA"), "PNG")
    pal = Image.fromarray(photo("colorwheel")).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    _save(root / "modes/colorwheel_palette_transparent.png", pal, "PNG", transparency=0)
    put("modes/astronaut_cmyk.jpg", jpeg_bytes(astronaut.convert("CMYK")), None)
    for rel in ("modes/camera_gray.png", "modes/coins_palette.gif", "modes/moon_16bit.png", "modes/logo_rgba.png",
                "modes/camera_gray_alpha.png", "modes/colorwheel_palette_transparent.png"):
        expect[rel] = None
    # EXIF orientation: pixels stored rotated, the tag says how to display them upright (= the rocket photo).
    put("exif/rocket_orientation6.jpg", jpeg_bytes(rocket.transpose(Image.Transpose.ROTATE_90), exif=_exif(6)), None)
    put("exif/rocket_orientation3.jpg", jpeg_bytes(rocket.transpose(Image.Transpose.ROTATE_180), exif=_exif(3)), None)
    # Too small: below --min-side, and too small to cover a 256² bucket without upscaling.
    _save(root / "small/icon_16px.png", Image.fromarray(photo("astronaut")[::32, ::32]), "PNG")
    _save(root / "small/microaneurysms_102px.png", Image.fromarray(photo("microaneurysms")), "PNG")
    _save(root / "small/text_banner.png", Image.fromarray(photo("text")), "PNG")  # 448x172: 2.6:1
    expect.update({"small/icon_16px.png": "too_small", "small/microaneurysms_102px.png": "too_small", "small/text_banner.png": "too_small"})
    # Broken inputs.
    put("bad/bomb_1e10px.png", bomb_png(100_000, 100_000), "decompression_bomb")  # over Pillow's own limit
    put("bad/bomb_144mp.png", bomb_png(12_000, 12_000), "decompression_bomb")  # over ours (1e8), under Pillow's
    put("bad/truncated.jpg", astronaut_jpg[: len(astronaut_jpg) * 6 // 10], "truncated")
    coffee_png = io.BytesIO()
    Image.fromarray(photo("coffee")).save(coffee_png, "PNG")
    put("bad/truncated.png", coffee_png.getvalue()[: coffee_png.tell() // 2], "truncated")
    put("bad/zero_byte.jpg", b"", "zero_byte")
    put("bad/notes_not_an_image.png", b"shopping list: milk, eggs\n" * 20, "not_an_image")
    put("bad/random_bytes.jpg", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image")
    put("bad/bad_caption.jpg", jpeg_bytes(Image.fromarray(photo("chelsea"))), "bad_caption_encoding")
    (root / "bad/bad_caption.txt").write_bytes(b"caf\xe9 \xff\xfe latin-1 bytes")
    (root / "bad").mkdir(exist_ok=True)
    os.symlink("does_not_exist.jpg", root / "bad/dangling_symlink.jpg")
    expect["bad/dangling_symlink.jpg"] = "unreadable"
    # Exact duplicates of a_astronaut.jpg: one sorts right after it (same shard), one last (a later shard).
    put("a_astronaut_copy.jpg", astronaut_jpg, "duplicate")
    put("z_duplicate_of_astronaut.jpg", astronaut_jpg, "duplicate")
    return expect


def build_large_corpus(root: str | os.PathLike, count: int = 16, long_side: int = 2560, png_every: int = 2) -> list[Path]:
    """`count` large photos (skimage photos Lanczos-upscaled to `long_side`): every `png_every`-th a PNG, the rest JPEG q95; cached by parameters."""
    root = Path(root)
    stamp = root / "corpus.json"
    params = {"count": count, "long_side": long_side, "png_every": png_every, "version": 2}
    files = [root / f"large_{i:03d}.{'png' if i % png_every == png_every - 1 else 'jpg'}" for i in range(count)]
    if stamp.exists() and json.loads(stamp.read_text()) == params and all(f.exists() for f in files):
        return files
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("large_*"):  # files of other parameters would become inputs too
        old.unlink()
    names = RGB_PHOTOS + ("stereo_motorcycle",)
    for i, f in enumerate(files):
        im = Image.fromarray(photo(names[i % len(names)]))
        variant = i // len(names)
        # Distinct pixels per variant (mirror + a shifted crop), so no input is an exact duplicate of another.
        if variant % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.crop((variant, variant, im.width, im.height))
        s = long_side / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
        if f.suffix == ".jpg":
            im.save(f, "JPEG", quality=95)
        else:
            im.save(f, "PNG", compress_level=3)
    stamp.write_text(json.dumps(params))
    return files


def write_img2dataset_tars(root: str | os.PathLike, samples: list[tuple[bytes, str]], per_tar: int = 4) -> list[Path]:
    """Tars laid out like img2dataset output: 00000.tar with `{key}.jpg/.txt/.json`, plus its .parquet and _stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tars = []
    for t in range(0, len(samples), per_tar):
        shard = t // per_tar
        path = root / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i, (jpg, caption) in enumerate(samples[t : t + per_tar]):
                key = f"{shard:05d}{i:04d}"
                meta = {"url": f"https://example.invalid/{key}.jpg", "key": key, "status": "success", "caption": caption}
                w.write({"__key__": key, "jpg": jpg, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode()})
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(samples[t : t + per_tar])}))
        keys = [f"{shard:05d}{i:04d}" for i in range(len(samples[t : t + per_tar]))]
        pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), root / f"{shard:05d}.parquet")
        tars.append(path)
    return tars
