"""Ensembles of trained models as one Keras model (seed 000: "train multiple models with
different adversarial training parameters and combine their predictions")."""

from __future__ import annotations

import hashlib
import warnings

import keras
import numpy as np

COMBINE = ("mean_logits", "mean_embedding")


def _shape(model, what):
    shape = getattr(model, what, None)
    if isinstance(shape, list):
        raise ValueError(f"Expected single-input, single-output models. Model {model.name!r} "
                         f"has {len(shape)} {what.split('_')[0]}s.")
    return None if shape is None else tuple(shape[1:])


def _distinct(models):
    """The members, functional copies renamed where two share a name (Keras needs distinct
    layer names; the caller's models are never renamed or changed)."""
    names = [m.name for m in models]
    out = []
    for i, m in enumerate(models):
        if names.count(m.name) == 1:
            out.append(m)
            continue
        try:
            copy = keras.models.clone_model(m)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"Two members are named {m.name!r} and model {i} cannot be cloned to rename it "
                f"({e}). Give the members distinct names.") from e
        copy.set_weights(m.get_weights())
        copy.name = f"member_{i}_{m.name}"
        out.append(copy)
    return out


def _warn_identical(models):
    """Warns when two members hold the same weights (the same model or file twice)."""
    seen = {}
    for i, m in enumerate(models):
        digest = hashlib.sha256()
        for w in m.get_weights():
            digest.update(str(w.shape).encode())
            digest.update(np.ascontiguousarray(w).tobytes())
        first = seen.setdefault(digest.hexdigest(), i)
        if first != i:
            warnings.warn(f"Ensemble members {first} and {i} have identical weights: together "
                          "they add nothing to one of them (the same model or file given "
                          "twice?).", UserWarning, stacklevel=3)


def ensemble(models, combine="mean_logits", name="ensemble"):
    """One Keras model that averages the outputs of several trained models.

    - "mean_logits": the mean of the members' logits (classifiers). The
      ensemble predicts the class of the averaged logits; it is attacked,
      saved, exported and served like one classifier.
    - "mean_embedding": the mean of the members' L2-normalised embeddings,
      normalised again (face embedders): cosine similarity on the ensemble is
      a cosine like each member's.

    Gradients flow through every member, so white-box attacks see the whole
    ensemble; an ensemble that looks robust only because its gradients are
    hard to follow is what AutoAttack's Square part and its flags catch
    (`tfadv.evaluation.autoattack`).

    Args:
        models: two or more Keras models with the same input shape and output
            width (the same input units: [0, 1] digits or 0-255 face pixels).
        combine: "mean_logits" or "mean_embedding".
        name: the ensemble's name.

    Returns:
        A functional `keras.Model`, input like the members', output
        `[N, C]` float32 logits or `[N, D]` unit embeddings; it saves and
        loads with `safe_mode=True`. The members' weights are shared with it
        (not copied), except members cloned because two had one name.

    Raises:
        ValueError: fewer than two models, something that is not a Keras
            model, differing input shapes or output widths, an unknown combine.
    """
    if combine not in COMBINE:
        raise ValueError(f"Expected combine in {COMBINE}. Received: {combine!r}")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"Expected at least two models to ensemble. Received: {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, keras.Model):
            raise ValueError(f"Expected Keras models. Model {i} is a {type(m).__name__}.")
    _warn_identical(models)
    shapes = [(_shape(m, "input_shape"), _shape(m, "output_shape")) for m in models]
    if len(set(shapes)) != 1:
        members = "; ".join(f"model {i} ({m.name!r}): input {shape_in} -> output {shape_out}"
                            for i, (m, (shape_in, shape_out)) in enumerate(zip(models, shapes)))
        raise ValueError(f"Expected members with one input shape and one output shape. "
                         f"Received: {members}.")
    x = keras.Input(shape=shapes[0][0], name="image")
    members = [m(x) for m in _distinct(models)]
    mean = keras.layers.Average(name="mean", dtype="float32")(members)
    if combine == "mean_embedding":
        mean = keras.layers.UnitNormalization(name="embedding", dtype="float32")(mean)
    return keras.Model(x, mean, name=name)
