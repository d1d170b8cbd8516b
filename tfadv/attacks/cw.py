"""Carlini & Wagner L2 attack (IEEE S&P 2017)."""

from __future__ import annotations

import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.base import Attack, _check_number, call_model


class CarliniWagnerL2(Attack):
    """Carlini & Wagner's L2 attack: the smallest L2 perturbation that flips the label.

    Minimises `||x' - x||^2 + c * max(z_y - max_{j!=y} z_j + kappa, 0)` over
    `x' = lo + (hi - lo) * (tanh(w) + 1) / 2` with Adam, and binary-searches
    the constant `c` per example. Returns, per example, the closest adversarial
    example found, or `x` where none was found. With `eps` set, perturbations
    larger than `eps` (L2) count as failures and are returned as `x`, so that
    robust accuracy "at eps" is well defined.

    Args:
        eps: optional L2 budget (None: unbounded, the original attack).
        confidence: kappa, the required logit margin.
        learning_rate: Adam step size in tanh space. 0.1 converges within the
            default 100 iterations; the paper's 0.01 needs thousands.
        max_iterations: Adam steps per binary-search step.
        binary_search_steps: searches over `c`.
        initial_const: starting `c`.
        targeted: if True, `y` are target labels.
        bounds: valid input range (required).

    Shape:
        x: [N, ...] in `bounds`; y: [N] int. Returns x_adv like x.

    Example:
        >>> x_adv = CarliniWagnerL2(max_iterations=100)(model, x, y)
    """

    name = "cw"
    uses_eps = False

    def __init__(
        self,
        *,
        eps=None,
        confidence=0.0,
        learning_rate=0.1,
        max_iterations=100,
        binary_search_steps=5,
        initial_const=1e-2,
        targeted=False,
        bounds=(0.0, 1.0),
    ):
        super().__init__(eps=eps, norm="2", bounds=bounds, targeted=targeted, objective="margin")
        if self.bounds is None:
            raise ValueError("CarliniWagnerL2 needs finite bounds for its tanh change of variables.")
        _check_number("confidence", confidence, minimum=0)
        _check_number("learning_rate", learning_rate, minimum=0)
        _check_number("max_iterations", max_iterations, minimum=1, integer=True)
        _check_number("binary_search_steps", binary_search_steps, minimum=1, integer=True)
        _check_number("initial_const", initial_const, minimum=0)
        self.confidence = float(confidence)
        self.learning_rate = float(learning_rate)
        self.max_iterations = int(max_iterations)
        self.binary_search_steps = int(binary_search_steps)
        self.initial_const = float(initial_const)

    def _prepare_target(self, y, outputs0):
        """What `_margin` compares the outputs with (one-hot labels here).

        Raises:
            ValueError: a model with fewer than 2 output classes.
        """
        num_classes = objectives_lib.check_num_classes(outputs0, "C&W margin", 2)
        return tf.one_hot(tf.cast(y, tf.int32), num_classes, dtype=tf.float32)

    def _margin(self, logits, onehot):
        """Positive while the attack has not yet succeeded with the confidence."""
        real = tf.reduce_sum(onehot * logits, axis=-1)
        other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
        if self.targeted:
            return other - real + self.confidence
        return real - other + self.confidence

    def perturb(self, model, x, y, objective, scale):
        del objective  # C&W has its own objective
        dtype = x.dtype
        lo, hi = (tf.constant(b, dtype) for b in self.bounds)
        n = tf.shape(x)[0]
        axes = list(range(1, len(x.shape)))
        unit = (x - lo) / (hi - lo)
        w0 = tf.atanh(tf.clip_by_value(unit * 2 - 1, -0.999999, 0.999999))
        logits0 = tf.cast(call_model(model, x), tf.float32)
        onehot = self._prepare_target(y, logits0)

        def to_x(w):
            return lo + (hi - lo) * (tf.tanh(w) + 1) / 2

        const = tf.fill([n], tf.constant(self.initial_const, tf.float32))
        lower = tf.zeros([n], tf.float32)
        upper = tf.fill([n], tf.constant(1e10, tf.float32))
        best_l2 = tf.fill([n], tf.constant(float("inf"), tf.float32))
        best_x = x
        lr = tf.constant(self.learning_rate, dtype)
        b1, b2, adam_eps = 0.9, 0.999, 1e-8

        for _ in range(self.binary_search_steps):

            def body(t, mod, m, v, best_l2, best_x, success, const=const):
                with tf.GradientTape() as tape:
                    tape.watch(mod)
                    x_new = to_x(w0 + mod)
                    logits = tf.cast(call_model(model, x_new), tf.float32)
                    l2 = tf.reduce_sum(tf.square(tf.cast(x_new - x, tf.float32)), axis=axes)
                    f = tf.maximum(self._margin(logits, onehot), 0.0)
                    loss = tf.reduce_sum(l2 + const * f)
                grad = tape.gradient(loss, mod)
                # Record before the step: x_new is the point this loss was measured at.
                ok = self._margin(logits, onehot) <= 0.0
                improved = ok & (l2 < best_l2)
                best_l2 = tf.where(improved, l2, best_l2)
                mask = tf.reshape(improved, [-1] + [1] * len(axes))
                best_x = tf.where(mask, x_new, best_x)
                success = success | ok
                t1 = tf.cast(t + 1, dtype)
                m = b1 * m + (1 - b1) * grad
                v = b2 * v + (1 - b2) * tf.square(grad)
                m_hat = m / (1 - b1**t1)
                v_hat = v / (1 - b2**t1)
                mod = mod - lr * m_hat / (tf.sqrt(v_hat) + adam_eps)
                return t + 1, mod, m, v, best_l2, best_x, success

            zeros = tf.zeros_like(x)
            _, _, _, _, best_l2, best_x, success = tf.while_loop(
                lambda t, *_: t < self.max_iterations,
                body,
                [tf.constant(0), zeros, zeros, zeros, best_l2, best_x, tf.zeros([n], tf.bool)],
            )
            upper = tf.where(success, tf.minimum(upper, const), upper)
            lower = tf.where(success, lower, tf.maximum(lower, const))
            const = tf.where(
                upper < 1e9, (lower + upper) / 2, tf.where(success, const, const * 10)
            )

        found = tf.math.is_finite(best_l2)
        if self.eps is not None:
            found = found & (tf.sqrt(best_l2) <= self.eps * tf.reshape(tf.cast(scale, tf.float32), [-1]))
        mask = tf.reshape(found, [-1] + [1] * len(axes))
        return tf.where(mask, best_x, x)

    def get_config(self):
        config = super().get_config()
        for key in ("norm", "objective"):
            config.pop(key)
        config.update(
            confidence=self.confidence,
            learning_rate=self.learning_rate,
            max_iterations=self.max_iterations,
            binary_search_steps=self.binary_search_steps,
            initial_const=self.initial_const,
        )
        return config
