"""Center loss (Wen et al., ECCV 2016)."""

from __future__ import annotations

import tensorflow as tf


def center_loss(features, centers_of_labels):
    """Per-example center loss `1/2 ||x_i - c_{y_i}||^2`.

    Wen et al., "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016. The centres are treated as constants (their
    gradient is stopped): they move by the update rule of
    `tfadv.layers.ClassCenters`, not by backpropagation.

    Args:
        features: `[N, D]` deep features (any float dtype).
        centers_of_labels: `[N, D]` the centre of each example's class (e.g.
            `ClassCenters(labels)`).

    Returns:
        float32 `[N]` losses; the paper's L_C is their mean (times lambda).
        Reduce with `tfadv.losses.global_batch_mean` (with sample weights) as
        the trainers do.

    Raises:
        ValueError: features and centres of different static shapes.
    """
    f = tf.cast(features, tf.float32)
    c = tf.stop_gradient(tf.cast(centers_of_labels, tf.float32))
    if not f.shape.is_compatible_with(c.shape):
        raise ValueError(
            f"Expected features and centres of one shape [N, D]. Received: "
            f"{f.shape.as_list()} and {c.shape.as_list()}"
        )
    return 0.5 * tf.reduce_sum(tf.square(f - c), axis=-1)
