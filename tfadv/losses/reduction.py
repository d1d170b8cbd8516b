"""Reducing per-example losses the way Keras' compiled losses do.

Every loss term a training step adds next to the compiled loss must be reduced
with the same convention, or the terms are weighted differently from what the
formula says once sample weights, replicas or a short last batch appear.
Keras 3 (`keras/src/losses/loss.py`, reduction "sum_over_batch_size") computes

    sum_i w_i * l_i / N          (N: this replica's batch size; 0 / 0 = 0)

and divides it by the number of replicas in sync; the all-reduced (summed)
gradient is then the gradient of the global-batch mean when the replicas'
batches are equal, and a replica without examples contributes nothing.
"""

from __future__ import annotations

import tensorflow as tf


def scale_for_replicas(value):
    """Divides a per-replica loss by the number of replicas in sync.

    Args:
        value: scalar float tensor, this replica's loss.

    Returns:
        `value / num_replicas_in_sync` (unchanged outside `tf.distribute`).
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * tf.cast(1.0 / replicas, value.dtype)
    return value


def unscale_for_replicas(value):
    """Inverse of `scale_for_replicas` (what Keras' loss tracker records)."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * tf.cast(replicas, value.dtype)
    return value


def sample_weights(sample_weight):
    """Sample weights as float32 `[N]`, or None.

    Args:
        sample_weight: None, or weights `[N]` or `[N, 1]` (what `fit` passes,
            also for `class_weight`).

    Returns:
        float32 `[N]` tensor or None.

    Raises:
        ValueError: weights of rank > 2, or `[N, K]` with K > 1.
    """
    if sample_weight is None:
        return None
    w = tf.convert_to_tensor(sample_weight)
    rank = w.shape.rank
    if rank is not None and (rank > 2 or (rank == 2 and w.shape[-1] not in (1, None))):
        raise ValueError(
            f"Expected one sample weight per example, [N] or [N, 1]. "
            f"Received: shape {w.shape.as_list()}"
        )
    return tf.reshape(tf.cast(w, tf.float32), [-1])


def global_batch_mean(values, sample_weight=None):
    """Per-example losses -> this replica's share of the global-batch mean.

    Keras' "sum_over_batch_size" reduction, distribution-aware: the weighted
    sum over this replica's examples divided by its batch size (0 for an
    empty batch, not NaN), divided by the number of replicas in sync. Summed
    over replicas (what the gradient all-reduce does) this is the mean over
    the global batch; an example of weight 0 contributes nothing.

    Args:
        values: `[N]` per-example losses (any float dtype).
        sample_weight: optional `[N]` or `[N, 1]` weights.

    Returns:
        float32 scalar.

    Raises:
        ValueError: `values` not of rank 1, or weights of the wrong shape.

    Example:
        >>> global_batch_mean(tf.constant([1.0, 3.0]), [1.0, 0.0])  # (1 + 0) / 2
        <tf.Tensor: shape=(), dtype=float32, numpy=0.5>
    """
    values = tf.cast(values, tf.float32)
    if values.shape.rank is not None and values.shape.rank != 1:
        raise ValueError(
            f"Expected per-example values of shape [N]. Received: shape {values.shape.as_list()}"
        )
    w = sample_weights(sample_weight)
    if w is not None:
        values = values * w
    count = tf.cast(tf.size(values), tf.float32)
    return scale_for_replicas(tf.math.divide_no_nan(tf.reduce_sum(values), count))
