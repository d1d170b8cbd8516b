"""Per-class reductions shared by centre updates, centre extraction and training."""

from __future__ import annotations

import tensorflow as tf


def class_sums(values, labels, num_classes, *, across_replicas=False):
    """Per-class sums of `values` [N, D] and per-class counts.

    Args:
        values: [N, D] rows to sum by class.
        labels: [N] integer class of each row.
        num_classes: K, the number of output rows.
        across_replicas: inside a `tf.distribute` replica context, all-reduce
            both results so that they describe the global batch.

    Returns:
        (sums [K, D], counts [K]) in the dtype of `values`; absent classes are 0.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    sums = tf.math.unsorted_segment_sum(values, labels, num_classes)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(labels, values.dtype), labels, num_classes)
    if across_replicas:
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            sums, counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [sums, counts])
    return sums, counts
