"""Projected gradient descent and its one-step and inverse relatives."""

from __future__ import annotations

import tensorflow as tf

from tfadv.attacks.base import Attack, _check_number, input_gradient
from tfadv.ops import norms

# Loops of at most this many steps are unrolled when traced; longer ones stay a
# tf.while_loop so that graphs (and XLA compile times) stay small.
UNROLL_MAX_STEPS = 10


class PGD(Attack):
    """Projected gradient descent (Madry et al., ICLR 2018).

    Repeats `x <- Proj_{B(x0, eps) ∩ bounds}(x + step_size * dir(grad))`,
    where `dir` is `sign` for Linf and the unit-L2 gradient for L2. With
    `random_start=False` it takes the same steps as cleverhans'
    `projected_gradient_descent(..., rand_init=False)`.

    Args:
        eps: perturbation budget (input units; MNIST in [0, 1]: 0.3 Linf).
        step_size: step per iteration. Defaults to `2.5 * eps / steps`.
        steps: number of gradient steps.
        norm: "inf" or "2".
        random_start: start from a uniform random point of the eps-ball.
        targeted: if True, `y` are target labels and the loss is descended.
        objective: "ce" (default), "margin", "dlr", "kl" or a callable.
        bounds: valid input range, `(0, 1)` by default; None disables.
        unroll: trace the step loop unrolled (True) or as a `tf.while_loop`
            (False). None (default): unrolled up to `UNROLL_MAX_STEPS` steps,
            which lets the graph optimiser see the attack and the training
            step together (0-14% less CPU for PGD-10 training of small
            models, bench/pgd_train.py). Pass False for big models
            (InceptionResNetV1): tracing 10 unrolled gradient passes through
            them takes minutes, far more than the loop overhead it saves.

    Shape:
        x: [N, ...] float in `bounds`; y: [N] int labels. Returns x_adv like x.

    Example:
        >>> attack = PGD(eps=0.3, step_size=0.01, steps=40)
        >>> x_adv = attack(model, x, y)
    """

    name = "pgd"
    # +1: ascend the objective (adversary). InversePGD flips it.
    ascend = True

    def __init__(
        self,
        *,
        eps,
        step_size=None,
        steps=10,
        norm="inf",
        random_start=True,
        targeted=False,
        objective="ce",
        bounds=(0.0, 1.0),
        unroll=None,
    ):
        super().__init__(eps=eps, norm=norm, bounds=bounds, targeted=targeted, objective=objective)
        _check_number("steps", steps, minimum=1, integer=True)
        if unroll is not None and not isinstance(unroll, bool):
            raise ValueError(f"Expected unroll to be None, True or False. Received: {unroll!r}")
        self.unroll = unroll
        self.steps = int(steps)
        if step_size is None:
            step_size = 2.5 * self.eps / self.steps
        _check_number("step_size", step_size, minimum=0)
        self.step_size = float(step_size)
        if not isinstance(random_start, bool):
            raise ValueError(
                f"Expected random_start to be a bool. Received: random_start={random_start!r}"
            )
        self.random_start = random_start

    @property
    def direction(self) -> float:
        """+1.0 if the loop ascends the objective, -1.0 if it descends."""
        up = self.ascend != self.targeted
        return 1.0 if up else -1.0

    def perturb(self, model, x, y, objective, scale):
        eps = tf.constant(self.eps, x.dtype) * scale
        step = tf.constant(self.direction * self.step_size, x.dtype) * scale
        x_adv = x
        if self.random_start and self.eps > 0:
            x_adv = norms.clip_to_bounds(
                x + norms.random_start(tf.shape(x), eps, self.norm, x.dtype), self.bounds
            )

        def body(i, x_adv):
            _, _, grad = input_gradient(model, x_adv, y, objective, direction_only=True)
            x_next = x_adv + step * norms.normalize_gradient(grad, self.norm)
            x_next = norms.clip_to_bounds(x_next, self.bounds)
            return i + 1, self._project(x_next, x, eps)

        if self.unrolled:
            i = tf.constant(0)
            for _ in range(self.steps):
                i, x_adv = body(i, x_adv)
            return x_adv
        _, x_adv = tf.while_loop(
            lambda i, _: i < self.steps, body, [tf.constant(0), x_adv]
        )
        return x_adv

    @property
    def unrolled(self) -> bool:
        """Whether the step loop is traced unrolled (see `unroll`)."""
        if self.unroll is None:
            return self.steps <= UNROLL_MAX_STEPS
        return self.unroll

    def get_config(self):
        config = super().get_config()
        config.update(
            step_size=self.step_size, steps=self.steps, random_start=self.random_start,
            unroll=self.unroll,
        )
        return config


class FGSM(PGD):
    """Fast gradient (sign) method (Goodfellow et al., 2015): one full step.

    Linf: `x + eps * sign(grad)`; L2: `x + eps * grad / ||grad||` (FGM). Clipped
    to `bounds`.

    Args:
        eps: budget; norm: "inf" or "2"; targeted; objective; bounds: as PGD.

    Example:
        >>> x_adv = FGSM(eps=0.1)(model, x, y)
    """

    name = "fgsm"

    def __init__(self, *, eps, norm="inf", targeted=False, objective="ce", bounds=(0.0, 1.0)):
        super().__init__(
            eps=eps,
            step_size=eps,
            steps=1,
            norm=norm,
            random_start=False,
            targeted=targeted,
            objective=objective,
            bounds=bounds,
        )

    def get_config(self):
        config = super().get_config()
        for key in ("step_size", "steps", "random_start", "unroll"):
            config.pop(key)
        return config


class InversePGD(PGD):
    """Inverse adversaries (Dong et al., CVPR 2023): PGD that *minimises* the loss.

    Moves each input, inside a small ball, toward higher likelihood of its
    own label: `x <- Proj(x - step_size * sign(grad L(x, y)))`. The defaults are
    the paper's instance-wise setting for inputs in [0, 1]: eps' = 4/255,
    5 steps of 2/255.

    Args:
        eps, step_size, steps, norm, random_start, objective, bounds: as PGD.

    Example:
        >>> x_inv = InversePGD()(model, x, y)   # loss(x_inv) <= loss(x)
    """

    name = "inverse_pgd"
    ascend = False

    def __init__(
        self,
        *,
        eps=4 / 255,
        step_size=2 / 255,
        steps=5,
        norm="inf",
        random_start=False,
        objective="ce",
        bounds=(0.0, 1.0),
        targeted=False,
        unroll=None,
    ):
        if targeted:
            raise ValueError(
                "InversePGD descends the loss of the label it is given; it has no "
                "targeted mode. Pass the label to move toward as y instead."
            )
        super().__init__(
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            random_start=random_start,
            targeted=False,
            objective=objective,
            bounds=bounds,
            unroll=unroll,
        )

    def get_config(self):
        config = super().get_config()
        config.pop("targeted")
        return config
