"""Class centres as non-trainable state (Wen et al., ECCV 2016)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfadv.ops.classwise import class_sums


@keras.saving.register_keras_serializable(package="tfadv")
class ClassCenters(keras.layers.Layer):
    """Holds one centre per class, shape (num_classes, feature_dim), not trainable.

    The centres change only through `update` (called in the training step),
    with the rule of Wen et al. (2016):

        delta_c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),   c_j <- c_j - alpha * delta_c_j

    so a class absent from the batch does not move. Under `tf.distribute` the
    sums and counts are all-reduced over replicas first: the update uses the
    whole global batch.

    Calling the layer gathers the centre of each label: `layer(labels) -> [N, dim]`.

    Args:
        num_classes: number of classes.
        feature_dim: feature dimension.
        alpha: centre learning rate (0.5 in the paper).
    """

    def __init__(self, num_classes, feature_dim, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(feature_dim) < 1:
            raise ValueError(
                f"Expected num_classes, feature_dim >= 1. Received: {num_classes}, {feature_dim}"
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"Expected 0 <= alpha <= 1. Received: alpha={alpha}")
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.alpha = float(alpha)
        self.centers = self.add_weight(
            shape=(self.num_classes, self.feature_dim),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            # Every replica computes the same all-reduced update.
            aggregation="only_first_replica",
            name="centers",
        )
        self.built = True

    def call(self, labels):
        return tf.gather(self.centers, tf.cast(tf.reshape(labels, [-1]), tf.int32))

    def update(self, features, labels):
        """Moves the centres toward the batch's features (all replicas' batches)."""
        diff = self(labels) - tf.cast(tf.stop_gradient(features), self.centers.dtype)
        sums, counts = class_sums(diff, labels, self.num_classes, across_replicas=True)
        delta = sums / (1.0 + counts)[:, None]
        self.centers.assign(self.centers - self.alpha * delta)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, feature_dim=self.feature_dim, alpha=self.alpha)
        return config
