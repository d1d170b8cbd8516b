"""What one adversarial record is, and how a records directory is laid out.

The schema of the records of `tfadv.data.adversarial_records`: the
`AdversarialExample` fields, their `tf.train.Example` encoding (and parsing
back), the two image encodings, and the names of the files of a run
(shards, hidden temporary files, `metadata.json`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfadv.ops.norms import canonical_norm

METADATA_FILE = "metadata.json"
FORMAT_NAME = "tfadv-adversarial-records"
FORMAT_VERSION = 1
IMAGE_FORMATS = ("raw", "png")
# `eps` of attacks without a budget (C&W): their size is in perturbation_l2.
NO_EPS = -1.0
NO_TARGET = -1
SHARD_PATTERN = "shard-*-of-*.tfrecord"
SHARD_RE = re.compile(r"^shard-(\d{5,})-of-(\d{5,})\.tfrecord$")
# Files of a run still being written; readers never match them.
TMP_PREFIX = ".tmp-"
# How the image bytes were written, stored in every record.
RAW_ENCODING = "raw_float32_le"
PNG_ENCODING = "png_uint8"


@dataclasses.dataclass
class AdversarialExample:
    """One adversarial image and what is known about it.

    Attributes:
        image: float array `(H, W, C)`, raw pixels (e.g. RGB in [0, 255]).
        label: identity label of the source image (the label to train with).
        identity: identity name of the source image.
        source_path: the photo the clean image came from.
        attack: attack name (e.g. "pgd", "cleverhans_pgd", "cw").
        attack_config: the attack's settings, JSON-serialisable.
        eps: budget in the model's input units; `NO_EPS` (-1) for attacks
            without one (C&W).
        norm: "inf" or "2" (any spelling `tfadv.ops.canonical_norm` accepts;
            stored as "inf" or "2"; others raise ValueError).
        mode: "dodging" or "impersonation".
        target_label: impersonated identity's label; `NO_TARGET` (-1) if untargeted.
        target_identity: impersonated identity's name; "" if untargeted.
        threshold: cosine-similarity threshold success was judged at.
        success: the attack succeeded at `threshold` (dodging: similarity to
            the own reference < threshold; impersonation: similarity to the
            target >= threshold).
        clean_similarity: cosine similarity of the clean image's embedding to
            the reference (own identity for dodging, target for impersonation).
        adversarial_similarity: the same for the adversarial image.
        perturbation_linf, perturbation_l2: size of `image - clean image`.
        source_index: index of the clean image in the set it came from.
    """

    image: np.ndarray
    label: int
    identity: str = ""
    source_path: str = ""
    attack: str = ""
    attack_config: Mapping[str, Any] | str = dataclasses.field(default_factory=dict)
    eps: float = NO_EPS
    norm: str = "inf"
    mode: str = "dodging"
    target_label: int = NO_TARGET
    target_identity: str = ""
    threshold: float = math.nan
    success: bool = False
    clean_similarity: float = math.nan
    adversarial_similarity: float = math.nan
    perturbation_linf: float = math.nan
    perturbation_l2: float = math.nan
    source_index: int = -1

    def __post_init__(self):
        # Stored under the standard name, so "Linf" and "inf" group together.
        self.norm = canonical_norm(self.norm)


# Field name -> kind ("int", "float", "bytes"); the image fields are separate.
FIELDS = OrderedDict([
    ("label", "int"), ("identity", "bytes"), ("source_path", "bytes"), ("attack", "bytes"),
    ("attack_config", "bytes"), ("eps", "float"), ("norm", "bytes"), ("mode", "bytes"),
    ("target_label", "int"), ("target_identity", "bytes"), ("threshold", "float"),
    ("success", "int"), ("clean_similarity", "float"), ("adversarial_similarity", "float"),
    ("perturbation_linf", "float"), ("perturbation_l2", "float"), ("source_index", "int"),
])


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(obj, **kwargs) -> str:
    """`json.dumps` that also takes NumPy scalars and arrays, paths and sets."""
    return json.dumps(obj, default=_json_default, allow_nan=True, **kwargs)


def check_image_format(image_format: str) -> str:
    """`image_format` if it is one of `IMAGE_FORMATS`.

    Raises:
        ValueError: any other value.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"Expected image_format in {IMAGE_FORMATS}. "
                         f"Received: image_format={image_format!r}")
    return image_format


def encode_image(image, image_format: str) -> tuple[bytes, str, tuple]:
    """`(bytes, encoding, shape)` of one `(H, W, C)` image.

    Raises:
        ValueError: not a finite numeric `(H, W, C)` image, or one PNG cannot
            store (channels other than 1, 3, 4; values outside [0, 255]).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"Expected an image of shape (H, W, C). Received: shape={image.shape}")
    if not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"Expected a numeric image. Received: dtype={image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise ValueError("Expected a finite image; it holds NaN or inf values. "
                         "Check the attack that produced it.")
    if image_format == "raw":
        return image.astype("<f4").tobytes(), RAW_ENCODING, image.shape
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError("PNG stores 1, 3 or 4 channels. Received: "
                         f"{image.shape[-1]} channels; use image_format='raw'.")
    if image.min() < 0 or image.max() > 255:
        raise ValueError("PNG stores pixels in [0, 255]. Received values in "
                         f"[{image.min()}, {image.max()}]; use image_format='raw'.")
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return tf.io.encode_png(pixels).numpy(), PNG_ENCODING, image.shape


def serialize_example(example: AdversarialExample, image_format: str = "raw") -> bytes:
    """One `AdversarialExample` as a serialised `tf.train.Example`.

    Args:
        example: the example.
        image_format: "raw" (lossless float32) or "png" (rounded uint8).

    Returns:
        bytes of the `tf.train.Example` protocol buffer.
    """
    check_image_format(image_format)
    data, encoding, shape = encode_image(example.image, image_format)
    config = example.attack_config
    if not isinstance(config, str):
        config = to_json(config, sort_keys=True)
    values = dataclasses.asdict(dataclasses.replace(example, image=None, attack_config=config))
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image_encoding": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[encoding.encode()])),
        "image_shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(shape))),
    }
    for name, kind in FIELDS.items():
        value = values[name]
        if kind == "int":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        elif kind == "float":
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
        else:
            feature[name] = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[str(value).encode("utf-8")]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def feature_spec() -> dict:
    """The `tf.io.parse_single_example` spec of a record."""
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "image_encoding": tf.io.FixedLenFeature([], tf.string),
        "image_shape": tf.io.FixedLenFeature([3], tf.int64),
    }
    kinds = {"int": tf.int64, "float": tf.float32, "bytes": tf.string}
    for name, kind in FIELDS.items():
        spec[name] = tf.io.FixedLenFeature([], kinds[kind])
    return spec


def parse_example(serialized, image_shape=None):
    """Parses one serialised record into a dict of tensors (see `read_records`)."""
    parsed = tf.io.parse_single_example(serialized, feature_spec())
    shape = tf.cast(parsed.pop("image_shape"), tf.int32)
    encoding = parsed.pop("image_encoding")
    data = parsed.pop("image")

    def raw():
        return tf.reshape(tf.io.decode_raw(data, tf.float32, little_endian=True), shape)

    def png():
        return tf.reshape(tf.cast(tf.io.decode_png(data, channels=0), tf.float32), shape)

    image = tf.cond(tf.equal(encoding, RAW_ENCODING), raw, png)
    if image_shape is not None:
        image = tf.ensure_shape(image, list(image_shape))
    out = {"image": image}
    out.update(parsed)
    out["success"] = tf.cast(out["success"], tf.bool)
    return out


# --------------------------------------------------------------------------- directory layout


def existing_shards(out_dir) -> list[Path]:
    """The finished shard files in `out_dir` (sorted), whatever their `of-NNNNN` total."""
    return sorted(p for p in Path(out_dir).glob(SHARD_PATTERN) if SHARD_RE.match(p.name))


def holds_records(out_dir) -> bool:
    """True when `out_dir` holds the shards or the metadata of a run."""
    out_dir = Path(out_dir)
    return out_dir.is_dir() and bool(existing_shards(out_dir)
                                     or (out_dir / METADATA_FILE).exists())


def load_metadata(path) -> dict:
    """The `metadata.json` of a records directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {METADATA_FILE} at {str(path)!r}. It is written by "
                                "write_records() when a run completes.")
    return json.loads(path.read_text())


def shard_files(pattern_or_dir) -> list[str]:
    """The shard files of a records directory, a glob pattern or a single file.

    Raises:
        FileNotFoundError: a pattern or file that matches nothing (a
            directory without shards gives an empty list).
        ValueError: a directory whose `of-NNNNN` set is incomplete (a run
            killed while renaming its shards).
    """
    target = os.fspath(pattern_or_dir)
    if os.path.isdir(target):
        files = [str(p) for p in existing_shards(target)]
        if files:
            totals = {SHARD_RE.match(Path(f).name).group(2) for f in files}
            if len(totals) != 1 or int(totals.pop()) != len(files):
                raise ValueError(
                    f"Incomplete set of shards in {target!r} ({len(files)} files; names "
                    f"{Path(files[0]).name} ... {Path(files[-1]).name}). The run that wrote "
                    "them did not finish; write the records again."
                )
        return files
    files = sorted(f for f in glob.glob(target) if not Path(f).name.startswith(TMP_PREFIX))
    if not files:
        raise FileNotFoundError(f"No TFRecord files match {target!r}. Pass a directory "
                                "written by write_records(), a shard file or a glob pattern.")
    return files
