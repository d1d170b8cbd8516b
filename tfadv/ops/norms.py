"""Norm geometry for perturbation attacks, as pure TensorFlow functions.

Every function works per example: the leading axis is the batch, all other
axes are reduced. They keep the dtype of their input and are XLA-compilable.
"""

from __future__ import annotations

import math

import tensorflow as tf

NORMS = ("inf", "2")

# Guards divisions by a norm; the same floor cleverhans uses, so that our PGD
# agrees with theirs to float precision.
_TINY = 1e-12


def canonical_norm(norm) -> str:
    """Returns "inf" or "2" for the spellings users write.

    Accepts `"inf"`, `"linf"`, `np.inf`, `float("inf")`, `2`, `"2"`, `"l2"`.
    """
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in ("inf", "linf", "l_inf", "infinity"):
            return "inf"
        if key in ("2", "l2", "l_2"):
            return "2"
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if math.isinf(norm) and norm > 0:
            return "inf"
        if norm == 2:
            return "2"
    raise ValueError(
        f'Expected norm to be one of "inf" or "2". Received: norm={norm!r}'
    )


def _reduce_axes(x):
    return list(range(1, len(x.shape)))


def _expand(v, x):
    """Reshapes a per-example vector [N] so it broadcasts against x [N, ...]."""
    return tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))


def lp_norm(x, norm):
    """Per-example Lp norm of `x` (shape [N, ...] -> [N])."""
    norm = canonical_norm(norm)
    axes = _reduce_axes(x)
    if norm == "inf":
        return tf.reduce_max(tf.abs(x), axis=axes)
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes))


def normalize_gradient(grad, norm):
    """Steepest-ascent direction of unit norm for a gradient.

    Linf: `sign(grad)`. L2: `grad / ||grad||_2` (zero gradients stay zero).
    """
    norm = canonical_norm(norm)
    if norm == "inf":
        return tf.sign(grad)
    axes = _reduce_axes(grad)
    sq = tf.reduce_sum(tf.square(grad), axis=axes, keepdims=True)
    return grad / tf.sqrt(tf.maximum(sq, tf.cast(_TINY, grad.dtype)))


def project(delta, eps, norm):
    """Projects perturbations onto the eps-ball of the given norm.

    Args:
        delta: perturbations, shape [N, ...].
        eps: radius, a scalar or a per-example vector [N].
        norm: "inf" or "2".

    Returns:
        The projected perturbations, same shape and dtype as `delta`.
    """
    norm = canonical_norm(norm)
    eps = tf.cast(eps, delta.dtype)
    if len(eps.shape) == 1:
        eps = _expand(eps, delta)
    if norm == "inf":
        return tf.clip_by_value(delta, -eps, eps)
    axes = _reduce_axes(delta)
    sq = tf.reduce_sum(tf.square(delta), axis=axes, keepdims=True)
    length = tf.sqrt(tf.maximum(sq, tf.cast(_TINY, delta.dtype)))
    return delta * tf.minimum(tf.ones_like(length), eps / length)


def random_start(shape, eps, norm, dtype=tf.float32):
    """A random perturbation drawn uniformly from the eps-ball.

    Linf: uniform in [-eps, eps] per coordinate. L2: uniform in the ball
    (Gaussian direction, radius eps * U^(1/d)).
    """
    norm = canonical_norm(norm)
    eps = tf.cast(eps, dtype)
    if norm == "inf":
        return tf.random.uniform(shape, -1.0, 1.0, dtype=dtype) * eps
    direction = tf.random.normal(shape, dtype=dtype)
    direction = normalize_gradient(direction, "2")
    dims = tf.cast(tf.reduce_prod(shape[1:]), dtype)
    radius = tf.random.uniform(shape[:1], dtype=dtype) ** (1.0 / dims)
    return direction * _expand(radius, direction) * eps


def clip_to_bounds(x, bounds):
    """Clips `x` to the valid input range `bounds=(low, high)` (None: no clip)."""
    if bounds is None:
        return x
    low, high = bounds
    return tf.clip_by_value(x, tf.cast(low, x.dtype), tf.cast(high, x.dtype))
