"""Adversarial examples on disk: TFRecord shards with their metadata.

A generation run (`tfadv.recipes.facenet_generate.generate`) crafts
adversarial faces once; fine-tuning, evaluation and other models read them back
as a `tf.data` pipeline. One directory holds one run:

    out_dir/
      shard-00000-of-00003.tfrecord     tf.train.Example records
      shard-00001-of-00003.tfrecord
      shard-00002-of-00003.tfrecord
      metadata.json                     counts, per-group success rates, run settings

Each record is one adversarial image with everything needed to judge or filter
it (see `AdversarialExample`): the identity label and name, the source photo,
the attack's name and JSON configuration, eps, norm, mode (dodging or
impersonation), the target (-1 / "" when untargeted), the threshold and whether
the attack succeeded at it, the clean and adversarial cosine similarities to the
reference, and the size of the perturbation.

Image encoding. The default, `image_format="raw"`, stores the float32 pixels
as raw little-endian bytes with their shape: lossless, so the image read back
is bit-identical to the one whose success was measured. `image_format="png"`
stores the image rounded to uint8 (about 4x smaller after PNG compression,
viewable with any image tool); rounding changes the image, so the success
flag and similarities in a PNG record are only right if the writer of the
examples measured them on the rounded image (`generate` does), and the
perturbation of a rounded image can exceed eps by up to 0.5 when the clean
image is not integer-valued.

Writes are atomic at the level of the run: shards are written under hidden
temporary names (`.tmp-...`) and renamed to their final
`shard-XXXXX-of-NNNNN.tfrecord` names only after the last example is written,
then `metadata.json` is written (temp file + rename) last. A killed run leaves
only hidden temporary files, which readers never match; a run killed during
the renames leaves an incomplete `of-NNNNN` set, which `read_records` detects.

Example:
    >>> meta = write_records("adv/", examples, shard_size=500)
    >>> ds = read_records("adv/")                          # dicts, one per record
    >>> pairs = to_training_pairs(ds, success_only=True)   # (image, label)
    >>> train = mix_with(clean_pairs, pairs, adv_fraction=0.3).batch(32)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

METADATA_FILE = "metadata.json"
FORMAT_NAME = "tfadv-adversarial-records"
FORMAT_VERSION = 1
IMAGE_FORMATS = ("raw", "png")
# `eps` of attacks without a budget (C&W): their size is in perturbation_l2.
NO_EPS = -1.0
NO_TARGET = -1
SHARD_PATTERN = "shard-*-of-*.tfrecord"
_SHARD_RE = re.compile(r"^shard-(\d{5,})-of-(\d{5,})\.tfrecord$")
_TMP_PREFIX = ".tmp-"
# How the image bytes were written, stored in every record.
_RAW_ENCODING = "raw_float32_le"
_PNG_ENCODING = "png_uint8"


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
        from tfadv.ops.norms import canonical_norm

        self.norm = canonical_norm(self.norm)


# Field name -> kind ("int", "float", "bytes"); the image fields are separate.
_FIELDS = OrderedDict([
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


def _dumps(obj, **kwargs) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True, **kwargs)


def _check_image_format(image_format):
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"Expected image_format in {IMAGE_FORMATS}. "
                         f"Received: image_format={image_format!r}")
    return image_format


def _encode_image(image, image_format):
    """(bytes, encoding, shape) of one image."""
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
        return image.astype("<f4").tobytes(), _RAW_ENCODING, image.shape
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError("PNG stores 1, 3 or 4 channels. Received: "
                         f"{image.shape[-1]} channels; use image_format='raw'.")
    if image.min() < 0 or image.max() > 255:
        raise ValueError("PNG stores pixels in [0, 255]. Received values in "
                         f"[{image.min()}, {image.max()}]; use image_format='raw'.")
    import tensorflow as tf

    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return tf.io.encode_png(pixels).numpy(), _PNG_ENCODING, image.shape


def serialize_example(example: AdversarialExample, image_format: str = "raw") -> bytes:
    """One `AdversarialExample` as a serialised `tf.train.Example`.

    Args:
        example: the example.
        image_format: "raw" (lossless float32) or "png" (rounded uint8).

    Returns:
        bytes of the `tf.train.Example` protocol buffer.
    """
    import tensorflow as tf

    _check_image_format(image_format)
    data, encoding, shape = _encode_image(example.image, image_format)
    config = example.attack_config
    if not isinstance(config, str):
        config = _dumps(config, sort_keys=True)
    values = dataclasses.asdict(dataclasses.replace(example, image=None, attack_config=config))
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image_encoding": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[encoding.encode()])),
        "image_shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(shape))),
    }
    for name, kind in _FIELDS.items():
        value = values[name]
        if kind == "int":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        elif kind == "float":
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
        else:
            feature[name] = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[str(value).encode("utf-8")]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# --------------------------------------------------------------------------- writing


def _existing_shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(SHARD_PATTERN) if _SHARD_RE.match(p.name))


def _group_key(ex: AdversarialExample):
    return (ex.attack, float(ex.eps), ex.mode, ex.norm)


class _GroupStats:
    """Running per-(attack, eps, mode, norm) numbers for metadata.json."""

    def __init__(self):
        self.count = 0
        self.success = 0
        self.clean_success = 0
        self.clean_sim = []
        self.adv_sim = []
        self.l2 = []
        self.linf = []

    def add(self, ex: AdversarialExample):
        self.count += 1
        self.success += int(bool(ex.success))
        thr = float(ex.threshold)
        sim = float(ex.clean_similarity)
        if math.isfinite(thr) and math.isfinite(sim):
            self.clean_success += int(sim < thr if ex.mode == "dodging" else sim >= thr)
        self.clean_sim.append(sim)
        self.adv_sim.append(float(ex.adversarial_similarity))
        self.l2.append(float(ex.perturbation_l2))
        self.linf.append(float(ex.perturbation_linf))

    def summary(self, key) -> dict:
        attack, eps, mode, norm = key

        def stat(fn, values):
            values = np.asarray(values, np.float64)
            values = values[np.isfinite(values)]
            return float(fn(values)) if values.size else None

        return {
            "attack": attack, "eps": None if eps == NO_EPS else eps, "mode": mode, "norm": norm,
            "count": self.count, "successes": self.success,
            "success_rate": self.success / self.count if self.count else None,
            # Fraction that already "succeeded" without the attack (e.g. a
            # clean face below the threshold to its own reference).
            "clean_success_rate": self.clean_success / self.count if self.count else None,
            "mean_clean_similarity": stat(np.mean, self.clean_sim),
            "mean_adversarial_similarity": stat(np.mean, self.adv_sim),
            "median_perturbation_l2": stat(np.median, self.l2),
            "max_perturbation_linf": stat(np.max, self.linf),
        }


def write_records(out_dir, examples: Iterable[AdversarialExample], *, shard_size: int = 1000,
                  image_format: str = "raw", compression: str | None = None,
                  metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                  overwrite: bool = False) -> dict:
    """Writes adversarial examples as TFRecord shards plus `metadata.json`.

    Examples are consumed lazily (a generator that crafts them batch by batch
    never holds the whole run in memory). Shards are written under hidden
    temporary names and renamed to `shard-XXXXX-of-NNNNN.tfrecord` once all
    examples are written; `metadata.json` is written last. If the iterable
    raises, the temporary files are removed and nothing visible is written.

    Args:
        out_dir: directory of the run (created if missing).
        examples: iterable of `AdversarialExample`.
        shard_size: examples per shard (the last one may hold fewer).
        image_format: "raw" (float32 bytes, lossless; default) or "png"
            (rounded uint8; see the module docstring).
        compression: None, "GZIP" or "ZLIB" (TFRecord compression).
        metadata: extra JSON-serialisable fields for `metadata.json` (model,
            settings, ...), or a callable returning them, called after the
            last example is written (for numbers known only then, such as
            the run time).
        overwrite: replace the shards and metadata of an earlier run in
            `out_dir`. Without it, an `out_dir` holding shards is an error.

    Returns:
        The metadata dict written to `metadata.json`: "format", "version",
        "count", "image_format", "image_shape", "compression", "shards"
        (file names and counts), "counts" (by attack, by mode), "attacks",
        "eps" (sorted budgets, without `NO_EPS`), "groups" (one entry per
        attack/eps/mode/norm with count, success rate, clean success rate,
        mean similarities, median L2 and max Linf of the perturbation), plus
        the fields of `metadata`.

    Raises:
        FileExistsError: `out_dir` holds shards or metadata and `overwrite` is False.
        ValueError: bad arguments, or an example with a bad image.

    Example:
        >>> write_records("adv/", examples, shard_size=500, metadata={"model": "facenet"})
    """
    import tensorflow as tf

    _check_image_format(image_format)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"Expected shard_size to be an integer >= 1. "
                         f"Received: shard_size={shard_size!r}")
    if compression not in (None, "", "GZIP", "ZLIB"):
        raise ValueError("Expected compression in (None, 'GZIP', 'ZLIB'). "
                         f"Received: compression={compression!r}")
    compression = compression or None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = _existing_shards(out_dir)
    if (old or (out_dir / METADATA_FILE).exists()) and not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} already holds adversarial records ({len(old)} shards). "
            "Choose another directory or pass overwrite=True."
        )

    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp_paths: list[Path] = []
    shard_counts: list[int] = []
    groups: "OrderedDict[tuple, _GroupStats]" = OrderedDict()
    attacks, by_mode = OrderedDict(), OrderedDict()
    image_shape = None
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    writer = None
    tmp_meta = out_dir / f"{_TMP_PREFIX}{token}-{METADATA_FILE}"
    try:
        for ex in examples:
            if not isinstance(ex, AdversarialExample):
                raise ValueError("Expected AdversarialExample items. "
                                 f"Received: {type(ex).__name__}")
            data = serialize_example(ex, image_format)
            shape = list(np.shape(ex.image))
            if image_shape is None:
                image_shape = shape
            elif shape != image_shape:
                raise ValueError("Expected all images of one run to have one shape. Received: "
                                 f"{shape} after {image_shape}.")
            if writer is None or shard_counts[-1] >= shard_size:
                if writer is not None:
                    writer.close()
                path = out_dir / f"{_TMP_PREFIX}{token}-{len(tmp_paths):05d}.tfrecord"
                tmp_paths.append(path)
                shard_counts.append(0)
                writer = tf.io.TFRecordWriter(str(path), options)
            writer.write(data)
            shard_counts[-1] += 1
            groups.setdefault(_group_key(ex), _GroupStats()).add(ex)
            attacks[ex.attack] = attacks.get(ex.attack, 0) + 1
            by_mode[ex.mode] = by_mode.get(ex.mode, 0) + 1
        if writer is not None:
            writer.close()
            writer = None
        extra = dict(metadata() if callable(metadata) else (metadata or {}))
        n = len(tmp_paths)
        final = [out_dir / f"shard-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "count": int(sum(shard_counts)),
            "image_format": image_format,
            "image_shape": image_shape,
            "compression": compression,
            "shards": [{"file": p.name, "count": c} for p, c in zip(final, shard_counts)],
            "counts": {"by_attack": dict(attacks), "by_mode": dict(by_mode)},
            "attacks": list(attacks),
            "eps": sorted({k[1] for k in groups if k[1] != NO_EPS}),
            "groups": [stats.summary(key) for key, stats in groups.items()],
        }
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"metadata must not redefine the fields {clash}; they are computed.")
        meta.update(extra)
        text = _dumps(meta, indent=2) + "\n"
        tmp_meta.write_text(text)

        # Everything is on disk: now make it visible, metadata last.
        if overwrite:
            for path in old:
                path.unlink(missing_ok=True)
            (out_dir / METADATA_FILE).unlink(missing_ok=True)
        for tmp, path in zip(tmp_paths, final):
            os.replace(tmp, path)
        os.replace(tmp_meta, out_dir / METADATA_FILE)
    except BaseException:
        if writer is not None:
            writer.close()
        for path in [*tmp_paths, tmp_meta]:
            path.unlink(missing_ok=True)
        raise
    return json.loads(text)


# --------------------------------------------------------------------------- reading


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
        files = sorted(str(p) for p in _existing_shards(Path(target)))
        if files:
            totals = {_SHARD_RE.match(Path(f).name).group(2) for f in files}
            if len(totals) != 1 or int(totals.pop()) != len(files):
                raise ValueError(
                    f"Incomplete set of shards in {target!r} ({len(files)} files; names "
                    f"{Path(files[0]).name} ... {Path(files[-1]).name}). The run that wrote "
                    "them did not finish; write the records again."
                )
        return files
    files = sorted(f for f in glob.glob(target) if not Path(f).name.startswith(_TMP_PREFIX))
    if not files:
        raise FileNotFoundError(f"No TFRecord files match {target!r}. Pass a directory "
                                "written by write_records(), a shard file or a glob pattern.")
    return files


def _feature_spec():
    import tensorflow as tf

    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "image_encoding": tf.io.FixedLenFeature([], tf.string),
        "image_shape": tf.io.FixedLenFeature([3], tf.int64),
    }
    kinds = {"int": tf.int64, "float": tf.float32, "bytes": tf.string}
    for name, kind in _FIELDS.items():
        spec[name] = tf.io.FixedLenFeature([], kinds[kind])
    return spec


def parse_example(serialized, image_shape=None):
    """Parses one serialised record into a dict of tensors (see `read_records`)."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, _feature_spec())
    shape = tf.cast(parsed.pop("image_shape"), tf.int32)
    encoding = parsed.pop("image_encoding")
    data = parsed.pop("image")

    def raw():
        return tf.reshape(tf.io.decode_raw(data, tf.float32, little_endian=True), shape)

    def png():
        return tf.reshape(tf.cast(tf.io.decode_png(data, channels=0), tf.float32), shape)

    image = tf.cond(tf.equal(encoding, _RAW_ENCODING), raw, png)
    if image_shape is not None:
        image = tf.ensure_shape(image, list(image_shape))
    out = {"image": image}
    out.update(parsed)
    out["success"] = tf.cast(out["success"], tf.bool)
    return out


def read_records(pattern_or_dir, *, image_shape=None, compression: str | None = None,
                 shuffle_files: bool = False, seed: int | None = None,
                 num_parallel_calls=None):
    """Adversarial records as a `tf.data.Dataset` of dicts, one per example.

    Args:
        pattern_or_dir: a directory written by `write_records`, a shard file,
            or a glob pattern of shard files.
        image_shape: static image shape, e.g. `(160, 160, 3)`; default: from
            `metadata.json` when a directory is given (else the images have the
            static shape (None, None, None); pass it for Keras).
        compression: TFRecord compression; default: from `metadata.json`,
            else none.
        shuffle_files: shuffle the order of the shards (seeded by `seed`).
        seed: seed of the file shuffle.
        num_parallel_calls: parallelism of the parsing map (default AUTOTUNE).

    Returns:
        Unbatched dataset of dicts: "image" float32 `(H, W, C)`, "label"
        int64, "identity", "source_path", "attack", "attack_config" (JSON),
        "norm", "mode", "target_identity" (strings), "eps", "threshold",
        "clean_similarity", "adversarial_similarity", "perturbation_linf",
        "perturbation_l2" (float32), "target_label", "source_index" (int64),
        "success" (bool).

    Raises:
        FileNotFoundError: no shards found.

    Example:
        >>> ds = read_records("adv/")
        >>> ds = ds.filter(lambda r: r["attack"] == "pgd")
    """
    import tensorflow as tf

    target = os.fspath(pattern_or_dir)
    meta = None
    if os.path.isdir(target) and os.path.isfile(os.path.join(target, METADATA_FILE)):
        meta = load_metadata(target)
    files = shard_files(target)
    if not files and (meta is None or int(meta.get("count", 0)) != 0):
        raise FileNotFoundError(f"No shards ({SHARD_PATTERN}) in {target!r}.")
    if meta is not None:
        if image_shape is None and meta.get("image_shape"):
            image_shape = tuple(meta["image_shape"])
        if compression is None:
            compression = meta.get("compression")
    files_ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
    if shuffle_files and len(files) > 1:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression or ""),
        cycle_length=1 if not shuffle_files else min(4, max(1, len(files))),
    )
    return ds.map(lambda s: parse_example(s, image_shape),
                  num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)


def filter_records(ds, *, attack=None, eps=None, mode=None, success_only=False):
    """Keeps the records of some attacks / budgets / modes.

    Args:
        ds: dataset from `read_records`.
        attack, mode: a name or a list of names (None: all).
        eps: a budget or a list of budgets (None: all; `NO_EPS` selects
            attacks without a budget).
        success_only: keep only successful adversarial examples.

    Returns:
        The filtered dataset of dicts.
    """
    import tensorflow as tf

    def as_list(v):
        return None if v is None else ([v] if isinstance(v, (str, int, float)) else list(v))

    attacks, modes, budgets = as_list(attack), as_list(mode), as_list(eps)

    def keep(r):
        ok = tf.constant(True)
        if attacks is not None:
            ok &= tf.reduce_any(tf.equal(r["attack"], tf.constant(attacks, tf.string)))
        if modes is not None:
            ok &= tf.reduce_any(tf.equal(r["mode"], tf.constant(modes, tf.string)))
        if budgets is not None:
            diff = tf.abs(r["eps"] - tf.constant(budgets, tf.float32))
            ok &= tf.reduce_any(diff <= 1e-6 * (1.0 + tf.abs(r["eps"])))
        if success_only:
            ok &= r["success"]
        return ok

    return ds.filter(keep)


def to_training_pairs(ds, *, success_only=False, label_dtype="int64"):
    """`(image, label)` pairs for training from a dataset of records.

    The label is the source image's own identity: an adversarial example is
    trained to keep its true label (impersonation targets are not labels).

    Args:
        ds: dataset from `read_records` (or `filter_records`).
        success_only: drop examples whose attack failed.
        label_dtype: dtype of the labels (match the clean dataset's).

    Returns:
        Dataset of `(float32 (H, W, C), label)`.
    """
    import tensorflow as tf

    if success_only:
        ds = ds.filter(lambda r: r["success"])
    dtype = tf.as_dtype(label_dtype)
    return ds.map(lambda r: (r["image"], tf.cast(r["label"], dtype)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def mix_with(clean_ds, adv_ds, adv_fraction: float, *, seed: int | None = None,
             repeat_adversarial: bool = True):
    """Mixes adversarial examples into a clean training stream.

    Each element is drawn from `adv_ds` with probability `adv_fraction` and
    from `clean_ds` otherwise (`tf.data.Dataset.sample_from_datasets`). With
    `repeat_adversarial=True` the (usually smaller) adversarial set is
    repeated and the mixed stream ends when `clean_ds` does, so an "epoch"
    is one pass over the clean data plus about
    `len(clean) * f / (1 - f)` adversarial examples.

    Args:
        clean_ds: unbatched dataset of `(image, label)`.
        adv_ds: unbatched dataset of `(image, label)`, or of record dicts
            (converted with `to_training_pairs`).
        adv_fraction: expected fraction of adversarial elements, in [0, 1].
        seed: sampling seed.
        repeat_adversarial: repeat `adv_ds` (see above); without it the
            stream ends when either dataset runs out.

    Returns:
        Unbatched dataset of `(image, label)`; batch it after mixing so every
        batch holds both kinds.

    Raises:
        ValueError: fraction outside [0, 1], or datasets whose elements do
            not match (e.g. one of them batched).

    Example:
        >>> clean = tf.data.Dataset.from_tensor_slices((faces.images, faces.labels))
        >>> adv = to_training_pairs(read_records("adv/"))
        >>> train = mix_with(clean.shuffle(1000), adv.shuffle(1000), 0.3).batch(32)
    """
    import tensorflow as tf

    f = float(adv_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"Expected adv_fraction in [0, 1]. Received: adv_fraction={adv_fraction}")
    if isinstance(adv_ds.element_spec, dict):
        adv_ds = to_training_pairs(adv_ds)
    clean_spec, adv_spec = clean_ds.element_spec, adv_ds.element_spec
    if not (isinstance(clean_spec, tuple) and isinstance(adv_spec, tuple)
            and len(clean_spec) == len(adv_spec) == 2):
        raise ValueError("Expected both datasets to yield (image, label) pairs. Received: "
                         f"clean {clean_spec}, adversarial {adv_spec}.")
    (ci, cl), (ai, al) = clean_spec, adv_spec
    if ci.shape.rank is not None and ai.shape.rank is not None and ci.shape.rank != ai.shape.rank:
        raise ValueError(
            f"Image ranks differ: clean {ci.shape}, adversarial {ai.shape}. Mix unbatched "
            "datasets (call .unbatch() on a batched one), then batch the mixture."
        )
    if not ci.shape.is_compatible_with(ai.shape):
        raise ValueError(f"Image shapes differ: clean {ci.shape}, adversarial {ai.shape}.")
    if ai.dtype != ci.dtype or al.dtype != cl.dtype:
        adv_ds = adv_ds.map(lambda x, y: (tf.cast(x, ci.dtype), tf.cast(y, cl.dtype)))
    if f == 0.0:
        return clean_ds
    if f == 1.0:
        return adv_ds
    if repeat_adversarial:
        adv_ds = adv_ds.repeat()
    return tf.data.Dataset.sample_from_datasets(
        [clean_ds, adv_ds], weights=[1.0 - f, f], seed=seed, stop_on_empty_dataset=True)
