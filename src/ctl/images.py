"""Reading images the way every stage of the pipeline needs them: RGB, upright, named in errors."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

Box = tuple[float, float, float, float]  # left, top, right, bottom, normalised to [0, 1]


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ImageRef:
    """A region of an image file: the whole image when ``box`` is None."""

    path: Path
    box: Box | None = None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode bytes into an upright RGB image (EXIF rotation applied; greyscale, RGBA, CMYK, palette converted)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # truncated files fail here, not later in the backbone
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: too large to decode safely ({err})") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name}: not an image in a format this program reads (JPEG, PNG, WebP, GIF, BMP, TIFF...)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: not a readable image ({err})") from err
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))  # transparent pixels become white
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from err
    return decode_image(data, str(path))


def crop(image: Image.Image, box: Box | None) -> Image.Image:
    """The region ``box`` (normalised coordinates) of ``image``; at least one pixel each way."""
    if box is None:
        return image
    width, height = image.size
    left, top = int(round(box[0] * width)), int(round(box[1] * height))
    right = max(left + 1, int(round(box[2] * width)))
    bottom = max(top + 1, int(round(box[3] * height)))
    return image.crop((left, top, right, bottom))


def load_region(ref: ImageRef) -> Image.Image:
    return crop(load_image(ref.path), ref.box)
