"""The one label contract of tfadv: what every attack, objective, trainer and
evaluation function accepts as class labels.

Accepted, as Keras' sparse losses accept them plus one-hot:

- `[N]` class indices, any integer dtype or an integral float dtype;
- `[N, 1]` columns (what `keras.datasets` returns), same dtypes;
- one-hot `[N, C]` rows with `C > 1` (read as `argmax`: the same labels).

Everything becomes `[N]` int64. A float label that is not a whole number
(e.g. 0.3) is an error, not a silently truncated class.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _message(what):
    return (
        f"Expected class labels as [N] or [N, 1] integers (or whole-number floats), "
        f"or one-hot [N, C]. Received: {what}"
    )


def sparse_labels(y, num_classes=None):
    """Class labels in any accepted format -> `[N]` int64 tensor.

    Works eagerly and inside `tf.function` (static shapes decide the format).

    Args:
        y: labels `[N]`, `[N, 1]` or one-hot `[N, C]` (tensor or array-like).
        num_classes: optional C; one-hot rows of another width are rejected.

    Returns:
        int64 tensor `[N]`.

    Raises:
        ValueError: rank > 2, a one-hot width that is not `num_classes`, or
            (eagerly) float labels that are not whole numbers. Inside a graph
            the whole-number check is a `tf.debugging` assertion
            (`InvalidArgumentError` with the same message).
    """
    y = tf.convert_to_tensor(y)
    rank = y.shape.rank
    if rank is None:
        raise ValueError(_message("labels of unknown rank"))
    if rank == 2 and y.shape[-1] == 1:
        y = tf.reshape(y, [-1])
        rank = 1
    if rank == 2:
        width = y.shape[-1]
        if width is not None and num_classes is not None and int(width) != int(num_classes):
            raise ValueError(
                f"One-hot labels have {width} columns but the model has {num_classes} "
                f"classes. Pass [N] class indices or one-hot rows of width {num_classes}."
            )
        return tf.argmax(y, axis=-1, output_type=tf.int64)
    if rank != 1:
        raise ValueError(_message(f"shape {y.shape.as_list()}"))
    if y.dtype.is_integer:
        return tf.cast(y, tf.int64)
    if y.dtype == tf.bool or not (y.dtype.is_floating):
        raise ValueError(_message(f"dtype {y.dtype.name}"))
    whole = tf.reduce_all(tf.equal(y, tf.round(y)))
    if tf.executing_eagerly():
        if not bool(whole):
            bad = y.numpy()[y.numpy() != np.round(y.numpy())][:3]
            raise ValueError(_message(f"float labels that are not whole numbers, e.g. {bad}"))
    else:
        with tf.control_dependencies(
            [tf.debugging.Assert(whole, [_message("float labels that are not whole numbers")])]
        ):
            y = tf.identity(y)
    return tf.cast(y, tf.int64)


def sparse_labels_np(y, num_classes=None) -> np.ndarray:
    """NumPy version of `sparse_labels` for evaluation code: returns int64 `[N]`.

    Raises:
        ValueError: as `sparse_labels` (always eager here).
    """
    with tf.init_scope():  # eager even when called while a function is traced
        return sparse_labels(np.asarray(y), num_classes).numpy()
