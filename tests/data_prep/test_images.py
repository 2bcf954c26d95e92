"""Per-image pipeline: buckets, cover-crop geometry, EXIF orientation, mode conversion, reduced JPEG decoding, skip reasons."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from data_prep.corpus import bomb_png, jpeg_bytes, photo, png16_rgb
from data_prep.images import ImageSpec, SkipImage, cover_crop_box, encode, make_buckets, nearest_bucket, png_average_rgb8, process_image

SPEC = ImageSpec(buckets=make_buckets(256))


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / float(np.mean((a - b) ** 2)))


@pytest.mark.parametrize("n", [256, 512, 1024])
def test_buckets_area_multiple_of_16_and_ratio_range(n: int) -> None:
    buckets = make_buckets(n)
    assert (n, n) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / n**2 - 1) < 0.08, (w, h)
        assert 0.45 <= w / h <= 2.2
    ratios = sorted(w / h for w, h in buckets)
    assert ratios[0] < 0.52 and ratios[-1] > 1.9  # spans ~1:2 .. 2:1


def test_nearest_bucket_and_cover_crop() -> None:
    buckets = make_buckets(1024)
    assert nearest_bucket(3000, 2000, buckets) == (1248, 832)  # 3:2
    assert nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    assert nearest_bucket(10000, 100, buckets) == (1456, 720)  # panoramas go to the widest bucket
    s, (x0, y0, x1, y1) = cover_crop_box(3000, 1500, (1024, 1024))
    assert s == pytest.approx(1024 / 1500)
    assert (x1 - x0) * s == pytest.approx(1024) and (y1 - y0) * s == pytest.approx(1024)
    assert x0 == pytest.approx(750) and y0 == 0.0  # centred crop of the long side


def test_exif_orientation_is_applied() -> None:
    rocket = Image.fromarray(photo("rocket"))  # 640x427 landscape
    upright = process_image(png(rocket), SPEC)
    for orientation, stored in ((6, rocket.transpose(Image.Transpose.ROTATE_90)), (3, rocket.transpose(Image.Transpose.ROTATE_180))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = process_image(jpeg_bytes(stored, quality=95, exif=exif.tobytes()), SPEC)
        assert (out.original_width, out.original_height) == (640, 427)
        assert out.width > out.height
        assert psnr(decode(out.data), decode(upright.data)) > 28  # same picture, same way up (JPEG q95 noise only)


def test_modes_convert_to_rgb() -> None:
    moon = photo("moon")
    from_8bit = decode(process_image(png(Image.fromarray(moon)), SPEC).data)
    from_16bit = decode(process_image(png(Image.fromarray(moon.astype(np.uint16) * 257)), SPEC).data)
    assert np.abs(from_16bit - from_8bit).max() <= 1  # scaled, not clipped to 255

    astronaut = photo("astronaut")
    rgb = decode(process_image(png(Image.fromarray(astronaut)), SPEC).data)
    assert np.abs(decode(process_image(png16_rgb(astronaut), SPEC).data) - rgb).max() <= 1
    cmyk = decode(process_image(jpeg_bytes(Image.fromarray(astronaut).convert("CMYK"), quality=95), SPEC).data)
    assert psnr(cmyk, rgb) > 30

    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half, opaque on the right
    rgba[:, 150:, 3] = 255
    out = decode(process_image(png(Image.fromarray(rgba, "RGBA")), SPEC).data)
    assert np.allclose(out[:, :100], 255)  # composited on white
    assert np.allclose(out[:, -100:], [255, 0, 0])


def test_reduced_jpeg_decode_matches_full_decode() -> None:
    big = Image.fromarray(photo("astronaut")).resize((2048, 2048), Image.Resampling.LANCZOS)
    data = jpeg_bytes(big, quality=95)
    ours = decode(process_image(data, SPEC).data)
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)).astype(np.float64)
    assert psnr(ours, naive) > 35


def test_large_png_reduce_then_lanczos_matches_lanczos() -> None:
    """Non-JPEG sources ≥ 4x the bucket are box-reduced first (reducing_gap=2): close to a plain Lanczos resize."""
    data = png(Image.fromarray(photo("retina")))  # 1411² → 256² bucket: 5.5x, reduced by 2 then Lanczos 2.76x
    ours = decode(process_image(data, SPEC).data)
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)).astype(np.float64)
    assert psnr(ours, plain) > 45


def test_output_formats() -> None:
    data = png(Image.fromarray(photo("coffee")))
    jpg = process_image(data, ImageSpec(buckets=SPEC.buckets, format="jpg"))
    with Image.open(io.BytesIO(jpg.data)) as im:
        assert im.format == "JPEG" and JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
    webp = process_image(data, ImageSpec(buckets=SPEC.buckets, format="webp", quality=100))
    with Image.open(io.BytesIO(webp.data)) as im:
        assert im.format == "WEBP"
    assert process_image(data, SPEC).data == process_image(data, SPEC).data  # deterministic bytes


@pytest.mark.parametrize("h, w", [(1, 1), (1, 9), (7, 1), (17, 5), (300, 451)])
def test_png_writer_is_lossless(h: int, w: int) -> None:
    """Our Average-filter PNG writer: any decoder gets the exact pixels back (edges: first row, first column)."""
    rng = np.random.default_rng(h * 1000 + w)
    for a in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.full((h, w, 3), 255, np.uint8), photo("chelsea")[:h, :w]):
        data = png_average_rgb8(Image.fromarray(a))
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), a)


def test_png_filters_same_pixels() -> None:
    im = Image.fromarray(photo("astronaut"))
    avg, adaptive = encode(im, "png"), encode(im, "png", png_filter="adaptive")
    assert avg != adaptive and np.array_equal(decode(avg), decode(adaptive))
    assert len(avg) < 1.1 * len(adaptive)  # the fixed filter costs a few % of size (see images.py)


def test_upscale_only_when_asked() -> None:
    small = png(Image.fromarray(photo("microaneurysms")))  # 102x102
    with pytest.raises(SkipImage) as e:
        process_image(small, SPEC)
    assert e.value.reason == "too_small"
    out = process_image(small, ImageSpec(buckets=SPEC.buckets, upscale=True))
    assert (out.width, out.height) == (256, 256)


@pytest.mark.parametrize(
    "data, reason",
    [
        (bomb_png(100_000, 100_000), "decompression_bomb"),
        (bomb_png(12_000, 12_000), "decompression_bomb"),
        (b"not an image at all" * 10, "not_an_image"),
        (jpeg_bytes(Image.fromarray(photo("astronaut")))[:5000], "truncated"),
        (png(Image.fromarray(photo("astronaut")[::16, ::16])), "too_small"),
    ],
)
def test_skip_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(SkipImage) as e:
        process_image(data, SPEC)
    assert e.value.reason == reason
