"""Adversarial training losses as plain functions.

The trainers (`tfadv.trainers.AdversarialModel`, `EmbeddingAdversarialModel`)
compute their losses with these functions; a custom training loop can call
them the same way:

    with tf.GradientTape() as tape:
        logits = model(tf.concat([x, x_adv], 0), training=True)
        loss = tfadv.losses.adversarial_loss(y, logits[:n], logits[n:], adv_ratio=0.5)
    grads = tape.gradient(loss, model.trainable_variables)

The scalar losses here are reduced like Keras' compiled losses
(`tfadv.losses.global_batch_mean`): sample weights weight every term and, under
`tf.distribute`, each replica returns its share of the global-batch mean.
"""

from __future__ import annotations

import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.embedding import cosine_similarity
from tfadv.losses.reduction import global_batch_mean


def cross_entropy_loss(labels, logits, sample_weight=None):
    """Softmax cross-entropy, reduced like a compiled Keras loss.

    Args:
        labels: `[N]` / `[N, 1]` integer (or whole-number float) labels, or
            one-hot `[N, C]` (`tfadv.ops.sparse_labels`).
        logits: `[N, C]` logits, C >= 2, any float dtype.
        sample_weight: optional `[N]` or `[N, 1]` weights.

    Returns:
        float32 scalar: `sum_i w_i CE_i / N`, divided by the replicas in sync.

    Raises:
        ValueError: fewer than 2 classes, labels outside the label contract,
            or weights of the wrong shape.
    """
    return global_batch_mean(objectives_lib.cross_entropy(logits, labels), sample_weight)


def _check_weight(name, value, upper=None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if ok and upper is not None:
        ok = value <= upper
    if not ok:
        bound = f"0 <= {name} <= {upper}" if upper is not None else f"{name} >= 0"
        raise ValueError(f"Expected {bound}. Received: {name}={value!r}")
    return float(value)


def _reduced(loss_fn, labels, predictions, sample_weight):
    return tf.cast(loss_fn(labels, predictions, sample_weight), tf.float32)


def adversarial_loss(labels, logits, adversarial_logits, *, adv_ratio=1.0, sample_weight=None,
                     loss_fn=None):
    """Madry et al.'s adversarial training loss, optionally mixed with the clean loss.

    `(1 - adv_ratio) * L(logits) + adv_ratio * L(adversarial_logits)`, with
    `L` the reduced classification loss (Madry et al., "Towards Deep Learning
    Models Resistant to Adversarial Attacks", ICLR 2018; the mix is the
    "balanced" clean/adversarial batch of Goodfellow et al., ICLR 2015). A term
    of weight 0 is not computed, so its logits may be None.

    Args:
        labels: class labels as `cross_entropy_loss` takes them (or whatever
            `loss_fn` takes).
        logits: `[N, C]` predictions on the clean inputs, or None when
            `adv_ratio == 1`.
        adversarial_logits: `[N, C]` predictions on the adversarial inputs,
            or None when `adv_ratio == 0`.
        adv_ratio: weight of the adversarial term, a Python number in [0, 1].
        sample_weight: optional `[N]` or `[N, 1]` weights, passed to `loss_fn`.
        loss_fn: `(labels, predictions, sample_weight) -> scalar`, already
            reduced over the batch (e.g. a `keras.losses.Loss` instance, or a
            Keras model's `compute_loss`); default `cross_entropy_loss`.

    Returns:
        float32 scalar.

    Raises:
        ValueError: adv_ratio outside [0, 1] or not a number; None logits for
            a term of positive weight; what `loss_fn` raises.
    """
    r = _check_weight("adv_ratio", adv_ratio, upper=1.0)
    loss_fn = cross_entropy_loss if loss_fn is None else loss_fn
    if r > 0.0 and adversarial_logits is None:
        raise ValueError(f"adv_ratio={r} needs adversarial_logits.")
    if r < 1.0 and logits is None:
        raise ValueError(f"adv_ratio={r} needs the clean logits.")
    if r == 1.0:
        return _reduced(loss_fn, labels, adversarial_logits, sample_weight)
    clean = _reduced(loss_fn, labels, logits, sample_weight)
    if r == 0.0:
        return clean
    adversarial = _reduced(loss_fn, labels, adversarial_logits, sample_weight)
    return (1.0 - r) * clean + r * adversarial


def trades_loss(labels, logits, adversarial_logits, *, beta=6.0, sample_weight=None,
                loss_fn=None):
    """TRADES: `L(logits) + beta * mean_i KL(softmax(logits_i) || softmax(adversarial_logits_i))`.

    Zhang et al., "Theoretically Principled Trade-off between Robustness and
    Accuracy", ICML 2019. As in the authors' code the clean probabilities in
    the KL are not held constant: the gradient flows through both arguments.
    The adversarial inputs should maximise that KL inside the threat model
    (the attack's objective `tfadv.attacks.objectives.kl_divergence` with the
    clean probabilities as target).

    Args:
        labels: class labels as `cross_entropy_loss` takes them.
        logits: `[N, C]` predictions on the clean inputs.
        adversarial_logits: `[N, C]` predictions on the adversarial inputs.
        beta: weight of the KL term (6.0 in the paper), a Python number >= 0.
        sample_weight: optional `[N]` or `[N, 1]` weights for both terms.
        loss_fn: the natural loss, `(labels, predictions, sample_weight) ->
            scalar`, already reduced; default `cross_entropy_loss`.

    Returns:
        float32 scalar.

    Raises:
        ValueError: beta < 0 or not a number; fewer than 2 classes; what
            `loss_fn` raises.
    """
    beta = _check_weight("beta", beta)
    loss_fn = cross_entropy_loss if loss_fn is None else loss_fn
    natural = _reduced(loss_fn, labels, logits, sample_weight)
    p = tf.nn.softmax(tf.cast(logits, tf.float32))
    kl = tf.cast(objectives_lib.kl_divergence(adversarial_logits, p), tf.float32)
    return natural + beta * global_batch_mean(kl, sample_weight)


def consistency_loss(embeddings, targets):
    """Per-example cosine consistency `1 - cos(embeddings_i, targets_i)`.

    The embedding trainer's TRADES-like term (targets: the clean embeddings
    or a frozen teacher's) and its distillation term (embeddings: the clean
    ones, targets: the teacher's). Gradients flow into both arguments; stop
    them on the targets for a fixed reference.

    Args:
        embeddings: `[N, D]` embeddings (any float dtype; need not be
            normalised).
        targets: `[N, D]` reference embeddings.

    Returns:
        float32 `[N]` in [0, 2]; reduce with `tfadv.losses.global_batch_mean`
        (with sample weights) as the trainers do.
    """
    return 1.0 - cosine_similarity(embeddings, targets)
