"""Center loss (Wen et al., ECCV 2016)."""

from __future__ import annotations

import tensorflow as tf


def center_loss(features, centers_of_labels):
    """Per-example center loss `1/2 ||x_i - c_{y_i}||^2`.

    The centres are treated as constants (their gradient is stopped): they
    move by the update rule of `ClassCenters`, not by backpropagation.

    Args:
        features: [N, D] deep features.
        centers_of_labels: [N, D] the centre of each example's class.

    Returns:
        [N] float32 losses; the paper's L_C is their mean (times lambda).
    """
    f = tf.cast(features, tf.float32)
    c = tf.stop_gradient(tf.cast(centers_of_labels, tf.float32))
    return 0.5 * tf.reduce_sum(tf.square(f - c), axis=-1)
