import io

import numpy as np
import pytest
from PIL import Image

from ctl.images import ImageError, ImageRef, crop, decode_image, load_image, load_region

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _bytes(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _close(pixel, expected, tol=40):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def _two_halves(width, height, left=RED, right=BLUE) -> Image.Image:
    image = Image.new("RGB", (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def test_rgb_jpeg_file(tmp_path):
    path = tmp_path / "scene.jpg"
    _two_halves(40, 20).save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 20)
    assert _close(image.getpixel((5, 10)), RED)
    assert _close(image.getpixel((35, 10)), BLUE)


def test_greyscale_becomes_rgb(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.new("L", (16, 12), 128).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 12)
    r, g, b = image.getpixel((8, 6))
    assert r == g == b and abs(r - 128) <= 3


def test_rgba_transparent_becomes_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # transparent red: must not show as red or black
    image.paste((0, 0, 255, 255), (5, 0, 10, 10))  # opaque blue on the right
    out = decode_image(_bytes(image, "PNG"), "cutout.png")
    assert out.mode == "RGB" and out.size == (10, 10)
    assert out.getpixel((1, 5)) == (255, 255, 255)
    assert out.getpixel((8, 5)) == BLUE


def test_greyscale_with_alpha_transparent_becomes_white():
    image = Image.new("LA", (6, 6), (0, 0))  # transparent black
    out = decode_image(_bytes(image, "PNG"), "la.png")
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(path)  # cyan 0, magenta+yellow full: red
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    assert _close(image.getpixel((6, 6)), RED)


def test_palette_image_becomes_rgb():
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    out = decode_image(_bytes(image, "PNG"), "palette.png")
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) == GREEN


def test_palette_with_transparency_becomes_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (4, 0, 8, 8))
    out = decode_image(_bytes(image, "PNG", transparency=0), "palette-t.png")
    assert out.mode == "RGB"
    assert out.getpixel((1, 4)) == (255, 255, 255)
    assert out.getpixel((6, 4)) == GREEN


def test_exif_rotated_jpeg_is_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = _two_halves(60, 30)  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(path, exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (60, 30)

    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (30, 60)  # width and height swapped
    # rotating clockwise brings the stored left edge to the top
    assert _close(image.getpixel((15, 5)), RED)
    assert _close(image.getpixel((15, 55)), BLUE)


def test_truncated_jpeg_raises_image_error_naming_file(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _bytes(noise, quality=95)
    path = tmp_path / "cut-short.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut-short.jpg"):
        load_image(path)
    with pytest.raises(ImageError, match="upload-7"):
        decode_image(data[: len(data) // 2], "upload-7")


@pytest.mark.parametrize("data", [b"this is not an image at all", b"", b"\xff\xd8\xff\xe0garbage"])
def test_non_image_bytes_raise_image_error(tmp_path, data):
    path = tmp_path / "notes.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert "notes.jpg" in str(err.value)
    with pytest.raises(ImageError, match="named-input"):
        decode_image(data, "named-input")


def test_decompression_bomb_is_refused_naming_the_file(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # anything over 2x this is refused outright
    buffer = io.BytesIO()
    Image.new("L", (100, 100)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match=r"huge\.png: too large"):
        decode_image(buffer.getvalue(), "huge.png")


def test_image_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode_image(b"nope", "x")


def test_missing_file_raises_image_error_naming_file(tmp_path):
    path = tmp_path / "images" / "ABSENT123.jpg"
    with pytest.raises(ImageError, match="ABSENT123.jpg"):
        load_image(path)
    with pytest.raises(ImageError, match="ABSENT123.jpg"):
        load_region(ImageRef(path, (0.0, 0.0, 0.5, 0.5)))


def test_directory_instead_of_file_raises_image_error(tmp_path):
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    with pytest.raises(ImageError, match="dir.jpg"):
        load_image(folder)


def test_crop_with_normalised_box():
    image = Image.new("RGB", (100, 50))
    assert crop(image, (0.1, 0.2, 0.5, 0.8)).size == (40, 30)
    assert crop(image, (0.0, 0.0, 1.0, 1.0)).size == (100, 50)
    assert crop(image, None) is image
    # a degenerate box still gives at least one pixel each way
    assert crop(image, (0.5, 0.5, 0.5, 0.5)).size == (1, 1)


def test_crop_takes_the_right_region():
    image = _two_halves(100, 40)
    left = crop(image, (0.0, 0.0, 0.5, 1.0))
    right = crop(image, (0.5, 0.0, 1.0, 1.0))
    assert left.size == right.size == (50, 40)
    assert (np.asarray(left) == RED).all()
    assert (np.asarray(right) == BLUE).all()


def test_load_region_crops_the_upright_image(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _two_halves(60, 30).save(path, exif=exif.tobytes(), quality=95)
    top = load_region(ImageRef(path, (0.0, 0.0, 1.0, 0.5)))  # upright image is 30 x 60; top half is red
    assert top.size == (30, 30)
    assert _close(top.getpixel((15, 10)), RED)
