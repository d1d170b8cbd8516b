"""Attack base class and the one gradient-attack template loop.

Attacks are configured once (keyword-only hyper-parameters, validated) and
then called with tensors: `attack(model, x, y) -> x_adv`. The call is pure
TensorFlow (a `tf.while_loop` over steps), so it runs eagerly, inside a
`tf.function`, inside a Keras `train_step`, and under XLA.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.ops import norms


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


def input_gradient(model, x, target, objective):
    """Per-example objective values and their gradient w.r.t. the input.

    Returns:
        (loss [N] float32, outputs, gradient with the shape and dtype of x).
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = call_model(model, x)
        loss = objective(outputs, target)
    grad = tape.gradient(loss, x)
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

    def __init__(self, *, eps, norm="inf", bounds=(0.0, 1.0), targeted=False, objective="ce"):
        if self.uses_eps:
            _check_number("eps", eps, minimum=0)
        else:
            _check_number("eps", eps, minimum=0, allow_none=True)
        self.eps = None if eps is None else float(eps)
        self.norm = norms.canonical_norm(norm)
        self.bounds = _check_bounds(bounds)
        if not isinstance(targeted, bool):
            raise ValueError(f"Expected targeted to be a bool. Received: targeted={targeted!r}")
        self.targeted = targeted
        objectives_lib.get(objective)  # validates the name early
        self.objective = objective

    # -- calling -----------------------------------------------------------
    def __call__(self, model, x, y, *, objective=None, eps_scale=None):
        """Crafts adversarial examples.

        Args:
            model: a callable (usually a Keras model) mapping x to outputs.
            x: inputs, float tensor [N, ...] inside `bounds`.
            y: labels [N] (true labels, or targets when `targeted=True`), or
                whatever target the objective expects (probabilities,
                embeddings).
            objective: overrides the configured objective for this call.
            eps_scale: optional scalar (float or tensor, e.g. a variable a
                training schedule ramps from 0 to 1) multiplying the budget
                and the step size for this call.

        Returns:
            `x_adv`, same shape and dtype as `x`, with no gradient attached.
        """
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise ValueError(
                f"Expected x to be a floating tensor (cast images to float32 first). "
                f"Received dtype={x.dtype.name}"
            )
        y = tf.convert_to_tensor(y)
        objective = objectives_lib.get(self.objective if objective is None else objective)
        scale = tf.constant(1.0, x.dtype) if eps_scale is None else tf.cast(eps_scale, x.dtype)
        x_adv = self.perturb(model, x, y, objective, scale)
        return tf.stop_gradient(x_adv)

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

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(self)))
