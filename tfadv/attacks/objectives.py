"""Attack objectives: per-example losses an attack ascends (or descends).

An objective is a callable `objective(outputs, target) -> loss [N]`, where
`outputs` is what the model returns for the perturbed input and `target` is
what the attack was called with (labels, probabilities or embeddings). All
objectives compute in float32 whatever the model's compute dtype.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

Objective = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _f32(t):
    return tf.cast(t, tf.float32)


def cross_entropy(logits, target):
    """Softmax cross-entropy per example.

    `target` is either integer labels [N] or a distribution [N, C]
    (probabilities or one-hot).
    """
    logits = _f32(logits)
    target = tf.convert_to_tensor(target)
    if target.dtype.is_integer or len(target.shape) == len(logits.shape) - 1:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(target, tf.int64), logits=logits
        )
    return tf.nn.softmax_cross_entropy_with_logits(labels=_f32(target), logits=logits)


def margin(logits, target):
    """Carlini-Wagner margin: best other logit minus the target's logit.

    Ascending it makes the model misclassify; descending it (targeted attacks)
    makes the target class win. Unlike cross-entropy it does not saturate, so
    it is the objective to try when cross-entropy gradients vanish.
    """
    logits = _f32(logits)
    num_classes = logits.shape[-1]
    onehot = tf.one_hot(tf.cast(target, tf.int32), num_classes, dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
    return other - true_logit


def kl_divergence(logits, target_probs):
    """KL(target_probs || softmax(logits)) per example: the TRADES inner objective."""
    logits = _f32(logits)
    p = _f32(target_probs)
    log_q = tf.nn.log_softmax(logits, axis=-1)
    log_p = tf.math.log(tf.maximum(p, 1e-12))
    return tf.reduce_sum(p * (log_p - log_q), axis=-1)


def dlr(logits, target):
    """Difference-of-logits-ratio loss of Croce & Hein (2020), untargeted.

    Scale invariant: it cannot be masked by multiplying the logits.
    """
    logits = _f32(logits)
    num_classes = logits.shape[-1]
    onehot = tf.one_hot(tf.cast(target, tf.int32), num_classes, dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")
    best_other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
    denom = sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12
    return (best_other - true_logit) / denom


_OBJECTIVES = {
    "ce": cross_entropy,
    "cross_entropy": cross_entropy,
    "margin": margin,
    "cw": margin,
    "kl": kl_divergence,
    "dlr": dlr,
}


def get(objective) -> Objective:
    """Resolves an objective name (or returns a callable unchanged)."""
    if callable(objective):
        return objective
    if isinstance(objective, str) and objective.lower() in _OBJECTIVES:
        return _OBJECTIVES[objective.lower()]
    raise ValueError(
        f"Unknown objective {objective!r}. Expected a callable "
        f"(outputs, target) -> per-example loss, or one of {sorted(_OBJECTIVES)}."
    )


def register(name: str, fn: Objective) -> None:
    """Registers an objective under `name` so attacks can refer to it by string."""
    if not callable(fn):
        raise ValueError(f"Expected a callable objective. Received: {fn!r}")
    _OBJECTIVES[name.lower()] = fn


def name_of(objective) -> str:
    """The registered name of an objective (for configs), or its __name__."""
    for key, fn in _OBJECTIVES.items():
        if fn is objective or key == objective:
            return key
    return getattr(objective, "__name__", repr(objective))
