"""Face detection: the largest face in a photo, found by MTCNN."""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Mapping

import cv2
import numpy as np

from tfadv.data.images import check_image

# Start of the NoFaceError message; also the category `FaceSet.counts` counts it under.
NO_FACE = "no face found"


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
        try:
            version = metadata.version("mtcnn")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return (f"mtcnn-{version}/min_face_size={self.min_face_size}"
                f"/min_confidence={self.min_confidence}/max_side={self.max_side}")

    def _model(self):
        if self._mtcnn is None:
            try:  # imported on first use: importing mtcnn takes seconds
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
        image = check_image(image)
        scale = 1.0
        h, w = image.shape[:2]
        if self.max_side is not None and max(h, w) > self.max_side:
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


def resolve_detector(detector):
    """The detector object for a `detector` argument (None: no detection).

    None or "mtcnn" give the shared `default_detector()`, "none" gives None
    (the images are already face crops), and an object with a
    `detect_largest_face` method is returned as it is.
    """
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
