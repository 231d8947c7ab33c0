"""Test helpers that make real image files: photos, odd modes, and broken files of every kind.

Photos come from the scikit-image wheel's data folder (read with Pillow, no download).
``write_odd_images(folder)`` writes one file per case and returns what ingestion must say
about each: "accepted" or the DecodeError reason.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(name: str = "astronaut.png", size: tuple[int, int] | None = None) -> Image.Image:
    """A bundled scikit-image photograph as RGB, optionally resized to ``size``."""
    import skimage.data

    with Image.open(Path(skimage.data.data_dir) / name) as img:
        rgb = img.convert("RGB")
    return rgb.resize(size, Image.BICUBIC) if size else rgb


def encode(img: Image.Image, fmt: str = "JPEG", **save_kwargs) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        save_kwargs.setdefault("quality", 90)
    img.save(out, format=fmt, **save_kwargs)
    return out.getvalue()


def photo_jpeg(name: str = "astronaut.png", size: tuple[int, int] | None = (96, 96)) -> bytes:
    return encode(photo(name, size))


def truncated(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data (IDAT) is overwritten with garbage."""
    data = bytearray(encode(photo("coffee.png", (64, 64)), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 200] = b"\xff" * 200
    return bytes(data)


def random_binary(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0), size: int = 48) -> bytes:
    """Default color is pure red in CMYK."""
    return encode(Image.new("CMYK", (size, size), cmyk))


def gray_jpeg(size: tuple[int, int] = (64, 40)) -> bytes:
    return encode(photo("camera.png", size).convert("L"))


def palette_png(transparent_index: int | None = None) -> bytes:
    """32x32 palette PNG: left half color 0 (green), right half color 1 (blue)."""
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 200, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (16, 0, 32, 32))
    kwargs = {} if transparent_index is None else {"transparency": transparent_index}
    return encode(img, "PNG", **kwargs)


def gray16_png(value: int, size: int = 32) -> bytes:
    return encode(Image.fromarray(np.full((size, size), value, dtype=np.uint16)), "PNG")


def rgba_png() -> bytes:
    """32x32 red: left half fully transparent, right half half-transparent (alpha 128)."""
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[:, 16:, 3] = 128
    return encode(Image.fromarray(pixels), "PNG")


def la_png() -> bytes:
    """32x32 gray 50: top half opaque, bottom half transparent."""
    pixels = np.zeros((32, 32, 2), dtype=np.uint8)
    pixels[..., 0] = 50
    pixels[:16, :, 1] = 255
    return encode(Image.fromarray(pixels, "LA"), "PNG")


def exif_rotated_jpeg(width: int = 64, height: int = 32, orientation: int = 6) -> bytes:
    """Stored ``width x height``: left half red, right half blue; EXIF says rotate."""
    img = Image.new("RGB", (width, height), (255, 0, 0))
    img.paste((0, 0, 255), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, exif=exif.tobytes())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.lru_cache(maxsize=4)
def huge_png(width: int, height: int, rows_present: int | None = None) -> bytes:
    """A 1-bit black PNG of ``width x height`` (tiny in bytes: zeros compress ~1000x).

    ``rows_present`` keeps only that many rows of pixel data: a decoder that looked past the
    header would then fail with "truncated", not "too_large".
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height if rows_present is None else rows_present)]
    # an unfinished zlib stream: a finished one would make Pillow fill missing rows silently
    parts.append(compressor.flush(zlib.Z_FINISH if rows_present is None else zlib.Z_SYNC_FLUSH))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def huge_jpeg_header(width: int = 60000, height: int = 60000) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim ``width x height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (9, 9, 9))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiny_png(side: int = 8) -> bytes:
    return encode(Image.new("RGB", (side, side), (10, 20, 30)), "PNG")


def float_tiff() -> bytes:
    return encode(Image.new("F", (32, 32), 0.5), "TIFF")


def bmp_image() -> bytes:
    return encode(photo("chelsea.png", (40, 30)), "BMP")


# file name -> (bytes factory, expected ingestion outcome)
ODD_CASES = {
    "photo_a.jpg": (lambda: photo_jpeg("astronaut.png"), "accepted"),
    "photo_b.jpg": (lambda: photo_jpeg("rocket.jpg"), "accepted"),
    "photo_c.webp": (lambda: encode(photo("coffee.png", (80, 60)), "WEBP"), "accepted"),
    "cmyk.jpg": (cmyk_jpeg, "accepted"),
    "gray.jpg": (gray_jpeg, "accepted"),
    "palette.png": (palette_png, "accepted"),
    "palette_transparent.png": (lambda: palette_png(0), "accepted"),
    "gray16.png": (lambda: gray16_png(0x8080), "accepted"),
    "rgba.png": (rgba_png, "accepted"),
    "la.png": (la_png, "accepted"),
    "rotated.jpg": (exif_rotated_jpeg, "accepted"),
    "bitmap.bmp": (bmp_image, "accepted"),
    "truncated.jpg": (lambda: truncated(photo_jpeg("chelsea.png")), "truncated"),
    "truncated.png": (lambda: truncated(encode(photo("coffee.png", (64, 64)), "PNG")), "truncated"),
    "corrupt.png": (corrupt_png, "corrupt"),
    "empty.jpg": (lambda: b"", "empty"),
    "text.jpg": (lambda: b"this is not an image, just some text\n" * 10, "not_an_image"),
    "random.bin": (random_binary, "not_an_image"),
    "huge.png": (lambda: huge_png(20000, 20000), "too_large"),
    "huge_header_only.png": (lambda: huge_png(11000, 11000, rows_present=4), "too_large"),
    "huge_header.jpg": (huge_jpeg_header, "too_large"),
    "tiny.png": (tiny_png, "too_small"),
    "float.tif": (float_tiff, "unsupported_mode"),
}


def write_odd_images(folder: str | Path) -> dict[Path, str]:
    """Write every ODD_CASES file into ``folder``; return path -> expected outcome."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (make, outcome) in ODD_CASES.items():
        path = folder / name
        path.write_bytes(make())
        expected[path] = outcome
    return expected
