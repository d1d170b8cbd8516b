"""`detect`: scan a classifier's training set for poisoned examples."""

from __future__ import annotations

import keras
import numpy as np

from tfadv.evaluation.compiled import in_batches
from tfadv.ops.labels import sparse_labels_np
from tfadv.poisoning.defences import activation_clustering, spectral_signature

__all__ = ["METHODS", "detect", "feature_model"]

# "activations" is the command line's name for activation clustering.
METHODS = {"spectral": spectral_signature, "activation_clustering": activation_clustering,
           "activations": activation_clustering}


def feature_model(model, layer=None) -> keras.Model:
    """The model from the inputs to the features a defence reads.

    Args:
        model: a Keras classifier (logits out).
        layer: a layer name; None: the last feature map with spatial axes
            (flattened), or for a model without one the input of the last
            layer. Measured on the reference CNN (3 digit classes) backdoored
            with a 6% patch: activation clustering found 70 of 72 poisoned
            digits with 2 false flags on its pooled conv features, 42 with 67
            false flags on the penultimate dense layer (spectral: 70 with 11;
            38 with 26): the dense layer has learned the trigger as class 0
            (its centres classify 0.998 of the digits, the poison included).

    Raises:
        ValueError: no such layer, or a model without a single input and output.
    """
    if layer is not None:
        try:
            out = model.get_layer(layer).output
        except ValueError as e:
            names = [lay.name for lay in model.layers]
            raise ValueError(f"No layer {layer!r} in {model.name}. Layers: {names}") from e
    else:
        # (A Sequential model lists no InputLayer: its first layer may be the feature map.)
        spatial = [lay for lay in model.layers[:-1]
                   if not isinstance(lay, keras.layers.InputLayer)
                   and len(lay.output.shape) >= 4]
        out = spatial[-1].output if spatial else model.layers[-1].input
    if isinstance(out, (list, tuple)):
        raise ValueError("Expected a layer with one output tensor; pass layer=NAME.")
    if len(model.inputs) != 1:
        raise ValueError(f"Expected a model with one input. Received {len(model.inputs)}.")
    return keras.Model(model.inputs[0], out)


def detect(model, x, y, method: str = "activation_clustering", layer=None, *,
           batch_size: int = 256, **settings):
    """Per-example suspicion of the training examples (x, y) of a classifier.

    Args:
        model: Keras classifier mapping x to logits.
        x: training inputs [N, ...]; y: their labels, int [N] (or one-hot).
        method: "activation_clustering" (Chen et al. 2018; "activations" as
            on the command line) or "spectral" (Tran et al. 2018).
        layer: the feature layer's name; None: `feature_model`'s choice (the
            last feature map with spatial axes).
        batch_size: examples per forward pass.
        **settings: the method's own (`spectral_signature`,
            `activation_clustering`).

    Returns:
        A `tfadv.poisoning.DetectionResult` with `.scores` (float [N], higher
        = more suspect) and `.flags` (bool [N]).

    Raises:
        ValueError: an unknown method or layer; x and y of different lengths.
    """
    if method not in METHODS:
        raise ValueError(f"Expected method to be one of {sorted(METHODS)}. "
                         f"Received: {method!r}")
    labels = sparse_labels_np(y)
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("Expected training examples to scan. Received none.")
    if len(labels) != len(x):
        raise ValueError(f"Expected one label per example. Received {len(x)} examples and "
                         f"{len(labels)} labels.")
    features = in_batches(feature_model(model, layer), np.asarray(x), batch_size)
    features = features.reshape(len(features), -1)
    return METHODS[method](features, labels, **settings)
