"""Face photos to aligned crops, and folders of them to labelled face sets.

The pipeline for one photo is `read_image` (`tfadv.data.images`: any
PIL-readable file to RGB uint8) -> `FaceDetector.detect_largest_face`
(`tfadv.data.face_detection`: MTCNN) -> `crop_face` (`tfadv.data.face_crops`:
the face box expanded by a margin, optionally rotated so the eyes are level,
resized to `size x size`; the crop convention is documented there).
`load_face` runs it on one file and caches the crop; `load_face_folder` runs
it over a folder with one sub-folder per identity, skips and reports what it
cannot use, and returns a `FaceSet`; crops are cached, so a second load does
not run MTCNN again. `embed_files` turns photo files into embeddings with any
embedding function.

Every name of the pipeline is importable from here (`from tfadv.data.faces
import read_image, crop_face, load_face, ...`). Images leave it as RGB in raw
pixel units [0, 255]; the models do their own standardisation (see
`tfadv.models`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfadv.data.face_crops import (DEFAULT_MARGIN, center_crop_resize, crop_face,
                                   default_cache_dir, load_face)
from tfadv.data.face_detection import (NO_FACE, Face, FaceDetector, NoFaceError,
                                       default_detector, resolve_detector)
from tfadv.data.images import IMAGE_EXTENSIONS, BadImageError, read_image

__all__ = [
    "BadImageError",
    "DEFAULT_MARGIN",
    "Face",
    "FaceDetector",
    "FaceSet",
    "IMAGE_EXTENSIONS",
    "NOT_AN_IMAGE",
    "NO_FACE",
    "NoFaceError",
    "OUTSIDE_IDENTITY",
    "UNREADABLE",
    "center_crop_resize",
    "crop_face",
    "default_cache_dir",
    "default_detector",
    "embed_files",
    "load_face",
    "load_face_folder",
    "load_lfw_tfds",
    "read_image",
    "to_dataset",
]

# Skip reasons: the text before ":" is the category counted by `FaceSet.counts`
# (NO_FACE, the NoFaceError message's start, comes from `tfadv.data.face_detection`).
UNREADABLE = "unreadable image"
NOT_AN_IMAGE = "not an image file"
OUTSIDE_IDENTITY = "not in an identity folder"


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
    det = resolve_detector(detector)  # validate before any work
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
    import tensorflow_datasets as tfds  # imported on use: heavy, and only LFW needs it

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
