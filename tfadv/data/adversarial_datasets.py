"""Reading adversarial records back as `tf.data` pipelines for training and evaluation.

`read_records` gives one dict per record, `filter_records` selects attacks,
budgets and modes, `to_training_pairs` turns records into `(image, label)`
and `mix_with` mixes them into a clean training stream. See
`tfadv.data.adversarial_records` for the layout and the record fields.
"""

from __future__ import annotations

import os

import tensorflow as tf

from tfadv.data.adversarial_schema import (
    METADATA_FILE,
    SHARD_PATTERN,
    load_metadata,
    parse_example,
    shard_files,
)


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
