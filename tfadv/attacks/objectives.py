"""Attack objectives: per-example losses an attack ascends (or descends).

An objective is a callable `objective(outputs, target) -> loss [N]`, where
`outputs` is what the model returns for the perturbed input and `target` is
what the attack was called with (labels, probabilities or embeddings). All
objectives compute in float32 whatever the model's compute dtype (float64 for float64
outputs).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from tfadv.ops.labels import sparse_labels

Objective = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# What an objective's `target` is. Attacks put class labels through the one
# label contract (`tfadv.ops.labels.sparse_labels`) for "labels" objectives
# and pass every other target (probabilities, embeddings) unchanged.
TARGET_LABELS = "labels"
TARGET_OTHER = "other"


def _f32(t):
    """`t` in float32, or float64 when it is float64 (a float64 model's confident
    logits have gradients far below float32's smallest value)."""
    t = tf.convert_to_tensor(t)
    return t if t.dtype == tf.float64 else tf.cast(t, tf.float32)


def check_num_classes(logits, objective, minimum, instead=None):
    """Static number of classes C of `logits` [N, C]; a ValueError when C < `minimum`.

    Raises:
        ValueError: fewer than `minimum` classes.
    """
    return _num_classes(logits, objective, minimum, _SINGLE_LOGIT if instead is None else instead)


def _num_classes(logits, objective, minimum, instead):
    """Static number of classes of `logits`, checked against what `objective` needs.

    Raises:
        ValueError: fewer than `minimum` classes (raised when the attack is
            called or traced, before any gradient is taken).
    """
    num_classes = logits.shape[-1]
    if num_classes is not None and int(num_classes) < minimum:
        raise ValueError(
            f"The {objective} objective needs a model with at least {minimum} output classes "
            f"(logits [N, C] with C >= {minimum}); this model outputs {int(num_classes)}. "
            f"{instead}"
        )
    return num_classes


_SINGLE_LOGIT = (
    "For a binary classifier with one logit z, attack the two-class model with logits "
    "[0, z] (e.g. keras.layers.Lambda(lambda z: tf.concat([tf.zeros_like(z), z], -1)))."
)


def targets_labels(objective) -> bool:
    """Whether `objective` (a name or callable) takes class labels as its target."""
    fn = get(objective)
    return getattr(fn, "target_kind", TARGET_OTHER) == TARGET_LABELS


def cross_entropy(logits, target):
    """Softmax cross-entropy per example.

    Args:
        logits: [N, C] with C >= 2.
        target: class labels in any format of the label contract ([N] or
            [N, 1] integers or whole-number floats, or one-hot [N, C]); a
            float [N, C] that is not one-hot is read as a distribution
            (soft labels) when this function is called directly. Attacks
            pass `argmax` labels; for soft targets use `kl_divergence`.

    Returns:
        float32 [N] (float64 for float64 logits).

    Raises:
        ValueError: fewer than 2 classes, or labels outside the contract.
    """
    logits = _f32(logits)
    num_classes = _num_classes(logits, "cross-entropy", 2, _SINGLE_LOGIT)
    target = tf.convert_to_tensor(target)
    if (target.dtype.is_floating and target.shape.rank == 2 and target.shape[-1] != 1
            and target.shape[-1] == num_classes):
        return tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(target, logits.dtype),
                                                       logits=logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=sparse_labels(target, num_classes), logits=logits
    )


def margin(logits, target):
    """Carlini-Wagner margin: best other logit minus the target's logit.

    Ascending it makes the model misclassify; descending it (targeted attacks)
    makes the target class win. Unlike cross-entropy it does not saturate, so
    it is the objective to try when cross-entropy gradients vanish.

    Args:
        logits: [N, C] with C >= 2; target: class labels (label contract).

    Returns:
        float32 [N] (float64 for float64 logits).

    Raises:
        ValueError: fewer than 2 classes.
    """
    logits = _f32(logits)
    num_classes = _num_classes(logits, "margin", 2, _SINGLE_LOGIT)
    labels = sparse_labels(target, num_classes)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
    return other - true_logit


def kl_divergence(logits, target_probs):
    """KL(target_probs || softmax(logits)) per example: the TRADES inner objective.

    Args:
        logits: [N, C] with C >= 2; target_probs: [N, C] probabilities.

    Returns:
        float32 [N] (float64 for float64 logits).

    Raises:
        ValueError: fewer than 2 classes (the softmax of one logit is constant).
    """
    logits = _f32(logits)
    _num_classes(logits, "KL", 2, _SINGLE_LOGIT)
    p = tf.cast(target_probs, logits.dtype)
    log_q = tf.nn.log_softmax(logits, axis=-1)
    log_p = tf.math.log(tf.maximum(p, 1e-12))
    return tf.reduce_sum(p * (log_p - log_q), axis=-1)


def dlr(logits, target):
    """Difference-of-logits-ratio loss of Croce & Hein (2020), untargeted.

    `(max_{j != y} z_j - z_y) / (z_pi1 - z_pi3)`, with z_pi the sorted
    logits. Scale invariant: it cannot be masked by multiplying the logits.

    Args:
        logits: [N, C] with C >= 3 (the denominator needs a third logit);
        target: class labels (label contract).

    Returns:
        float32 [N] (float64 for float64 logits).

    Raises:
        ValueError: fewer than 3 classes. For 2 classes DLR is not defined;
            `margin` is its numerator (and for 2 classes equals the
            cross-entropy's ordering), so use objective="margin" or "ce".
    """
    logits = _f32(logits)
    num_classes = _num_classes(
        logits, "DLR", 3,
        'For 2 classes use objective="margin" (the DLR numerator) or "ce"; both give '
        "the same adversarial direction for a two-class model.")
    labels = sparse_labels(target, num_classes)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")
    best_other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
    denom = sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12
    return (best_other - true_logit) / denom


for _fn in (cross_entropy, margin, dlr):
    _fn.target_kind = TARGET_LABELS

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


def is_registered(objective) -> bool:
    """Whether `objective` (a callable) is one of the registered objectives."""
    return any(fn is objective for fn in _OBJECTIVES.values())


def name_of(objective) -> str:
    """The registered name of an objective (for configs), or its __name__."""
    for key, fn in _OBJECTIVES.items():
        if fn is objective or key == objective:
            return key
    return getattr(objective, "__name__", repr(objective))
