"""Per-class reductions shared by centre updates, centre extraction and training."""

from __future__ import annotations

import tensorflow as tf


def class_sums(values, labels, num_classes, *, weights=None, across_replicas=False):
    """Per-class (weighted) sums of `values` [N, D] and per-class (weighted) counts.

    Args:
        values: [N, D] rows to sum by class.
        labels: [N] integer class of each row.
        num_classes: K, the number of output rows.
        weights: optional [N] weight of each row: the sums are
            `sum_i w_i [y_i = j] values_i` and the counts `sum_i w_i [y_i = j]`
            (a row of weight 0 counts for nothing).
        across_replicas: inside a `tf.distribute` replica context, all-reduce
            both results so that they describe the global batch.

    Returns:
        (sums [K, D], counts [K]) in the dtype of `values`; absent classes are 0.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if weights is None:
        w = tf.ones_like(labels, values.dtype)
        weighted = values
    else:
        w = tf.cast(tf.reshape(weights, [-1]), values.dtype)
        weighted = values * w[:, None]
    sums = tf.math.unsorted_segment_sum(weighted, labels, num_classes)
    counts = tf.math.unsorted_segment_sum(w, labels, num_classes)
    if across_replicas:
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            sums, counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [sums, counts])
    return sums, counts
