"""Decode and validate request images: PIL image, bytes or a path (or a list of them) -> RGB PIL.

Every failure a user's file can cause (missing, empty, not an image, corrupt, truncated, larger
than Pillow's pixel limit) becomes an `ImageError` naming the source, so the engine can fail
that one request and keep serving the rest.

Given the model's input size, a JPEG is decoded at the smallest of its DCT scales (1/1 to 1/8) that
still covers that size in both directions (Pillow's `Image.draft`): a 12-megapixel camera photo
for a 336-pixel model decodes at 1/8 scale, several times faster and in 1/64 of the memory, and
the processor's own resize then starts from more pixels than it keeps. The pixel limit applies to
the size the file declares, before any reduction.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps


class ImageError(ValueError):
    pass


# Larger files are refused before any read: a 1 GiB file named .jpg must not be read into memory to
# find out it is not an image (the pixel limit below only applies once a header was parsed).
MAX_FILE_BYTES = 512 << 20
_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def without_reprs(text: str) -> str:
    """`text` with object reprs (`<_io.BytesIO object at 0x7f..>`) shortened to their type, so the
    same cause reads the same in every row and groups in the job's summary."""
    return _REPR.sub(r"<\1>", text)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {without_reprs(str(e))}"


def describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"image file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    if isinstance(src, Image.Image):
        return f"PIL image ({src.mode}, {src.size[0]}x{src.size[1]})"
    return f"image of type {type(src).__name__}"


def load_images(src: Any, min_size: tuple[int, int] | None = None) -> list[Image.Image]:
    """A single source or a list/tuple of sources -> list of RGB images. None -> []."""
    if src is None:
        return []
    if isinstance(src, (list, tuple)):
        return [load_image(s, min_size) for s in src]
    return [load_image(src, min_size)]


def load_image(src: Any, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `src`; `min_size` (width, height): the model needs at least this many pixels in each
    direction, so a JPEG may be decoded at a reduced scale that still covers it."""
    what = describe(src)
    opened = _open(src, what)
    try:
        _check_pixels(opened, what)
        try:
            if min_size is not None and opened is not src and opened.format == "JPEG":
                opened.draft("RGB", _oriented(opened, min_size))
            opened.load()
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
            raise ImageError(f"{what}: cannot decode ({_reason(e)})") from e
        img = _exif_transpose(opened)
        img = to_rgb(img)
        if img is opened and not isinstance(src, Image.Image):
            img = img.copy()  # detach from the source buffer so it can be freed
        return img
    finally:
        if opened is not src:
            opened.close()


def _open(src: Any, what: str) -> Image.Image:
    """The image opened lazily: Pillow reads the header (format, size) here and the pixels only in
    load(), so a file that is no image costs a header read, never the whole file."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageError(f"{what}: no such file") from None
        except OSError as e:
            raise ImageError(f"{what}: cannot read ({_reason(e)})") from e
        if not path.is_file():
            raise ImageError(f"{what}: not a regular file")
        size = st.st_size
        source: Any = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        size = len(src)
        source = io.BytesIO(bytes(src))
    else:
        raise ImageError(f"unsupported {what}: pass a PIL image, bytes, or a path")
    if size == 0:
        raise ImageError(f"{what}: empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageError(
            f"{what}: {size / 2**20:.0f} MiB exceeds the image file limit of "
            f"{MAX_FILE_BYTES / 2**20:.0f} MiB (modelyard.engine.images.MAX_FILE_BYTES)"
        )
    try:
        return Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{what}: not a readable image (the file's header is no image format Pillow knows)") from e
    except OSError as e:
        if e.errno is not None:  # the file system failed, not the format
            raise ImageError(f"{what}: cannot read ({_reason(e)})") from e
        raise ImageError(f"{what}: not a readable image ({_reason(e)})") from e
    except Exception as e:  # a header too broken to parse
        raise ImageError(f"{what}: not a readable image ({_reason(e)})") from e


def _oriented(img: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """`size` in the file's stored orientation: EXIF rotations by 90 degrees swap the axes."""
    try:
        rotated = img.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:
        rotated = False
    return (size[1], size[0]) if rotated else size


def _check_pixels(img: Image.Image, what: str) -> None:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a server must refuse instead.
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit is not None and w * h > limit:
        raise ImageError(f"{what}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
    if w < 1 or h < 1:
        raise ImageError(f"{what}: empty image ({w}x{h})")


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:
        # Broken orientation metadata on pixels that decoded fine: the pixels are still the
        # image the user sent, so caption them as stored rather than failing the request.
        return img


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparent pixels go onto white, as transformers does."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # Pillow's own conversion clips 16/32-bit values at 255; rescale to keep the picture.
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")
