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


def madry_cnn(input_shape=(28, 28, 1), num_classes=10, name="madry_cnn") -> keras.Model:
    """Madry et al.'s MNIST CNN (ICLR 2018, "Towards deep learning models resistant to
    adversarial attacks"; their mnist_challenge model), the field's standard MNIST model.

    Conv2D(32, 5, same, relu) -> MaxPool(2) -> Conv2D(64, 5, same, relu) ->
    MaxPool(2) -> Flatten -> Dense(1024, relu) -> Dense(num_classes) logits.
    3.27M parameters.

    Args:
        input_shape: (H, W, C) of images in [0, 1].
        num_classes: number of logits.

    Returns:
        A functional Keras model mapping float images to float32 logits.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    h = keras.layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(1024, activation="relu", name="fc1")(h)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(h)
    return keras.Model(inputs, logits, name=name)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, name="small_cnn") -> keras.Model:
    """TRADES' SmallCNN for MNIST (Zhang et al., ICML 2019; their `small_cnn.py`).

    Two blocks of two Conv2D(3, relu) (32 then 64 filters) each followed by
    MaxPool(2), then Dense(200, relu) -> Dropout(0.5) -> Dense(200, relu) ->
    Dense(num_classes) logits.

    Args:
        input_shape: (H, W, C) of images in [0, 1].
        num_classes: number of logits.

    Returns:
        A functional Keras model mapping float images to float32 logits.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    h = inputs
    for i, filters in enumerate((32, 32, 64, 64)):
        h = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{i + 1}")(h)
        if i % 2:
            h = keras.layers.MaxPooling2D(2, name=f"pool{i // 2 + 1}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(200, activation="relu", name="fc1")(h)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    h = keras.layers.Dense(200, activation="relu", name="fc2")(h)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(h)
    return keras.Model(inputs, logits, name=name)


# The MNIST classifiers by name (`tfadv train mnist --model`).
MNIST_MODELS = {"reference": mnist_cnn, "madry": madry_cnn, "smallcnn": small_cnn}
