"""Feature extractor + linear classifier models (for center loss and centre studies)."""

from __future__ import annotations

import keras

FEATURE_LAYER = "features"
CLASSIFIER_LAYER = "classifier"


def mnist_feature_net(feature_dim=2, num_classes=10, arch="lenetpp", input_shape=(28, 28, 1),
                      name=None) -> keras.Model:
    """A classifier whose penultimate layer is a named feature layer.

    Args:
        feature_dim: dimension of the deep features (2 draws them in the plane).
        arch: "lenetpp" (LeNets++ of Wen et al. 2016: 3 stages of two 5x5
            convolutions with 32/64/128 filters, PReLU, max-pooling, then the
            feature layer) or "small" (two 3x3 convolutions: fast for tests).

    Returns:
        A Keras model mapping images in [0, 1] to logits. Its layer named
        "features" gives the features (`feature_model(model)`), and the
        kernel of the layer "classifier" holds the classifier weights
        [feature_dim, classes].
    """
    if int(feature_dim) < 1:
        raise ValueError(f"Expected feature_dim >= 1. Received: {feature_dim}")
    if arch not in ("lenetpp", "small"):
        raise ValueError(f'Expected arch "lenetpp" or "small". Received: {arch!r}')
    inputs = keras.Input(shape=input_shape, name="image")
    h = inputs
    if arch == "lenetpp":
        for i, filters in enumerate((32, 64, 128)):
            for j in range(2):
                h = keras.layers.Conv2D(filters, 5, padding="same", name=f"conv{i + 1}_{j + 1}")(h)
                h = keras.layers.PReLU(shared_axes=[1, 2], name=f"prelu{i + 1}_{j + 1}")(h)
            h = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{i + 1}")(h)
    else:
        h = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1")(h)
        h = keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(int(feature_dim), name="fc_features")(h)
    features = keras.layers.PReLU(name=FEATURE_LAYER)(h)
    logits = keras.layers.Dense(num_classes, name=CLASSIFIER_LAYER, dtype="float32")(features)
    return keras.Model(inputs, logits, name=name or f"mnist_{arch}_{feature_dim}d")


def _single_input(model):
    # A bare input (not a one-element list) so the derived model accepts a tensor.
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def feature_model(model, layer=FEATURE_LAYER) -> keras.Model:
    """A model sharing `model`'s weights that returns its features."""
    try:
        out = model.get_layer(layer).output
    except ValueError:
        raise ValueError(
            f"Model {model.name!r} has no layer named {layer!r}; build it with "
            "tfadv.models.mnist_feature_net or name its feature layer."
        ) from None
    return keras.Model(_single_input(model), out, name=f"{model.name}_features")


def logits_and_features(model, layer=FEATURE_LAYER) -> keras.Model:
    """A two-output model (logits, features) sharing `model`'s weights."""
    feature_model(model, layer)  # validates the layer name
    return keras.Model(_single_input(model), [model.outputs[0], model.get_layer(layer).output],
                       name=f"{model.name}_logits_features")
