"""Face crops: the face box plus a margin, optionally eye-levelled, resized; cached.

Crop convention (documented once, used everywhere): the detector's box
`(x, y, w, h)` is grown by `margin` times its width and height (half on each
side: `margin=0.2` adds 10% of the width left and right and 10% of the height
above and below) around its centre, and resized to `size x size`. This is the
relative form of FaceNet's alignment (MTCNN box + 32 px margin, resized to
160 x 160; 32/160 = 0.2), so the crop looks the same whatever the photo's
resolution. Like FaceNet's, the window is not squared by default: MTCNN boxes
are taller than wide, so the face is stretched a little horizontally, which
is what the pretrained FaceNet models saw in training. On the 5-celebrity demo
set, with the 128-d MS-Celeb model, this scored higher than square windows
(val-vs-train pairs: AUC 1.000 vs 0.997, TAR@FAR=1e-2 0.99 vs 0.95 at
margin 0.2); `square=True` is there for models trained on square crops.
Parts of the window outside the photo are black.

`load_face` is the crop of the largest face in one file, read from the crop
cache when the same file was cropped with the same settings before. Crops are
RGB in raw pixel units [0, 255]; the models do their own standardisation
(see `tfadv.models`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from tfadv import files
from tfadv.data.face_detection import NO_FACE, Face, NoFaceError, resolve_detector
from tfadv.data.images import check_image, read_image

DEFAULT_MARGIN = 0.2
# Bump when the decoding (`tfadv.data.images`) or the crop geometry changes, so old
# cache entries stop matching (2: 16-bit PPM/PGM greyscale scaled by its white level
# instead of stretched).
_CACHE_FORMAT = 2


def _eye_angle(keypoints) -> float:
    """Angle (radians, image y axis down) of the line from the left-most to the right-most eye."""
    try:
        eyes = sorted([tuple(keypoints["left_eye"]), tuple(keypoints["right_eye"])])
    except (KeyError, TypeError):
        raise ValueError(
            "align=True needs 'left_eye' and 'right_eye' keypoints (FaceDetector provides them). "
            "Pass a Face with keypoints, or align=False."
        ) from None
    (x0, y0), (x1, y1) = eyes
    return math.atan2(y1 - y0, x1 - x0)


def crop_face(image, face, *, size=160, margin=DEFAULT_MARGIN, align=False, square=False,
              dtype="uint8") -> np.ndarray:
    """Crops one face: box plus margin, optionally eye-levelled, resized.

    The window is centred on the box centre. With `square=False` (default) the
    width and height grow separately (`w * (1 + margin)`, `h * (1 + margin)`)
    and the resize to a square stretches the face a little, as FaceNet's own
    alignment does (see the module docstring); with `square=True` the window
    is a square of side `max(w, h) * (1 + margin)` (no stretching).
    With `align=True` the window is rotated about the box centre by the angle
    of the line between the eyes, so the eyes end up level. Shrinking uses
    area interpolation (no aliasing), enlarging bilinear.

    Args:
        image: RGB array `(H, W, 3)`, uint8 or float in [0, 255].
        face: a `Face`, or a box `(x, y, width, height)` in pixels.
        size: output side in pixels.
        margin: window growth as a fraction of the box side (0.2 = 10% on each side).
        align: rotate so the eyes are level (needs `face.keypoints`).
        square: square window (no stretching) instead of FaceNet's; see above.
        dtype: "uint8" (rounded) or "float32" (still in [0, 255]).

    Returns:
        Array `(size, size, 3)` of `dtype`, RGB in [0, 255].

    Raises:
        ValueError: bad image shape, empty box, negative margin, or `align=True`
            without eye keypoints.
    """
    image = check_image(image)
    if int(size) < 1:
        raise ValueError(f"Expected size >= 1. Received: size={size}")
    if float(margin) < 0:
        raise ValueError(f"Expected margin >= 0 (a fraction of the face box). Received: margin={margin}")
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"Expected dtype 'uint8' or 'float32'. Received: dtype={dtype!r}")
    size = int(size)
    box = face.box if isinstance(face, Face) else tuple(face)
    if len(box) != 4:
        raise ValueError(f"Expected a Face or a box (x, y, width, height). Received: face={face!r}")
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise ValueError(f"Expected a box with positive width and height. Received: box={box}")
    angle = 0.0
    if align:
        angle = _eye_angle(face.keypoints if isinstance(face, Face) else None)

    if square:
        w = h = max(w, h)
    cx, cy = x + float(box[2]) / 2.0, y + float(box[3]) / 2.0
    win_w = max(1, int(round(w * (1.0 + float(margin)))))
    win_h = max(1, int(round(h * (1.0 + float(margin)))))

    # dst = R (src - c) + (win_w / 2, win_h / 2), R rotating by -angle.
    cos, sin = math.cos(angle), math.sin(angle)
    if angle == 0.0:
        # Integer translation: an exact copy of the pixels, no resampling blur.
        tx, ty = -float(round(cx - win_w / 2.0)), -float(round(cy - win_h / 2.0))
    else:
        tx = win_w / 2.0 - (cos * cx + sin * cy)
        ty = win_h / 2.0 - (-sin * cx + cos * cy)
    matrix = np.array([[cos, sin, tx], [-sin, cos, ty]], np.float64)
    src = image if image.dtype == np.uint8 else np.asarray(image, np.float32)
    window = cv2.warpAffine(src, matrix, (win_w, win_h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    interpolation = cv2.INTER_AREA if max(win_w, win_h) > size else cv2.INTER_LINEAR
    out = cv2.resize(window, (size, size), interpolation=interpolation)
    if dtype == "uint8":
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def center_crop_resize(image, *, size=160, dtype="uint8") -> np.ndarray:
    """The central square of an image, resized to `size x size` (no detection).

    For photos that are already face crops (`detector="none"`).
    """
    image = check_image(image)
    h, w = image.shape[:2]
    side = min(h, w)
    return crop_face(image, ((w - side) / 2.0, (h - side) / 2.0, side, side), size=size,
                     margin=0.0, dtype=dtype)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Where crops are cached: `$TFADV_CACHE_DIR/crops`, else `~/.cache/tfadv/crops`."""
    env = os.environ.get("TFADV_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "tfadv"
    return root / "crops"


def _cache_file(cache_dir: Path, path: str, settings: Mapping[str, Any]) -> Path | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = json.dumps({"path": os.path.abspath(path), "mtime_ns": stat.st_mtime_ns,
                      "bytes": stat.st_size, "format": _CACHE_FORMAT, **settings},
                     sort_keys=True, default=str)
    return cache_dir / (hashlib.sha256(key.encode()).hexdigest() + ".npz")


def _cache_read(file: Path | None):
    """("crop", array) | ("noface", reason) | None on a miss or an unreadable entry."""
    if file is None or not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if "crop" in z.files:
                return "crop", z["crop"]
            return "noface", str(z["reason"])
    except Exception:  # a damaged entry is a miss; it is rewritten
        return None


def _cache_write(file: Path | None, **arrays):
    if file is None:
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file; a cache
    # that cannot be written (read-only folder, full disk) is only a slower run.
    try:
        with files.atomic_path(file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except OSError:
        pass


# --------------------------------------------------------------------------- one file


def load_face(path, *, size=160, detector=None, margin=DEFAULT_MARGIN, align=False, square=False,
              cache_dir=None, cache=True) -> np.ndarray:
    """The crop of the largest face in one photo, from the cache when possible.

    Args:
        path: image file.
        size, margin, align, square: as `crop_face`.
        detector: None or "mtcnn" (shared `FaceDetector()`), "none" (the photo
            is already a face crop: centre square, resized), or a
            FaceDetector-like object.
        cache_dir: crop cache folder; defaults to `default_cache_dir()`.
        cache: read and write the cache. Entries are keyed by the absolute
            path, modification time and byte size of the file, and every
            setting above, so an edited photo or a new setting is recomputed.

    Returns:
        np.uint8 array `(size, size, 3)`, RGB.

    Raises:
        FileNotFoundError, BadImageError: as `read_image`.
        NoFaceError: the detector found no face (this outcome is cached too).
    """
    det = resolve_detector(detector)
    if det is None and align:
        raise ValueError("align=True needs a face detector for the eye positions; "
                         "detector='none' has none. Pass align=False or a detector.")
    path = os.fspath(path)
    settings = {"size": int(size), "detector": "none" if det is None else
                getattr(det, "cache_key", type(det).__qualname__)}
    if det is not None:
        settings.update(margin=float(margin), align=bool(align), square=bool(square))
    file = None
    if cache:
        file = _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                           path, settings)
        hit = _cache_read(file)
        if hit is not None:
            kind, value = hit
            if kind == "crop":
                return value
            raise NoFaceError(value)

    image = read_image(path)
    if det is None:
        crop = center_crop_resize(image, size=size)
    else:
        face = det.detect_largest_face(image)
        if face is None:
            reason = f"{NO_FACE}: the detector found no face in {path!r}"
            _cache_write(file, reason=np.array(reason))
            raise NoFaceError(reason)
        if not isinstance(face, Face):
            face = Face(tuple(face))
        crop = crop_face(image, face, size=size, margin=margin, align=align, square=square)
    _cache_write(file, crop=crop)
    return crop
