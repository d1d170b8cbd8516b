"""Class centres as non-trainable state (Wen et al., ECCV 2016)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfadv.ops.classwise import class_sums
from tfadv.ops.labels import sparse_labels


@keras.saving.register_keras_serializable(package="tfadv")
class ClassCenters(keras.layers.Layer):
    """Holds one centre per class, shape (num_classes, feature_dim), not trainable.

    The centres change only through `update` (called in the training step),
    with the rule of Wen et al. (2016), generalised to sample weights `w_i`
    (all 1 gives the paper's rule):

        delta_c_j = sum_i w_i [y_i = j] (c_j - x_i) / (1 + sum_i w_i [y_i = j]),
        c_j <- c_j - alpha * delta_c_j

    so a class absent from the batch (or present with weight 0 only) does not
    move. Under `tf.distribute` the sums and counts are all-reduced over
    replicas first: the update uses the whole global batch.

    The centres are always float32, whatever the global dtype policy: under
    `mixed_float16` / `mixed_bfloat16` the features are cast to float32 for
    the update, and calling the layer returns float32 centres.

    Calling the layer gathers the centre of each label:
    `layer(labels [N] / [N, 1] / one-hot [N, K]) -> [N, feature_dim]` float32.

    Args:
        num_classes: number of classes.
        feature_dim: feature dimension.
        alpha: centre learning rate (0.5 in the paper).

    Raises:
        ValueError: num_classes or feature_dim < 1, alpha outside [0, 1].
    """

    def __init__(self, num_classes, feature_dim, alpha=0.5, **kwargs):
        # The state and its update are float32 under any mixed policy.
        kwargs["dtype"] = "float32"
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

    def _gather(self, labels):
        labels = sparse_labels(labels, self.num_classes)
        return tf.gather(self.centers, tf.cast(labels, tf.int32))

    def call(self, labels):
        return self._gather(labels)

    def update(self, features, labels, sample_weight=None):
        """Moves the centres toward the batch's features (all replicas' batches).

        Args:
            features: [N, feature_dim] features (any float dtype; no gradient).
            labels: [N], [N, 1] or one-hot [N, num_classes] class labels.
            sample_weight: optional [N] weights (None: all 1).

        Raises:
            ValueError: labels outside the label contract (`tfadv.ops.sparse_labels`).
        """
        labels = sparse_labels(labels, self.num_classes)
        diff = self._gather(labels) - tf.cast(tf.stop_gradient(features), tf.float32)
        weights = None if sample_weight is None else tf.reshape(
            tf.cast(sample_weight, tf.float32), [-1])
        sums, counts = class_sums(diff, labels, self.num_classes, weights=weights,
                                  across_replicas=True)
        delta = sums / (1.0 + counts)[:, None]
        self.centers.assign(self.centers - self.alpha * delta)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, feature_dim=self.feature_dim, alpha=self.alpha)
        return config
