"""Decode any cell image into 8-bit RGB, with one clear error for every bad input."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# A cell crop is a few hundred pixels wide; a field image a few thousand. Anything past this is
# a decompression bomb or a mistake, and decoding it would exhaust a Raspberry Pi's memory.
MAX_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112
GREY_CHROMA = 3.0  # below: a grayscale or monochrome picture (0, or 1-2 after JPEG); every NIH crop has at least 5


class ImageError(ValueError):
    """An input that is not a usable image; the message says why in one line."""


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("._")


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Grayscale, RGBA, palette, CMYK and 16-bit images become H×W×3 uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Scaled by the bit depth (0..65535 → 0..255; Pillow opens 16-bit files as I;16 or I), never by
        # the image's own maximum: a dark 16-bit image must stay dark.
        arr = np.asarray(img).astype(np.int64)
        return np.repeat((arr >> 8).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":  # float images are 0..1 by convention
        arr = np.nan_to_num(np.asarray(img, np.float32))
        return np.repeat(np.round(arr * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent background → white, as a slide's background is bright.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return _pixels(img if img.mode == "RGB" else img.convert("RGB"))


def _pixels(img: Image.Image) -> np.ndarray:
    """An RGB image's pixels, a band of rows at a time: np.asarray of a whole image holds two more copies of
    it at once (Pillow's tobytes joins its chunks), 100 MB more at the peak for a 16 MP photo."""
    w, h = img.size
    out = np.empty((h, w, 3), np.uint8)
    band = max(1, (1 << 22) // (3 * w))
    for y in range(0, h, band):
        out[y:y + band] = np.asarray(img.crop((0, y, w, min(h, y + band))))
    return out


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes → H×W×3 uint8 RGB, or ImageError with the reason."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} pixels is too large (limit {max_pixels:,}); refusing to decode: "
                                 "save it smaller (field mode needs cells only 50 px or more across)")
            if w < 1 or h < 1:
                raise ImageError(f"{name}: image has no pixels")
            img.load()
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is too large (decompression bomb guard)") from None
    except OSError as e:
        msg = str(e)
        reason = "truncated or corrupt image" if "truncat" in msg.lower() else f"corrupt image ({msg})"
        raise ImageError(f"{name}: {reason}") from None
    except (ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{name}: corrupt image ({e})") from None
    rgb = to_rgb8(img)
    del img  # Pillow's copy, before the turned one is made
    return as_displayed(rgb, orientation)


def as_displayed(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned as their EXIF orientation says (ImageOps.exif_transpose's eight cases: phone
    photos through an eyepiece are rotated); box coordinates everywhere are in this image's pixels. Turned
    after Pillow's copy is gone: two copies of a 16 MP photo at the peak, not three."""
    import cv2
    turn = {2: lambda a: cv2.flip(a, 1), 3: lambda a: cv2.rotate(a, cv2.ROTATE_180), 4: lambda a: cv2.flip(a, 0),
            5: cv2.transpose, 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
            7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
            8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)}.get(orientation)
    return rgb if turn is None else turn(rgb)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a file from disk into H×W×3 uint8 RGB."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, str(path), max_pixels)



def stain_colour(rgb: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The 99th percentile of max − min channel (over `mask` where given): how much colour the stain left.
    A high percentile, not the median, so that a pale slide's colourful cells count and its pale
    background does not (a median rejected fields composed from pale patients' real crops)."""
    import cv2
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    chroma = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b))
    m = None if mask is None else mask.astype(np.uint8)
    counts = np.cumsum(cv2.calcHist([chroma], [0], m, [256], [0, 256]).ravel())
    return float(np.searchsorted(counts, 0.99 * counts[-1])) if counts[-1] > 0 else 0.0
