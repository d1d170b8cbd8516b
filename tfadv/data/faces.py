"""Face photos to aligned crops: reading, MTCNN detection, cropping, caching.

The pipeline for one photo is `read_image` (any PIL-readable file to RGB
uint8) -> `FaceDetector.detect_largest_face` (MTCNN) -> `crop_face` (the
face box expanded by a margin, optionally rotated so the eyes are
level, resized to `size x size`). `load_face_folder` runs it over a folder with
one sub-folder per identity, skips and reports what it cannot use, and caches
the crops so that a second load does not run MTCNN again.

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

Images leave this module as RGB in raw pixel units [0, 255]; the models do
their own standardisation (see `tfadv.models`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm")
DEFAULT_MARGIN = 0.2
# Bump when the decoding or the crop geometry changes, so old cache entries stop matching
# (2: 16-bit PPM/PGM greyscale scaled by its white level instead of stretched).
_CACHE_FORMAT = 2

# Skip reasons: the text before ":" is the category counted by `FaceSet.counts`.
UNREADABLE = "unreadable image"
NO_FACE = "no face found"
NOT_AN_IMAGE = "not an image file"
OUTSIDE_IDENTITY = "not in an identity folder"


class BadImageError(ValueError):
    """A file that cannot be decoded as an image."""


class NoFaceError(ValueError):
    """An image in which the detector found no face."""


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: `(x, y, width, height)` in pixels of the image it was found in.
        confidence: detector score in [0, 1].
        keypoints: optional landmarks, name -> `(x, y)`; alignment uses
            "left_eye" and "right_eye".
    """

    box: tuple[float, float, float, float]
    confidence: float = 1.0
    keypoints: Mapping[str, tuple[float, float]] | None = None

    @property
    def area(self) -> float:
        return float(self.box[2]) * float(self.box[3])


# --------------------------------------------------------------------------- reading


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
    from PIL import Image

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
    from PIL import Image, ImageOps

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


# --------------------------------------------------------------------------- detection


class FaceDetector:
    """The largest face in a photo, found by MTCNN (`mtcnn` package, CPU).

    The MTCNN networks are created on first use. Very large photos are
    downscaled to `max_side` pixels for detection only (MTCNN's image pyramid
    grows with the resolution); boxes and keypoints are mapped back to the
    original pixels, and crops are taken from the full-resolution photo.

    Any object with a `detect_largest_face(image) -> Face | None` method and a
    `cache_key` string can stand in for this class (`load_face_folder` uses
    only those two).

    Args:
        min_face_size: smallest face, in pixels of the (downscaled) photo.
        min_confidence: faces scoring below this are ignored (MTCNN's own
            stage thresholds apply first).
        max_side: longest side the detector sees; `None` for no downscaling.
        device: TensorFlow device for MTCNN.

    Example:
        >>> detector = FaceDetector()
        >>> face = detector.detect_largest_face(read_image("photo.jpg"))
        >>> crop = crop_face(read_image("photo.jpg"), face, align=True)
    """

    def __init__(self, *, min_face_size=20, min_confidence=0.0, max_side=1024, device="CPU:0"):
        if int(min_face_size) < 1:
            raise ValueError(f"Expected min_face_size >= 1. Received: min_face_size={min_face_size}")
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ValueError(
                f"Expected 0 <= min_confidence <= 1. Received: min_confidence={min_confidence}"
            )
        if max_side is not None and int(max_side) < 32:
            raise ValueError(f"Expected max_side >= 32 or None. Received: max_side={max_side}")
        self.min_face_size = int(min_face_size)
        self.min_confidence = float(min_confidence)
        self.max_side = None if max_side is None else int(max_side)
        self.device = device
        self._mtcnn = None

    @property
    def cache_key(self) -> str:
        """Settings that change the detections (part of the crop cache key)."""
        from importlib import metadata

        try:
            version = metadata.version("mtcnn")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return (f"mtcnn-{version}/min_face_size={self.min_face_size}"
                f"/min_confidence={self.min_confidence}/max_side={self.max_side}")

    def _model(self):
        if self._mtcnn is None:
            try:
                from mtcnn import MTCNN
            except ImportError as e:
                raise ImportError(
                    "Face detection needs the `mtcnn` package: `pip install mtcnn`, "
                    "or pass detector='none' for images that are already face crops."
                ) from e
            self._mtcnn = MTCNN(device=self.device)
        return self._mtcnn

    def detect_faces(self, image) -> list[Face]:
        """All faces, largest first.

        Args:
            image: RGB array `(H, W, 3)`, uint8 or float in [0, 255].

        Returns:
            A list of `Face`, sorted by box area, largest first.
        """
        image = _check_image(image)
        scale = 1.0
        h, w = image.shape[:2]
        if self.max_side is not None and max(h, w) > self.max_side:
            import cv2

            scale = self.max_side / max(h, w)
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        results = self._model().detect_faces(
            np.asarray(image, np.float32), min_face_size=self.min_face_size)
        faces = []
        for r in results or []:
            if float(r["confidence"]) < self.min_confidence:
                continue
            box = tuple(float(v) / scale for v in r["box"])
            keypoints = {k: (float(v[0]) / scale, float(v[1]) / scale)
                         for k, v in (r.get("keypoints") or {}).items()}
            if box[2] <= 0 or box[3] <= 0:
                continue
            faces.append(Face(box, float(r["confidence"]), keypoints or None))
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def detect_largest_face(self, image) -> Face | None:
        """The face with the largest box, or `None` when there is none."""
        faces = self.detect_faces(image)
        return faces[0] if faces else None

    def __repr__(self):
        return f"FaceDetector({self.cache_key})"


_DEFAULT_DETECTOR: FaceDetector | None = None


def default_detector() -> FaceDetector:
    """A shared `FaceDetector()` (the MTCNN networks are built once per process)."""
    global _DEFAULT_DETECTOR
    if _DEFAULT_DETECTOR is None:
        _DEFAULT_DETECTOR = FaceDetector()
    return _DEFAULT_DETECTOR


def _resolve_detector(detector):
    if detector is None or (isinstance(detector, str) and detector.lower() == "mtcnn"):
        return default_detector()
    if isinstance(detector, str):
        if detector.lower() == "none":
            return None
        raise ValueError(
            "Expected detector to be None or 'mtcnn' (MTCNN), 'none' (no detection: images are "
            f"already face crops) or a FaceDetector-like object. Received: detector={detector!r}"
        )
    if not callable(getattr(detector, "detect_largest_face", None)):
        raise ValueError(
            "Expected a detector object with a detect_largest_face(image) method. "
            f"Received: detector={detector!r}"
        )
    return detector


# --------------------------------------------------------------------------- cropping


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(
            "Expected an RGB image of shape (H, W, 3); use read_image() to load files of any "
            f"mode. Received: shape={image.shape}"
        )
    return image


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
    import cv2

    image = _check_image(image)
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
    image = _check_image(image)
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
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    det = _resolve_detector(detector)
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


# --------------------------------------------------------------------------- folders


def embed_files(paths, embed, *, size, detector=None, cache=True) -> list[dict]:
    """Embeddings of the faces in image files, one `load_face` crop each; errors per file.

    The one path from photo files to embeddings for every command and client:
    each file is read and cropped by `load_face`, the crops are embedded in
    one call, and a file that is missing, unreadable or has no face gets an
    error entry instead of stopping the others.

    Args:
        paths: image files.
        embed: `crops [N, size, size, 3] uint8 -> embeddings [N, D]` (an
            in-process model or a served one).
        size: crop side in pixels (the model's input size).
        detector, cache: as `load_face` ("none" for files that are already crops).

    Returns:
        One dict per path, in order: `{"path", "embedding": [D floats]}` or
        `{"path", "error": message}`.
    """
    results, crops = [], []
    for path in paths:
        try:
            crops.append(load_face(path, size=size, detector=detector, cache=cache))
            results.append({"path": str(path)})
        except (OSError, ValueError) as err:  # missing, unreadable, no face
            results.append({"path": str(path), "error": str(err)})
    if crops:
        ok = [r for r in results if "error" not in r]
        for r, e in zip(ok, np.asarray(embed(np.stack(crops)))):
            r["embedding"] = [float(v) for v in e]
    return results


@dataclasses.dataclass
class FaceSet:
    """Face crops of a folder-per-identity photo collection.

    Attributes:
        images: float32 `(N, size, size, 3)`, RGB in [0, 255].
        labels: int64 `(N,)`, indices into `class_names`.
        class_names: identity names (sub-folder names), sorted unless given.
        paths: source file of each image.
        skipped: `(path, reason)` of every file that was not used; the reason
            starts with a category ("unreadable image", "no face found",
            "not an image file", "not in an identity folder", "too few images").
        skipped_identities: `(folder, reason)` of identity folders with too
            few usable images (their files are in `skipped` too).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped_identities: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.labels)

    def counts(self) -> dict:
        """Numbers for logs and reports: images, identities, skips by category."""
        return {
            "images": int(len(self.labels)),
            "identities": int(len(np.unique(self.labels))) if len(self.labels) else 0,
            "skipped_images": len(self.skipped),
            "skipped_by_reason": dict(Counter(r.split(":")[0] for _, r in self.skipped)),
            "skipped_identities": len(self.skipped_identities),
        }

    def report(self, max_lines=20) -> str:
        """A human-readable summary with the first `max_lines` skipped files."""
        c = self.counts()
        lines = [f"{c['images']} face images of {c['identities']} identities; "
                 f"{c['skipped_images']} files skipped"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(c['skipped_by_reason'].items()))})"
                    if c["skipped_images"] else "")
                 + (f"; {c['skipped_identities']} identity folders skipped"
                    if c["skipped_identities"] else "")]
        lines += [f"  skipped identity {p}: {r}" for p, r in self.skipped_identities]
        lines += [f"  skipped {p}: {r}" for p, r in self.skipped[:max_lines]]
        if len(self.skipped) > max_lines:
            lines.append(f"  ... and {len(self.skipped) - max_lines} more")
        return "\n".join(lines)

    def to_dataset(self, batch_size=32, *, shuffle=False, seed=0):
        """See `to_dataset`."""
        return to_dataset(self, batch_size, shuffle=shuffle, seed=seed)


def _progress(iterable, enabled, total):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="faces", leave=False)


def load_face_folder(root, *, size=160, detector=None, margin=DEFAULT_MARGIN, align=False,
                     square=False, cache_dir=None, cache=True, min_images_per_person=1,
                     class_names: Sequence[str] | None = None, progress=False) -> FaceSet:
    """Face crops of every photo under `root/<identity>/`.

    Files that cannot be used (unreadable, no face found, not an image) are
    skipped and listed in `FaceSet.skipped`; greyscale, RGBA, palette and CMYK
    photos are converted, not skipped. Identities with fewer than
    `min_images_per_person` usable photos are skipped with a warning. Crops are
    cached (see `load_face`), so a second load does not run the detector.

    Args:
        root: folder with one sub-folder per identity (hidden entries ignored).
        size, margin, align, square: as `crop_face`.
        detector: as `load_face`; "none" for photos that are already face crops.
        cache_dir, cache: as `load_face`.
        min_images_per_person: identities with fewer usable images are dropped.
        class_names: fixed identity list and label order (e.g. the training
            set's, when loading its validation split). Folders not in it are
            skipped; names without a folder simply have no images.
        progress: show a progress bar.

    Returns:
        A `FaceSet`. Print `faceset.report()` to see what was skipped.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: `root` has no identity sub-folders, or no usable face at all.

    Example:
        >>> train = load_face_folder("faces/train", align=True)
        >>> val = load_face_folder("faces/val", align=True, class_names=train.class_names)
        >>> print(val.report())
        >>> ds = train.to_dataset(32, shuffle=True)
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Face folder not found: {str(root)!r}. Expected a folder with one sub-folder of "
            "photos per identity."
        )
    if int(min_images_per_person) < 1:
        raise ValueError("Expected min_images_per_person >= 1. "
                         f"Received: min_images_per_person={min_images_per_person}")
    det = _resolve_detector(detector)  # validate before any work
    if det is None and align:
        raise ValueError("align=True needs a face detector for the eye positions; "
                         "detector='none' has none. Pass align=False or a detector.")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    if not folders:
        raise ValueError(
            f"Expected one sub-folder of photos per identity in {str(root)!r}, found none. "
            "Put each person's photos in root/<person_name>/."
        )
    skipped = [(str(p), f"{OUTSIDE_IDENTITY}: files must be in root/<person_name>/")
               for p in entries if p.is_file()]
    skipped_identities = []
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected unique class_names. Received: class_names={names}")
        known = set(names)
        for folder in folders:
            if folder.name not in known:
                skipped_identities.append((str(folder), "not in class_names"))
        folders = [f for f in folders if f.name in known]

    jobs = []
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_dir() or any(part.startswith(".") for part in p.relative_to(folder).parts):
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(p), f"{NOT_AN_IMAGE}: extension {p.suffix!r}"))
                continue
            jobs.append((folder.name, str(p)))

    crops: dict[str, list[tuple[str, np.ndarray]]] = {f.name: [] for f in folders}
    for name, path in _progress(jobs, progress, len(jobs)):
        try:
            crop = load_face(path, size=size, detector=det if det is not None else "none",
                             margin=margin, align=align, square=square, cache_dir=cache_dir,
                             cache=cache)
        except (BadImageError, OSError) as e:
            cause = e.__cause__ or e
            skipped.append((path, f"{UNREADABLE}: {type(cause).__name__}: {cause}"))
            continue
        except NoFaceError:
            skipped.append((path, NO_FACE))
            continue
        crops[name].append((path, crop))

    kept = []
    for folder in folders:
        items = crops[folder.name]
        if len(items) < int(min_images_per_person):
            reason = (f"too few images: {len(items)} usable, "
                      f"min_images_per_person={int(min_images_per_person)}")
            skipped_identities.append((str(folder), reason))
            skipped += [(p, reason) for p, _ in items]
            continue
        kept.append(folder.name)
    if skipped_identities:
        warnings.warn(
            f"Skipped {len(skipped_identities)} identity folder(s) under {str(root)!r}: "
            + "; ".join(f"{Path(p).name} ({r})" for p, r in skipped_identities[:5])
            + (" ..." if len(skipped_identities) > 5 else ""),
            stacklevel=2,
        )
    names = list(class_names) if class_names is not None else kept
    index = {n: i for i, n in enumerate(names)}
    images, labels, paths = [], [], []
    for name in kept:
        for path, crop in crops[name]:
            images.append(crop)
            labels.append(index[name])
            paths.append(path)
    if not images:
        summary = FaceSet(np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int64),
                          names, [], skipped, skipped_identities).report(max_lines=5)
        raise ValueError(f"No usable face images under {str(root)!r}.\n{summary}")
    return FaceSet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, np.int64),
        class_names=names,
        paths=paths,
        skipped=skipped,
        skipped_identities=skipped_identities,
    )


def to_dataset(faceset: FaceSet, batch_size=32, *, shuffle=False, seed=0):
    """A batched `tf.data.Dataset` of `(images, labels)` from a `FaceSet`.

    Args:
        faceset: the crops.
        batch_size: examples per batch (the last batch may be smaller).
        shuffle: reshuffle every epoch (seeded).
        seed: shuffling seed.

    Returns:
        Dataset of `(float32 (B, size, size, 3) in [0, 255], int64 (B,))`.
    """
    import tensorflow as tf

    if int(batch_size) < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    ds = tf.data.Dataset.from_tensor_slices((faceset.images, faceset.labels))
    if shuffle:
        ds = ds.shuffle(len(faceset.labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- tfds lfw

# LFW's 250x250 images are Viola-Jones face boxes grown 2.2 times (Huang et al. 2007).
_LFW_BOX_GROWTH = 2.2


def load_lfw_tfds(split="train", *, data_dir=None, size=160, margin=DEFAULT_MARGIN):
    """Labeled Faces in the Wild from `tensorflow_datasets`, already prepared.

    Nothing is downloaded. LFW photos are centred on the face, so instead of
    running a detector the central window that `crop_face` would take around
    the original face box is used: `250 / 2.2 * (1 + margin)` pixels, resized to
    `size`.

    Args:
        split: tfds split ("train" is all 13,233 images).
        data_dir: tfds data folder (default: tfds' own, `~/tensorflow_datasets`).
        size: output side in pixels.
        margin: as `crop_face`.

    Returns:
        `(dataset, class_names)`: an unbatched `tf.data.Dataset` of
        `(float32 (size, size, 3) in [0, 255], int64 label)` and the sorted
        person names the labels index.

    Raises:
        FileNotFoundError: the dataset is not prepared in `data_dir`; the
            message says how to prepare it.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if int(size) < 1:
        raise ValueError(f"Expected size >= 1. Received: size={size}")
    if float(margin) < 0:
        raise ValueError(f"Expected margin >= 0 (a fraction of the face box). Received: margin={margin}")
    size = int(size)
    builder = tfds.builder("lfw", data_dir=data_dir)
    try:
        labels_only = builder.as_dataset(split=split,
                                         decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError as e:  # tfds' way of saying "not prepared"
        raise FileNotFoundError(
            f"The tfds dataset 'lfw' is not prepared in {builder.data_dir!r}. Prepare it once "
            "with `tfds build lfw` (or `tfds.builder('lfw', data_dir=...).download_and_prepare()`), "
            "then pass the same data_dir; or put the photos in one folder per person and use "
            "load_face_folder()."
        ) from e
    names = sorted({bytes(x).decode() for x in labels_only.map(lambda ex: ex["label"])
                   .as_numpy_iterator()})
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(names), tf.range(len(names), dtype=tf.int64)),
        default_value=-1)
    # Normalised window around the image centre (the photos are 250x250 around the face).
    frac = min(1.0 / _LFW_BOX_GROWTH * (1.0 + float(margin)), 1.0)
    lo, hi = 0.5 - frac / 2.0, 0.5 + frac / 2.0
    box = tf.constant([[lo, lo, hi, hi]], tf.float32)

    def prepare(ex):
        image = tf.cast(ex["image"], tf.float32)[None]
        crop = tf.image.crop_and_resize(image, box, [0], [size, size], method="bilinear")[0]
        return tf.clip_by_value(crop, 0.0, 255.0), table.lookup(ex["label"])

    ds = builder.as_dataset(split=split).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds, names
