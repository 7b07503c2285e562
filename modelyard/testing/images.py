"""Sample images for tests, demos and benchmarks: varied drawn scenes, awkward-but-valid files, broken files."""

from __future__ import annotations

import io
import random
from pathlib import Path

_ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 2)]


def _scene(rng: random.Random, w: int, h: int):
    from PIL import Image, ImageDraw

    c0 = tuple(rng.randint(0, 255) for _ in range(3))
    c1 = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), c0)
    draw = ImageDraw.Draw(img)
    for y in range(0, h, max(1, h // 32)):  # a vertical gradient in bands (cheap)
        t = y / max(1, h - 1)
        col = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1))
        draw.rectangle([0, y, w, y + max(1, h // 32)], fill=col)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        x1, y1 = rng.randint(x0, w), rng.randint(y0, h)
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        kind = rng.choice(["ellipse", "rect", "poly", "line"])
        if kind == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif kind == "rect":
            draw.rectangle([x0, y0, x1, y1], fill=fill, outline=(0, 0, 0))
        elif kind == "poly":
            draw.polygon([(rng.randint(0, w), rng.randint(0, h)) for _ in range(rng.randint(3, 6))], fill=fill)
        else:
            draw.line([x0, y0, x1, y1], fill=fill, width=rng.randint(1, 6))
    return img


def make_images(directory, n: int, seed: int = 0, size: tuple[int, int] | None = None) -> list[Path]:
    """Write `n` drawn scenes (JPEG and PNG; sizes and aspect ratios vary unless `size` is given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        if size is None:
            aw, ah = rng.choice(_ASPECTS)
            scale = rng.randint(24, 160)
            w, h = aw * scale // 2 + 16, ah * scale // 2 + 16
        else:
            w, h = size
        img = _scene(rng, w, h)
        ext = "jpg" if i % 3 else "png"
        p = directory / f"img_{i:05d}.{ext}"
        img.save(p, quality=90) if ext == "jpg" else img.save(p)
        paths.append(p)
    return paths


CAMERA_SIZES = {"1024x768": (1024, 768), "4032x3024": (4032, 3024)}


def make_camera_jpegs(
    directory, n: int, size: tuple[int, int] = (4032, 3024), seed: int = 0, quality: int = 90
) -> list[Path]:
    """Write `n` camera-size JPEGs (12 MP by default; 1024x768 is the other common set): a scene drawn
    at 1/8 scale, upscaled and with sensor-like noise, so files decode like photos (4-8 MB of entropy
    at 12 MP) instead of compressing to almost nothing; every 4th carries an EXIF rotation."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    w, h = size
    noise = Image.effect_noise((w, h), 24).convert("RGB")
    paths = []
    for i in range(n):
        img = Image.blend(_scene(rng, max(w // 8, 16), max(h // 8, 16)).resize((w, h), Image.BILINEAR), noise, 0.15)
        exif = Image.Exif()
        if i % 4 == 3:
            exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees
        p = directory / f"photo_{i:05d}.jpg"
        img.save(p, quality=quality, exif=exif.tobytes())
        paths.append(p)
    return paths


def awkward_images(directory, seed: int = 0) -> dict[str, Path]:
    """Valid files that trip naive loaders: alpha, palette, CMYK, 16-bit, EXIF rotation, 1x1, panorama."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = {}
    rgba = _scene(rng, 120, 80).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((120, 80)))
    out["png_alpha"] = directory / "alpha.png"
    rgba.save(out["png_alpha"])
    pal = _scene(rng, 90, 90).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    out["gif_palette"] = directory / "palette.gif"
    pal.save(out["gif_palette"], transparency=0)
    out["jpeg_cmyk"] = directory / "cmyk.jpg"
    _scene(rng, 100, 60).convert("CMYK").save(out["jpeg_cmyk"], quality=90)
    g16 = Image.linear_gradient("L").resize((64, 48)).convert("I").point(lambda v: v * 256)
    out["png_gray16"] = directory / "gray16.png"
    g16.convert("I;16").save(out["png_gray16"])
    exif_img = _scene(rng, 160, 90)
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    out["jpeg_exif_rotated"] = directory / "exif_rotated.jpg"
    exif_img.save(out["jpeg_exif_rotated"], exif=exif.tobytes())
    out["tiny_1x1"] = directory / "one_pixel.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(out["tiny_1x1"])
    out["panorama"] = directory / "panorama.jpg"
    _scene(rng, 4000, 300).save(out["panorama"], quality=85)
    return out


def broken_images(directory) -> dict[str, Path]:
    """Invalid inputs that must become one error row each: zero bytes, truncated, not an image, a bomb."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    out["zero_bytes"] = directory / "empty.jpg"
    out["zero_bytes"].write_bytes(b"")
    buf = io.BytesIO()
    _scene(random.Random(1), 200, 150).save(buf, format="JPEG", quality=90)
    out["truncated_jpeg"] = directory / "truncated.jpg"
    out["truncated_jpeg"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["text_as_jpg"] = directory / "notes.jpg"
    out["text_as_jpg"].write_text("this is a text file, not a JPEG\n" * 20)
    # More than twice Pillow's default MAX_IMAGE_PIXELS, yet a small file: a 1-bit PNG of one color.
    side = int((2 * 89_478_485 * 1.1) ** 0.5) + 1
    out["decompression_bomb"] = directory / "bomb.png"
    Image.new("1", (side, side), 0).save(out["decompression_bomb"], optimize=False)
    return out
