"""One image, source bytes to stored bytes: decode (reduced-size for JPEG), orient, convert to RGB, bucket, resize-to-cover, crop, encode.

Defaults, and why:
- Stored images are lossless PNG by default: the pixel model is trained to reproduce fine detail, so the
  targets must not contain JPEG blocking/ringing the model would learn as "detail". PNG is written with
  zlib's run-length strategy (Z_RLE) at level 1: on filtered photographs it is as small as Pillow's default
  (level 6; bench corpus: 1149 vs 1153 kB per 1024² image) and 4-5x faster, because the expensive part of
  deflate, the match search, buys nothing after PNG's row filters. Rows use PNG's fixed Average filter,
  computed for the whole image at once in numpy (`png_filter="avg"`, our own small writer): Pillow's writer
  tries all five filters per row and on photos ends up with Paeth, which costs ~1.9x the encode time (74 vs
  40 ms CPU per 1024² bench image) for 2-6% fewer bytes; Paeth is also the slowest filter to undo, so Average
  PNGs decode ~35% faster with Pillow (what the training reader uses). `png_filter="adaptive"` keeps
  Pillow's writer. `--format jpg` stores JPEG at quality 95 with 4:4:4 chroma (no chroma subsampling: colour
  edges stay sharp), ~4x smaller; `--format webp` stores lossy WebP at `--quality` (lossless at 100).
- Buckets: one bucket per aspect ratio in DEFAULT_ASPECT_RATIOS (1:2 … 2:1), each with area ≈ N² and sides
  multiples of 16 (VAE factor 8 × latent patch 2); an image goes to the bucket nearest in log-aspect.
- Resize to cover the bucket with Lanczos and centre-crop. Images that would need upscaling are skipped as
  `too_small` unless `upscale=True`; `min_side` additionally drops tiny images even when upscaling.
- `max_pixels` (default 100 MP) is the decompression-bomb limit, checked from the header before decoding.
- Fast path: JPEG sources are decoded with libjpeg's DCT scaling (Pillow `draft`) straight to the smallest
  power-of-two reduction that still covers the bucket, so a 3000-px JPEG is never fully decoded for a
  1024² bucket; non-JPEG sources at least 4x the bucket use Pillow's `reducing_gap=2` (integer box-reduce,
  then a Lanczos step that still downscales ≥ 2x and so removes most of the box filter's aliasing). Measured
  against a plain Lanczos resize on skimage's photos at 4-6x: ≥ 46 dB PSNR (median 50); a 6000x4000 PNG to
  1248x832 resizes in 110 instead of 235 ms CPU. Gap 1 (reduce right down to the bucket, as the JPEG DCT
  scaling does) would halve the resize of the bench's 2560-px PNGs too, but costs 34-40 dB, i.e. as much
  as JPEG q95 artefacts, which is what lossless PNG storage is meant to avoid. Crop and resize happen in one
  `resize(box=...)` call on the decoded image, without an intermediate crop copy.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from data_prep.format import bucket_str

ImageFormat = Literal["png", "jpg", "webp"]

# (width : height) ratios; symmetric in log space around 1:1.
DEFAULT_ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 2), (9, 16), (2, 3), (3, 4), (4, 5), (1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1),
)
SIDE_MULTIPLE = 16
DEFAULT_MAX_PIXELS = 100_000_000
EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (as in PIL.ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SRGB_PROFILE = ImageCms.createProfile("sRGB")


class SkipImage(Exception):
    """The input cannot become a sample; `reason` is one of format.SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def make_buckets(resolution: int, aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS) -> tuple[tuple[int, int], ...]:
    """Bucket (width, height) per aspect ratio r = a/b: w ≈ N·√r, h ≈ N/√r, each rounded to a multiple of 16."""
    if resolution % SIDE_MULTIPLE:
        raise ValueError(f"resolution {resolution} is not a multiple of {SIDE_MULTIPLE}")
    out: list[tuple[int, int]] = []
    for a, b in aspect_ratios:
        r = math.sqrt(a / b)
        w = max(SIDE_MULTIPLE, round(resolution * r / SIDE_MULTIPLE) * SIDE_MULTIPLE)
        h = max(SIDE_MULTIPLE, round(resolution / r / SIDE_MULTIPLE) * SIDE_MULTIPLE)
        if (w, h) not in out:
            out.append((w, h))
    return tuple(out)


def nearest_bucket(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """Bucket whose aspect ratio is nearest in log space (ties -> the earlier bucket)."""
    log_ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ar))


def cover_crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[float, tuple[float, float, float, float]]:
    """Scale s = max(bw/w, bh/h) that makes the image cover the bucket, and the centred crop box (in source pixels)
    that maps onto the bucket after scaling: (x0, y0, x0 + bw/s, y0 + bh/s)."""
    bw, bh = bucket
    s = max(bw / width, bh / height)
    cw, ch = bw / s, bh / s
    x0, y0 = (width - cw) / 2, (height - ch) / 2
    # Clamp float round-off (e.g. -1e-14) on the covering side: Pillow rejects boxes outside the image.
    return s, (max(x0, 0.0), max(y0, 0.0), min(x0 + cw, float(width)), min(y0 + ch, float(height)))


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What `process_image` produces; part of the builder config recorded in the manifest."""

    buckets: tuple[tuple[int, int], ...]
    format: ImageFormat = "png"
    quality: int = 95  # jpg / webp
    png_compress_level: int = 1  # with Z_RLE the level hardly changes size; 1 is the fastest
    png_filter: Literal["avg", "adaptive"] = "avg"  # avg: our numpy writer; adaptive: Pillow's per-row choice
    min_side: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    upscale: bool = False


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    data: bytes  # encoded stored image
    width: int
    height: int
    original_width: int  # after EXIF orientation
    original_height: int
    crop_box: tuple[float, float, float, float]  # in oriented source pixels

    @property
    def bucket(self) -> str:
        return bucket_str(self.width, self.height)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's own warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipImage("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise SkipImage("not_an_image", "no decoder recognises the bytes") from None
    except Exception as e:  # header parsers raise SyntaxError/OSError/ValueError/struct.error on garbage
        reason = "truncated" if "truncated" in str(e) else "not_an_image"
        raise SkipImage(reason, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise SkipImage("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    if w <= 0 or h <= 0:
        raise SkipImage("corrupt", f"size {w}x{h}")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not lose the image; treat it as upright
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError/zlib.error depending on the codec
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise SkipImage(reason, f"{type(e).__name__}: {e}") from None


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit 'L' by scaling, not clipping (Pillow's convert('L') clips)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
        a8 = (a.astype(np.float32) * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8)
    elif im.mode == "F" and a.max(initial=0) <= 1.0:
        a8 = (a * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    else:
        a8 = a.clip(0, 255).astype(np.uint8)
    return Image.fromarray(a8, "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit sRGB 'RGB'; alpha composited on white; embedded ICC profiles converted to sRGB."""
    icc = im.info.get("icc_profile")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _high_bit_depth_to_l(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        # Composite before resizing: resampling straight (non-premultiplied) RGBA would bleed hidden colours.
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    if icc and im.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im.convert("RGB") if im.mode == "RGBA" else im, src, _SRGB_PROFILE, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile is common in the wild; fall back to Pillow's plain conversion
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise SkipImage("unsupported", f"cannot convert mode {im.mode} to RGB: {e}") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_AVERAGE_FILTER = 3
_PNG_IDAT_MAX = 1 << 20  # split IDAT like common writers do; decoders concatenate the chunks


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_average_rgb8(im: Image.Image, compress_level: int = 1) -> bytes:
    """8-bit RGB PNG, every row filtered with PNG's Average filter, deflated with Z_RLE (see the module docstring).

    The Average predictor is floor((left + up) / 2) of the *unfiltered* neighbours (0 outside the image), so
    for encoding it has no row-to-row dependency and vectorises over the whole image; it is computed in uint8
    as (l & u) + ((l ^ u) >> 1), which equals the floor of the mean without widening to 16 bits."""
    rows = np.asarray(im)
    if rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[2] != 3:
        raise ValueError(f"expected an 8-bit RGB image, got mode {im.mode}")
    h, w, c = rows.shape
    rows = rows.reshape(h, w * c)
    pred = np.empty_like(rows)
    left, up = rows[1:, :-c], rows[:-1, c:]
    np.add(left & up, (left ^ up) >> 1, out=pred[1:, c:])
    np.right_shift(rows[0, :-c], 1, out=pred[0, c:])  # first row: no row above
    np.right_shift(rows[:-1, :c], 1, out=pred[1:, :c])  # first pixel of a row: nothing to its left
    pred[0, :c] = 0
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = _PNG_AVERAGE_FILTER
    np.subtract(rows, pred, out=raw[:, 1:])  # uint8 wraps modulo 256, as PNG specifies
    z = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(raw.data) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit truecolour, deflate, adaptive-filter method, no interlace
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    parts += [_png_chunk(b"IDAT", idat[i : i + _PNG_IDAT_MAX]) for i in range(0, len(idat), _PNG_IDAT_MAX)]
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def encode(im: Image.Image, fmt: ImageFormat, quality: int = 95, png_compress_level: int = 1, png_filter: str = "avg") -> bytes:
    """Encode an RGB image; output bytes depend only on pixels and settings (no timestamps)."""
    buf = io.BytesIO()
    if fmt == "png" and png_filter == "avg" and im.mode == "RGB":
        return png_average_rgb8(im, png_compress_level)
    if fmt == "png":
        im.save(buf, "PNG", compress_level=png_compress_level, compress_type=zlib.Z_RLE)
    elif fmt == "jpg":
        im.save(buf, "JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, lossless=quality >= 100, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def process_image(data: bytes, spec: ImageSpec) -> ProcessedImage:
    """Source image bytes -> stored sample image; raises SkipImage with a reason for unusable inputs."""
    im = _open(data, spec.max_pixels)
    orientation = _orientation(im)
    swap = orientation in (5, 6, 7, 8)  # rotated by 90°: stored width is displayed height
    w, h = (im.height, im.width) if swap else im.size
    if min(w, h) < spec.min_side:
        raise SkipImage("too_small", f"{w}x{h} has a side below min_side {spec.min_side}")
    bucket = nearest_bucket(w, h, spec.buckets)
    s, box = cover_crop_box(w, h, bucket)
    if s > 1.0 + 1e-9 and not spec.upscale:
        raise SkipImage("too_small", f"{w}x{h} would need upscaling x{s:.3f} to cover bucket {bucket_str(*bucket)}")

    decode_scale = 1.0  # source pixels per decoded pixel
    if im.format == "JPEG" and s < 0.5:
        # Ask libjpeg for the smallest 1/2^k reduction that still covers the scaled image: the Lanczos step
        # below then stays a (mild) downscale, so quality matches a full decode + resize.
        need = (math.ceil(w * s), math.ceil(h * s))
        if swap:
            need = need[::-1]
        stored_width = im.width
        drafted = im.draft(None, need)
        if drafted is not None:  # (mode, (0, 0, width / scale, height / scale)) in stored orientation
            decode_scale = stored_width / drafted[1][2]
    _load(im)
    if orientation != 1:
        im = im.transpose(_ORIENTATION_TRANSPOSE[orientation])
    im = to_rgb(im)

    dbox = tuple(c / decode_scale for c in box)
    if im.size != bucket or dbox != (0.0, 0.0, float(im.width), float(im.height)):
        # gap 2: box-reduce only by factors that leave ≥ 2x for Lanczos (≥ 46 dB vs plain Lanczos, module docstring)
        im = im.resize(bucket, Image.Resampling.LANCZOS, box=dbox, reducing_gap=2.0)
    return ProcessedImage(
        data=encode(im, spec.format, spec.quality, spec.png_compress_level, spec.png_filter),
        width=bucket[0],
        height=bucket[1],
        original_width=w,
        original_height=h,
        crop_box=tuple(round(c, 3) for c in box),  # type: ignore[arg-type]
    )
