"""Attack base class and the one gradient-attack template loop.

Attacks are configured once (keyword-only hyper-parameters, validated) and
then called with tensors: `attack(model, x, y) -> x_adv`. The call is pure
TensorFlow (a `tf.while_loop` over steps), so it runs eagerly, inside a
`tf.function`, inside a Keras `train_step`, and under XLA.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.ops import norms
from tfadv.ops.labels import sparse_labels


def _check_number(name, value, *, minimum=None, allow_none=False, integer=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(value) and (minimum is None or value >= minimum)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"Expected {name} to be {kind}{bound}. Received: {name}={value!r}")


def _check_bounds(bounds):
    if bounds is None:
        return None
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected bounds to be None or a pair (low, high). Received: bounds={bounds!r}"
        ) from None
    if not low < high:
        raise ValueError(f"Expected bounds low < high. Received: bounds={bounds!r}")
    return (low, high)


def call_model(model, x):
    """Calls a model in inference mode (`training=False` for Keras layers)."""
    if isinstance(model, keras.Layer):
        return model(x, training=False)
    return model(x)


def input_gradient(model, x, target, objective, *, direction_only=False):
    """Per-example objective values and their gradient w.r.t. the input.

    Args:
        model: callable mapping x [N, ...] to outputs [N, ...] (one tensor).
        x: inputs; target: what the objective compares the outputs with.
        objective: `(outputs, target) -> loss [N]`.
        direction_only: the caller uses only each example's gradient
            direction (sign or L2-normalised steps). The gradient flowing
            back from the outputs is then rescaled per example by a power of
            two to a largest entry near 1, which changes no direction
            (power-of-two scaling is exact) but keeps a float16 model's
            backward pass from flushing small gradients to zero: without it,
            a confident `mixed_float16` classifier shows exactly-zero input
            gradients for many examples and gradient attacks silently fail.

    Returns:
        (loss [N] float32 (float64 for float64 outputs), outputs, gradient
        with the shape and dtype of x;
        with `direction_only`, each example's gradient times a positive
        power of two).

    Raises:
        ValueError: the outputs do not depend on the input.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = call_model(model, x)
        if direction_only and tf.is_tensor(outputs) and outputs.dtype.is_floating:
            # The loss gradient at the outputs is taken in float32 (float64 for
            # float64), not in a float16 output's own dtype, where a confident
            # softmax's gradient is already flushed to zero.
            with tf.GradientTape() as inner:
                wide = tf.cast(outputs, norms.working_dtype(outputs.dtype))
                inner.watch(wide)
                loss = objective(wide, target)
            upstream = inner.gradient(loss, wide)
        else:
            upstream = None
            loss = objective(outputs, target)
    if upstream is None:
        grad = tape.gradient(loss, x)
    else:
        up = tf.where(tf.math.is_finite(upstream), upstream, tf.zeros_like(upstream))
        axes = list(range(1, len(up.shape)))
        largest = tf.reduce_max(tf.abs(up), axis=axes, keepdims=True)
        exponent = tf.where(largest > 0,
                            tf.round(tf.math.log(largest) / tf.cast(math.log(2.0), up.dtype)),
                            tf.zeros_like(largest))
        up = up * tf.pow(tf.cast(2.0, up.dtype), -exponent)
        grad = tape.gradient(outputs, x, output_gradients=tf.cast(up, outputs.dtype))
    if grad is None:
        raise ValueError(
            "The model's output does not depend on its input (gradient is None). "
            "Attacks need a differentiable model that maps x to logits or embeddings."
        )
    return loss, outputs, grad


class Attack:
    """Base class: hold validated hyper-parameters, craft `x_adv` when called.

    Subclasses implement `perturb(model, x, target, objective, scale)` (scale:
    scalar tensor multiplying eps and step sizes) and list their
    constructor arguments in `get_config`.

    Args:
        eps: radius of the threat model, in the units of the model's input.
        norm: "inf" or "2".
        bounds: valid input range `(low, high)`, or None for no clipping.
        targeted: if True, `y` holds target labels to move toward.
        objective: name or callable `(outputs, target) -> loss [N]`.
    """

    name = "attack"
    uses_eps = True
    # True for score-based searches that only call the model's forward pass
    # (eagerly, on NumPy batches): evaluators then call them directly instead
    # of tracing them into a compiled function.
    black_box = False

    def __init__(self, *, eps, norm="inf", bounds=(0.0, 1.0), targeted=False, objective="ce"):
        if self.uses_eps:
            _check_number("eps", eps, minimum=0)
        else:
            _check_number("eps", eps, minimum=0, allow_none=True)
        self.eps = None if eps is None else float(eps)
        self.norm = norms.canonical_norm(norm)
        self.bounds = _check_bounds(bounds)
        if (self.eps is not None and self.norm == "inf" and self.bounds is not None
                and self.eps > self.bounds[1] - self.bounds[0]):
            warnings.warn(
                f"eps={self.eps:g} (Linf) is larger than the whole input range {self.bounds}: "
                "every input in bounds is inside the ball. Is eps in the wrong units (pixels "
                "for inputs in [0, 1])? Pass eps in the units of `bounds`.", UserWarning,
                stacklevel=2)
        if not isinstance(targeted, bool):
            raise ValueError(f"Expected targeted to be a bool. Received: targeted={targeted!r}")
        self.targeted = targeted
        objectives_lib.get(objective)  # validates the name early
        self.objective = objective

    # -- calling -----------------------------------------------------------
    def __call__(self, model, x, y, *, eps=None, objective=None):
        """Crafts adversarial examples.

        Args:
            model: a callable (usually a Keras model) mapping x to outputs.
            x: inputs, float tensor [N, ...] inside `bounds`. float16 and
                bfloat16 inputs are attacked in float32 (the norm geometry
                cannot be done in half precision) and returned in their dtype.
            y: class labels (true labels, or targets when `targeted=True`)
                as `[N]` or `[N, 1]` integers or whole-number floats, or
                one-hot `[N, C]` (`tfadv.ops.sparse_labels`); or, for
                objectives that take another target (`"kl"`: probabilities
                [N, C]; `"cosine_distance"`: embeddings [N, D]), that target.
            eps: optional budget for this call, in the units of x: a float,
                a scalar tensor (e.g. a variable a warm-up schedule ramps) or
                a per-example tensor [N]. The step size scales with it
                (`step_size * eps / self.eps`), so the attack keeps its shape
                at every budget. Pass a tensor inside a `tf.function`: one
                trace then serves every budget (a robustness curve is one
                compiled function over a list of budgets). None: `self.eps`.
            objective: overrides the configured objective for this call.

        Returns:
            `x_adv`, same shape and dtype as `x`, with no gradient attached,
            always finite and never outside the eps-ball around the given `x`.

        Raises:
            ValueError: x is not floating; x lies outside `bounds` (eagerly;
                inside a `tf.function` the same message comes as an
                `InvalidArgumentError` from a `tf.debugging` assertion);
                labels outside the label contract; an objective that needs
                more classes than the model has (e.g. DLR with 2 classes);
                a per-call `eps` on an attack built without a positive eps,
                or a negative or non-finite one.
        """
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise ValueError(
                f"Expected x to be a floating tensor (cast images to float32 first). "
                f"Received dtype={x.dtype.name}"
            )
        in_dtype = x.dtype
        x = tf.cast(x, norms.working_dtype(in_dtype))
        objective = objectives_lib.get(self.objective if objective is None else objective)
        y = self.prepare_target(y, objective)
        x = self._assert_in_bounds(x)
        scale = self._budget_scale(eps, x)
        x_adv = self.perturb(model, x, y, objective, scale)
        if self.eps is not None:
            # A no-op for x inside bounds; keeps x_adv in the ball where the
            # bounds check cannot run (XLA drops assertions).
            x_adv = x + norms.project(x_adv - x, tf.constant(self.eps, x.dtype) * scale,
                                      self.norm)
        return tf.stop_gradient(tf.cast(x_adv, in_dtype))

    def _budget_scale(self, eps, x):
        """The per-call budget as a multiple of `self.eps`, broadcasting against x."""
        if eps is None:
            return tf.constant(1.0, x.dtype)
        if self.eps is None or self.eps <= 0:
            raise ValueError(
                f"{type(self).__name__} was built with eps={self.eps!r}; a per-call eps scales "
                f"the configured budget and step size, so build the attack with a positive eps "
                f"(e.g. the largest budget you will pass).")
        e = tf.cast(eps, x.dtype)
        if e.shape.rank == 1:
            e = tf.reshape(e, tf.concat([[-1], tf.ones([tf.rank(x) - 1], tf.int32)], 0))
        elif e.shape.rank not in (0, None) and e.shape.rank != x.shape.rank:
            raise ValueError(f"Expected eps to be a scalar or a per-example [N] tensor. "
                             f"Received shape {e.shape}")
        ok = tf.reduce_all(tf.math.is_finite(e) & (e >= 0))
        if tf.executing_eagerly():
            if not bool(ok):
                raise ValueError(f"Expected eps to be finite and >= 0. Received: eps={eps!r}")
        else:
            with tf.control_dependencies([tf.debugging.Assert(ok, ["eps must be finite and >= 0"])]):
                e = tf.identity(e)
        return e / tf.constant(self.eps, x.dtype)

    def prepare_target(self, y, objective):
        """The target the objective receives: `[N]` int64 labels for label objectives.

        Raises:
            ValueError: labels outside the label contract.
        """
        if objectives_lib.targets_labels(objective):
            return sparse_labels(y)
        return tf.convert_to_tensor(y)

    def check_bounds(self, x):
        """Raises a ValueError if NumPy/eager `x` lies outside this attack's bounds.

        Raises:
            ValueError: naming the observed range, the bounds and what to pass.
        """
        if self.bounds is None:
            return
        x = np.asarray(x)
        if x.size == 0:
            return
        low, high = float(np.min(x)), float(np.max(x))
        if not (low >= self.bounds[0] - self._bounds_tol and high <= self.bounds[1] + self._bounds_tol):
            raise ValueError(self._bounds_message(f"[{low:.4g}, {high:.4g}]"))

    @property
    def _bounds_tol(self):
        return 1e-4 * (self.bounds[1] - self.bounds[0])

    def _bounds_message(self, observed):
        low, high = self.bounds
        hint = ""
        if high <= 1.0:
            hint = (" If x holds raw 0-255 pixels, pass bounds=(0, 255) and eps in pixel "
                    "units (8 for 8/255), or divide x by 255.")
        where = f"values in {observed}" if observed else "values (min and max below)"
        return (f"{type(self).__name__}: x has {where} outside the attack bounds="
                f"{self.bounds}. Attacks clip to the bounds, which would move x "
                f"far outside the eps-ball.{hint} Pass the bounds of your input units, or "
                f"bounds=None to disable clipping.")

    def _assert_in_bounds(self, x):
        if self.bounds is None:
            return x
        low = tf.reduce_min(x)
        high = tf.reduce_max(x)
        tol = self._bounds_tol
        ok = tf.logical_or(
            tf.equal(tf.size(x), 0),
            tf.logical_and(low >= self.bounds[0] - tol, high <= self.bounds[1] + tol))
        if tf.executing_eagerly():
            if not bool(ok):
                raise ValueError(self._bounds_message(
                    f"[{float(low):.4g}, {float(high):.4g}]"))
            return x
        check = tf.debugging.Assert(ok, [self._bounds_message(None), low, high])
        with tf.control_dependencies([check]):
            return tf.identity(x)

    def perturb(self, model, x, y, objective, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared geometry ---------------------------------------------------
    def _project(self, x_adv, x, eps):
        """Back into the eps-ball around x and into the valid input range."""
        delta = norms.project(x_adv - x, eps, self.norm)
        return norms.clip_to_bounds(x + delta, self.bounds)

    # -- config ------------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "bounds": None if self.bounds is None else list(self.bounds),
            "targeted": self.targeted,
            "objective": objectives_lib.name_of(self.objective),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("bounds") is not None:
            config["bounds"] = tuple(config["bounds"])
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def _identity(self):
        """What makes two attacks the same attack: class, config and the objective.

        A callable objective that is not registered is in the config only by
        its `__name__`; two different functions of the same name are two
        different attacks, so the function itself is part of the identity.
        """
        objective = self.objective
        registered = isinstance(objective, str) or objectives_lib.is_registered(objective)
        return (type(self), repr(self.get_config()), None if registered else objective)

    def __eq__(self, other):
        return isinstance(other, Attack) and self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())
