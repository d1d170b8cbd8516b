"""A cosine classifier head for L2-normalised embeddings."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfadv")
class CosineClassifier(keras.layers.Layer):
    """Logits `scale * cos(embedding, w_j)` for class weights `w_j`.

    Args:
        num_classes: classes.
        scale: logit scale (a cosine in [-1, 1] times 16 gives a usable softmax).

    Shape:
        [N, D] -> [N, num_classes] float32.
    """

    def __init__(self, num_classes, scale=16.0, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"Expected num_classes >= 1. Received: {num_classes}")
        self.num_classes = int(num_classes)
        self.scale = float(scale)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.num_classes),
                                      initializer="glorot_uniform")

    def call(self, inputs):
        e = tf.math.l2_normalize(tf.cast(inputs, tf.float32), axis=-1)
        w = tf.math.l2_normalize(tf.cast(self.kernel, tf.float32), axis=0)
        return self.scale * tf.matmul(e, w)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, scale=self.scale)
        return config
