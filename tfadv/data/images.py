"""Reading image files as RGB pixels: the one image reader of tfadv.

`read_image` decodes any PIL-readable file to an RGB uint8 array (EXIF
orientation applied, greyscale repeated, 16-bit greyscale scaled, transparency
composited onto white). Face crops (`tfadv.data.face_crops`) are cached under
a key that includes `face_crops._CACHE_FORMAT`: bump it when the pixels this
module returns for a file change, so old cache entries stop matching.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm")


class BadImageError(ValueError):
    """A file that cannot be decoded as an image."""


def _white_level(img) -> float | None:
    """The sample value of white in a 16-bit greyscale file, read before decoding.

    PIL opens 16-bit greyscale as "I;16*", or as "I" for 16-bit PPM/PGM
    (scaled to 0..65535 by PIL whatever the file's maxval), for 16-bit PNGs
    in older PIL versions, and for TIFF's signed 16-bit samples. None when
    the file does not say (32-bit and float samples).
    """
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode != "I":
        return None
    if img.format in ("PNG", "PPM"):
        return 65535.0
    for tile in getattr(img, "tile", None) or ():
        rawmode = tile[3]  # the decoder's args: a raw mode, or a tuple starting with one
        if isinstance(rawmode, tuple):
            rawmode = next((a for a in rawmode if isinstance(a, str)), "")
        if isinstance(rawmode, str) and rawmode.startswith("I;16"):
            return 32767.0 if rawmode.endswith("S") else 65535.0
    return None


def _to_rgb_array(img, white=None) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit and float greyscale: PIL's convert("L") clips at 255, so scale
        # by the file's white level; when the file does not give one, floats in
        # [0, 1] are taken as normalised, and larger ranges are fitted to 0..255.
        arr = np.asarray(img, dtype=np.float64)
        if white is None and img.mode.startswith("I;16"):
            white = 65535.0
        if white is not None:
            arr = arr * (255.0 / white)
        elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.size and arr.max() > 255.0:
            arr = arr * (255.0 / arr.max())
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        # Composite onto white: transparent regions become background, not black
        # rectangles that a detector could mistake for structure.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path) -> np.ndarray:
    """Reads a photo as RGB uint8, whatever its mode.

    This is the one image reader of tfadv: `load_face`, `load_face_folder`,
    `tfadv facenet embed`, `tfadv query` and the serving client all read
    through it, so a file gives the same pixels whichever command reads it.

    The EXIF orientation tag is applied (phone photos stored sideways come
    out upright). Greyscale is repeated to 3 channels; 16-bit greyscale is
    scaled by its white level (65535 -> 255), not clipped. Images with an
    alpha channel or a transparent palette entry are composited onto white
    (partly transparent pixels are blended). CMYK, YCbCr, palette and 1-bit
    images are converted by PIL. Animated files give their first frame.

    Args:
        path: file path.

    Returns:
        np.uint8 array of shape `(H, W, 3)`.

    Raises:
        FileNotFoundError: `path` does not exist.
        BadImageError: the file exists but cannot be decoded (corrupt,
            truncated, not an image).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file not found: {path!r}. Check the path.")
    try:
        with Image.open(path) as img:
            white = _white_level(img)  # from the file's sample format, before decoding
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a malformed EXIF block should not lose the pixels
                pass
            arr = _to_rgb_array(img, white)
    except Exception as e:  # PIL raises many types for corrupt files
        raise BadImageError(
            f"Could not decode {path!r} as an image ({type(e).__name__}: {e}). "
            "Replace or remove the file."
        ) from e
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(f"Image {path!r} has no pixels (shape {arr.shape}).")
    return arr


def check_image(image) -> np.ndarray:
    """`image` as an array, checked to be RGB `(H, W, 3)` with at least one pixel."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(
            "Expected an RGB image of shape (H, W, 3); use read_image() to load files of any "
            f"mode. Received: shape={image.shape}"
        )
    return image


ENCODINGS = ("png", "jpeg")


def encode_image(pixels, encoding: str = "png", *, quality: int = 95) -> bytes:
    """An RGB image as file bytes (Pillow), e.g. a face crop to send to a server.

    Args:
        pixels: uint8 `(H, W, 3)` RGB (other numeric dtypes are rounded and
            clipped to 0-255).
        encoding: "png" (lossless: the decoded pixels are these, so a served
            embedding equals the in-process one) or "jpeg" (a quarter of the
            size; on the demo face crops, quality 95 gave 10 KB vs PNG's 38 KB
            and embeddings within cosine 0.998 of the lossless ones).
        quality: JPEG quality, 1-95.

    Returns:
        The encoded file.

    Raises:
        ValueError: an unknown encoding, a quality outside 1-95, or pixels
            that are not `(H, W, 3)`.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"Expected encoding in {ENCODINGS}. Received: {encoding!r}")
    if not 1 <= int(quality) <= 95:
        raise ValueError(f"Expected JPEG quality in 1-95. Received: {quality}")
    image = check_image(pixels)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    if encoding == "png":
        Image.fromarray(image).save(out, format="PNG")
    else:
        Image.fromarray(image).save(out, format="JPEG", quality=int(quality))
    return out.getvalue()
