import io

import numpy as np
import pytest
from PIL import Image

from modelyard.engine.images import ImageError, load_image, load_images
from modelyard.testing import awkward_images, broken_images


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sources_pil_bytes_path_and_list(tmp_path):
    img = Image.new("RGB", (30, 20), (10, 200, 30))
    p = tmp_path / "a.png"
    img.save(p)
    for src in (img, _png_bytes(img), bytearray(_png_bytes(img)), p, str(p)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20) and out.getpixel((3, 3)) == (10, 200, 30)
    assert len(load_images([img, p])) == 2
    assert load_images(None) == []
    assert len(load_images(p)) == 1


def test_awkward_but_valid_images_become_rgb(tmp_path):
    files = awkward_images(tmp_path)
    out = {k: load_image(v) for k, v in files.items()}
    assert all(im.mode == "RGB" for im in out.values())
    # EXIF orientation 6: a 160x90 landscape is displayed (and captioned) as 90x160.
    assert out["jpeg_exif_rotated"].size == (90, 160)
    # Transparent pixels go on white: the vertical alpha gradient starts fully transparent.
    assert min(out["png_alpha"].getpixel((60, 0))) >= 250
    # 16-bit gray keeps its gradient instead of saturating at white.
    g = np.asarray(out["png_gray16"])[..., 0]
    assert g.min() < 30 and g.max() > 220 and len(np.unique(g)) == 48  # one level per row
    assert out["tiny_1x1"].size == (1, 1) and out["panorama"].size == (4000, 300)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return broken_images(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize(
    "name,match",
    [
        ("zero_bytes", "empty"),
        ("truncated_jpeg", "cannot decode"),
        ("text_as_jpg", "not a readable image"),
        ("decompression_bomb", "pixels|exceeds"),
    ],
)
def test_broken_files_raise_image_error(broken, name, match):
    files = broken
    with pytest.raises(ImageError, match=match) as e:
        load_image(files[name])
    assert str(files[name]) in str(e.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_an_error_not_a_warning(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 10,000 px: only a warning for Pillow
    with pytest.raises(ImageError, match="exceeds the limit of 5000"):
        load_image(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(p).size == (100, 100)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="unsupported"):
        load_image(12345)
    with pytest.raises(ImageError, match="no such file"):
        load_images([Image.new("RGB", (4, 4)), tmp_path / "nope.png"])


def test_caller_image_is_not_modified():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = load_image(img)
    assert img.mode == "RGBA" and out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_camera_jpegs_decode_at_the_smallest_scale_that_covers_the_model(tmp_path):
    from modelyard.testing import make_camera_jpegs

    upright, _, _, sideways = make_camera_jpegs(tmp_path, 4, size=(4032, 3024))
    assert load_image(upright).size == (4032, 3024)  # no size given: full decode
    assert load_image(upright, (336, 336)).size == (504, 378)  # 1/8: still >= 336 both ways
    assert load_image(upright, (448, 448)).size == (1008, 756)  # 1/8 would be 378 high: 1/4
    assert load_image(sideways, (336, 336)).size == (378, 504)  # EXIF rotation still applied
    assert load_image(sideways, (600, 400)).size == (756, 1008)  # the axes as the model sees them
    png = tmp_path / "big.png"
    Image.new("RGB", (1600, 1200)).save(png)
    assert load_image(png, (336, 336)).size == (1600, 1200)  # only JPEGs have cheap scales


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_reduced_decoding_keeps_the_pixel_limit(tmp_path, monkeypatch):
    from modelyard.testing import make_camera_jpegs

    (p,) = make_camera_jpegs(tmp_path, 1, size=(1024, 768))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)  # the declared 786,432 pixels count
    with pytest.raises(ImageError, match="exceeds the limit of 500000"):
        load_image(p, (64, 64))


def test_huge_files_are_refused_before_any_read(tmp_path):
    p = tmp_path / "huge.jpg"
    with open(p, "wb") as f:
        f.truncate(600 << 20)  # sparse: reading it whole would take 600 MiB
    with pytest.raises(ImageError, match="exceeds the image file limit"):
        load_image(p)
    head = tmp_path / "not-an-image.jpg"
    head.write_bytes(b"%PDF-1.7" + b"\x00" * 4096)
    with pytest.raises(ImageError, match="header is no image format"):
        load_image(head)
