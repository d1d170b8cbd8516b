"""Norm geometry for perturbation attacks, as pure TensorFlow functions.

Every function works per example: the leading axis is the batch, all other
axes are reduced. They keep the dtype of their input and are XLA-compilable.
"""

from __future__ import annotations

import math

import tensorflow as tf

NORMS = ("inf", "2")

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


def working_dtype(dtype):
    """The dtype norm arithmetic runs in: float64 stays, every other float is float32.

    Half precision (float16: largest value 65504, smallest normal 6e-5;
    bfloat16: 3 significant digits) cannot hold a sum of squares of a
    gradient or a reciprocal of a tiny norm; float32 with the rescaling
    below can, for any finite input.
    """
    dtype = tf.as_dtype(dtype)
    return tf.float64 if dtype == tf.float64 else tf.float32


def _finite_scaled(x):
    """`x` in the working dtype, divided per example by its largest |entry|.

    NaN entries count as 0; where an example has infinite entries, they
    become +-1 and its finite entries 0 (the infinite directions dominate).

    Returns:
        (u, scale): u [N, ...] with max |u| = 1 per example (or all 0), and
        scale [N] with x = u * scale for finite x (scale 0 for a zero x).
    """
    x = tf.cast(x, working_dtype(x.dtype))
    axes = _reduce_axes(x)
    x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
    inf = tf.math.is_inf(x)
    has_inf = _expand(tf.reduce_any(inf, axis=axes), x)
    x = tf.where(has_inf, tf.where(inf, tf.sign(x), tf.zeros_like(x)), x)
    scale = tf.reduce_max(tf.abs(x), axis=axes)
    safe = _expand(tf.where(scale > 0, scale, tf.ones_like(scale)), x)
    return x / safe, scale


def _l2_of_unit(u):
    """L2 norm per example of a max-abs-scaled u (in [1, sqrt(d)], or 0)."""
    return tf.sqrt(tf.reduce_sum(tf.square(u), axis=_reduce_axes(u)))


def lp_norm(x, norm):
    """Per-example Lp norm of `x` (shape [N, ...] -> [N], dtype of x).

    Computed in float32 (float64 for float64 input) with per-example
    rescaling, so an L2 norm neither overflows nor underflows for any finite
    `x` whose norm the dtype of `x` can hold.
    """
    norm = canonical_norm(norm)
    axes = _reduce_axes(x)
    if norm == "inf":
        return tf.reduce_max(tf.abs(x), axis=axes)
    u, scale = _finite_scaled(x)
    value = tf.cast(_l2_of_unit(u) * scale, x.dtype)
    # A NaN entry makes the norm NaN, an infinite one makes it inf (as for Linf).
    value = tf.where(tf.reduce_any(tf.math.is_inf(x), axis=axes),
                     tf.constant(float("inf"), x.dtype), value)
    return tf.where(tf.reduce_any(tf.math.is_nan(x), axis=axes),
                    tf.constant(float("nan"), x.dtype), value)


def normalize_gradient(grad, norm):
    """Steepest-ascent direction of unit norm for a gradient.

    Linf: `sign(grad)`. L2: `grad / ||grad||_2`. For any dtype and any
    gradient scale (1e-30 or 1e30, float16 or bfloat16): a zero gradient
    gives a zero direction, NaN entries count as zero, infinite entries
    dominate, and the result is always finite.

    Args:
        grad: [N, ...] float tensor.
        norm: "inf" or "2" (any spelling `canonical_norm` accepts).

    Returns:
        The direction, same shape and dtype as `grad`.
    """
    norm = canonical_norm(norm)
    if norm == "inf":
        grad = tf.where(tf.math.is_nan(grad), tf.zeros_like(grad), grad)
        return tf.sign(grad)
    u, _ = _finite_scaled(grad)
    length = _expand(_l2_of_unit(u), u)
    unit = u / tf.where(length > 0, length, tf.ones_like(length))
    return tf.cast(unit, grad.dtype)


def project(delta, eps, norm):
    """Projects perturbations onto the eps-ball of the given norm.

    Args:
        delta: perturbations, shape [N, ...], any float dtype.
        eps: radius, a scalar or a per-example vector [N] (or [N, 1, ...]).
        norm: "inf" or "2".

    Returns:
        The projected perturbations, same shape and dtype as `delta`; for L2
        computed in float32 (float64 for float64 input) with per-example
        rescaling, so that no finite `delta` gives a non-finite result. NaN
        entries become 0 in both norms.
    """
    norm = canonical_norm(norm)
    if norm == "inf":
        eps = tf.cast(eps, delta.dtype)
        if len(eps.shape) == 1:
            eps = _expand(eps, delta)
        delta = tf.where(tf.math.is_nan(delta), tf.zeros_like(delta), delta)
        return tf.clip_by_value(delta, -eps, eps)
    work = working_dtype(delta.dtype)
    eps = tf.cast(eps, work)
    if len(eps.shape) == 1:
        eps = _expand(eps, delta)
    u, scale = _finite_scaled(delta)
    length = _expand(_l2_of_unit(u) * scale, u)
    # Inside the ball (length <= eps): unchanged; outside: scaled onto it.
    inside = length <= eps
    on_sphere = u / tf.where(length > 0, _expand(_l2_of_unit(u), u), tf.ones_like(length)) * eps
    d = tf.cast(delta, work)
    d = tf.where(tf.math.is_nan(d), tf.zeros_like(d), d)
    return tf.cast(tf.where(inside, d, on_sphere), delta.dtype)


def random_start(shape, eps, norm, dtype=tf.float32):
    """A random perturbation drawn uniformly from the eps-ball.

    Linf: uniform in [-eps, eps] per coordinate. L2: uniform in the ball
    (Gaussian direction, radius eps * U^(1/d)). Drawn in float32 (float64
    for float64) and cast to `dtype`.

    Args:
        shape: [N, ...] (a shape tensor or list).
        eps: radius, a scalar or a per-example vector [N] (or [N, 1, ...]).
        norm: "inf" or "2".
        dtype: dtype of the result.
    """
    norm = canonical_norm(norm)
    work = working_dtype(dtype)
    eps = tf.cast(eps, work)
    if len(eps.shape) == 1:  # one radius per example
        eps = tf.reshape(eps, tf.concat([[-1], tf.ones_like(shape[1:])], 0))
    if norm == "inf":
        return tf.cast(tf.random.uniform(shape, -1.0, 1.0, dtype=work) * eps, dtype)
    direction = tf.random.normal(shape, dtype=work)
    direction = normalize_gradient(direction, "2")
    dims = tf.cast(tf.reduce_prod(shape[1:]), work)
    radius = tf.random.uniform(shape[:1], dtype=work) ** (1.0 / dims)
    return tf.cast(direction * _expand(radius, direction) * eps, dtype)


def clip_to_bounds(x, bounds):
    """Clips `x` to the valid input range `bounds=(low, high)` (None: no clip)."""
    if bounds is None:
        return x
    low, high = bounds
    return tf.clip_by_value(x, tf.cast(low, x.dtype), tf.cast(high, x.dtype))
