"""Safe decoding of untrusted image bytes into 8-bit RGB PIL images.

Owns: the decompression-bomb check (pixel count read from the header before any pixel is
decoded), truncation/corruption detection (a full load, with Pillow's LOAD_TRUNCATED_IMAGES
left False), conversion of every supported mode to RGB, EXIF orientation, JPEG draft
(DCT-scaled) decoding, and the ingestion-time check + storage encoding of one image.

Mode conversions (decided here, used everywhere):
- L / 1 / CMYK / YCbCr / RGBX / P without transparency: ``Image.convert("RGB")``.
- Anything with alpha (RGBA, LA, PA, La, RGBa, P with transparency) is composited on WHITE,
  so transparent logos/cut-outs get a neutral background instead of arbitrary hidden RGB.
- 16-bit grayscale (I;16*, and "I" which Pillow uses for 16-bit PNG/TIFF) is scaled
  0..65535 -> 0..255 with rounding (value * 255 / 65535); "I" values outside 0..65535 clip.
- F, LAB, HSV and other modes Pillow cannot turn into RGB -> DecodeError("unsupported_mode").
- ICC profiles are not applied (plain conversions only).

Decompression-bomb limits: our own ``max_pixels`` check is what decides. Pillow's
DecompressionBombWarning (over Image.MAX_IMAGE_PIXELS) is silenced while opening so that
``max_pixels`` may sit above Pillow's default; Pillow's DecompressionBombError (over twice
that) becomes DecodeError("too_large").

Which PIL (``pil_build``): plain Pillow or Pillow-SIMD (the drop-in fork with SIMD resize,
filters and conversions, built from source by ``make simd``). Both install the package ``PIL``;
the one imported is told apart once per process by the distribution whose files hold it.

Storage policy (``prepare_for_storage``): JPEG (and MPO, a JPEG with extra frames), PNG and
WEBP bytes are stored unchanged (EXIF orientation stays in the file and is applied at decode
time); every other decodable format (BMP, TIFF, GIF first frame, PPM, AVIF...) is decoded to
RGB and re-encoded losslessly as PNG.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import mmap
import warnings
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we let Pillow try (restricting the list avoids weak-magic formats such as TGA
# "recognising" random bytes). Names missing from the installed Pillow are skipped.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")
# Pillow format name -> file extension used in shards / reports.
FORMAT_EXT = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
    "BMP": "bmp", "TIFF": "tif", "PPM": "ppm", "AVIF": "avif",
}
# Extensions whose original bytes are stored as they are.
STORED_EXTS = frozenset({"jpg", "png", "webp"})

_JPEG_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DecodeError(Exception):
    """An image that cannot be used. ``reason`` is a short stable slug, ``detail`` free text.

    Reasons: empty, not_an_image, truncated, corrupt, too_large, too_small, unsupported_mode.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _owning_distribution() -> str:
    """"pillow-simd" or "pillow": the installed distribution whose files hold the imported PIL.

    Both distributions install ``PIL/``; a venv may list both (an overlay venv that shadows the
    base venv's Pillow, or Pillow reinstalled over Pillow-SIMD), so the match is by location and
    version. Pillow-SIMD versions are Pillow's plus ``.postN``, the fallback when metadata is gone.
    """
    here = Path(PIL.__file__).resolve()
    for name in ("pillow-simd", "pillow"):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version == PIL.__version__ and Path(str(dist.locate_file("PIL/__init__.py"))).resolve() == here:
            return name
    return "pillow-simd" if ".post" in PIL.__version__ else "pillow"


def _simd_flags() -> str:
    """"avx2", "sse4" or "unknown": the instruction set a Pillow-SIMD build was compiled for, read
    from the compiler flags gcc records in ``_imaging``'s debug info (absent when built without -g)."""
    try:
        from PIL import _imaging

        with open(_imaging.__file__, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"-mavx2") >= 0:
                return "avx2"
            return "sse4" if data.find(b"-msse4") >= 0 else "unknown"
    except (ImportError, OSError, ValueError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def pil_build() -> dict:
    """The PIL this process runs on, found once per process (a few ms):
    ``{"name": "pillow"|"pillow-simd", "version", "simd": "avx2"|"sse4"|"unknown"|None,
    "libjpeg_turbo": version or None}``."""
    from PIL import features

    name = _owning_distribution()
    try:
        turbo = features.version("libjpeg_turbo")
    except Exception:  # older Pillow without that feature name
        turbo = None
    return {"name": name, "version": PIL.__version__, "simd": _simd_flags() if name == "pillow-simd" else None,
            "libjpeg_turbo": turbo}


def _available_formats() -> list[str]:
    Image.init()
    return [name for name in DECODABLE_FORMATS if name in Image.OPEN]


def _error_from_exception(exc: Exception) -> DecodeError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return DecodeError("truncated", message)
    return DecodeError("corrupt", f"{type(exc).__name__}: {message}")


def _open_checked(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Open lazily (header only) and apply the size checks before any pixel is decoded."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"{len(data)} bytes in no supported image format") from None
    except MemoryError:
        raise
    except Exception as exc:  # untrusted input: plugins raise many exception types
        raise _error_from_exception(exc) from None
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}")
    if min(width, height) < min_side:
        raise DecodeError("too_small", f"{width}x{height}, shorter side < {min_side}")
    return img


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # broken EXIF block: treat as "no orientation"
        return 1


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise _error_from_exception(exc) from None


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # orientation unreadable after all: keep pixels as stored
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any supported mode to 8-bit RGB (see module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "F":
        raise DecodeError("unsupported_mode", "32-bit float pixels (mode F)")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise DecodeError("unsupported_mode", f"mode {mode}: {exc}") from None


def decode_image(
    data: bytes,
    *,
    max_pixels: int = 100_000_000,
    min_side: int = 16,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode image bytes to an RGB image with EXIF orientation applied.

    ``draft_size=(w, h)``: for JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) whose
    result is still >= (w, h) in the displayed (post-rotation) orientation; other formats
    are decoded at full size. The caller resizes. Raises DecodeError.
    """
    img = _open_checked(data, max_pixels, min_side)
    if draft_size is not None:
        draft_w, draft_h = (int(v) for v in draft_size)
        if draft_w < 1 or draft_h < 1:
            raise ValueError(f"draft_size must be two positive ints, got {draft_size!r}")
        if img.format in _JPEG_FORMATS:
            # JPEG EXIF sits in the header: reading it does not load pixels
            if _exif_orientation(img) in _ROTATED_ORIENTATIONS:  # stored axes are swapped
                draft_w, draft_h = draft_h, draft_w
            img.draft("RGB", (draft_w, draft_h))
    _load(img)
    # only after load: for PNG/WEBP getexif() loads the image itself and would swallow errors
    img = _apply_orientation(img, _exif_orientation(img))
    return to_rgb(img)


def validate_image(
    data: bytes, *, max_pixels: int = 100_000_000, min_side: int = 16
) -> tuple[str, int, int]:
    """Fully check one image; return (format ext, width, height after EXIF orientation).

    Every byte of pixel data is decoded (JPEGs at 1/8 DCT scale, which still reads and
    entropy-decodes the whole file) so truncated/corrupt files fail here. Raises DecodeError.
    """
    img = _open_checked(data, max_pixels, min_side)
    ext = FORMAT_EXT.get(img.format, str(img.format).lower())
    width, height = img.size  # header size: the draft below shrinks img.size
    if img.format in _JPEG_FORMATS:
        img.draft(None, (1, 1))
    _load(img)
    if _exif_orientation(img) in _ROTATED_ORIENTATIONS:  # after load, see decode_image
        width, height = height, width
    to_rgb(img)  # unsupported modes fail at ingestion, not at training time
    return ext, width, height


def prepare_for_storage(
    data: bytes, *, max_pixels: int = 100_000_000, min_side: int = 16
) -> tuple[bytes, str, int, int]:
    """Validate and return (bytes to store, ext, width, height) following the storage policy."""
    ext, width, height = validate_image(data, max_pixels=max_pixels, min_side=min_side)
    if ext in STORED_EXTS:
        return bytes(data), ext, width, height
    img = decode_image(data, max_pixels=max_pixels, min_side=min_side)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue(), "png", img.width, img.height
