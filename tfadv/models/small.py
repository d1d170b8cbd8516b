"""Small classifiers for MNIST-sized inputs."""

from __future__ import annotations

import keras


def mnist_cnn(input_shape=(28, 28, 1), num_classes=10, name="mnist_cnn") -> keras.Model:
    """The reference MNIST CNN: the benchmark and accuracy-bar model.

    Conv2D(32, 3, relu) -> Conv2D(64, 3, relu) -> MaxPool(2) -> Flatten ->
    Dense(128, relu) -> Dense(num_classes) logits.

    Args:
        input_shape: (H, W, C) of images in [0, 1].
        num_classes: number of logits.

    Returns:
        A functional Keras model mapping float images to logits (float32 even
        under a mixed-precision policy, so losses stay stable).
    """
    inputs = keras.Input(shape=input_shape, name="image")
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(64, 3, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(128, activation="relu", name="fc1")(h)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(h)
    return keras.Model(inputs, logits, name=name)
