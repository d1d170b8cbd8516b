"""Learning-rate schedules."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfadv")
class CyclicLR(keras.optimizers.schedules.LearningRateSchedule):
    """Cyclic learning rate (Smith 2017) and one-cycle (Smith & Topin 2019).

    - "triangular": linear from `min_lr` up to `max_lr` and back, period
      `cycle_steps` (default: one cycle over `total_steps`).
    - "one_cycle": linear warm-up from `max_lr / div_factor` to `max_lr` over
      `pct_start` of `total_steps`, then cosine annealing to
      `max_lr / final_div_factor`.

    Args:
        max_lr: peak learning rate (0.01 in the center-loss study).
        total_steps: optimizer steps of the whole run.
        mode: "triangular" or "one_cycle".
        min_lr: floor of the triangular cycle (default max_lr / 10).
        cycle_steps: period of the triangular cycle (default total_steps).
        pct_start, div_factor, final_div_factor: one-cycle shape.
    """

    def __init__(self, max_lr, total_steps, mode="one_cycle", min_lr=None, cycle_steps=None,
                 pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
        if max_lr <= 0 or int(total_steps) < 1:
            raise ValueError(
                f"Expected max_lr > 0 and total_steps >= 1. Received: {max_lr}, {total_steps}"
            )
        if mode not in ("triangular", "one_cycle"):
            raise ValueError(f'Expected mode "triangular" or "one_cycle". Received: {mode!r}')
        if not 0 < pct_start < 1:
            raise ValueError(f"Expected 0 < pct_start < 1. Received: {pct_start}")
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.mode = mode
        self.min_lr = float(min_lr) if min_lr is not None else self.max_lr / 10
        self.cycle_steps = int(cycle_steps) if cycle_steps else self.total_steps
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.mode == "triangular":
            half = self.cycle_steps / 2.0
            pos = ops.mod(step, float(self.cycle_steps))
            frac = ops.where(pos <= half, pos / half, (self.cycle_steps - pos) / half)
            return self.min_lr + (self.max_lr - self.min_lr) * frac
        up = max(1.0, self.pct_start * self.total_steps)
        start = self.max_lr / self.div_factor
        end = self.max_lr / self.final_div_factor
        warm = start + (self.max_lr - start) * step / up
        t = ops.clip((step - up) / max(1.0, self.total_steps - up), 0.0, 1.0)
        anneal = end + (self.max_lr - end) * 0.5 * (1.0 + ops.cos(math.pi * t))
        return ops.where(step < up, warm, anneal)

    def get_config(self):
        return {
            "max_lr": self.max_lr, "total_steps": self.total_steps, "mode": self.mode,
            "min_lr": self.min_lr, "cycle_steps": self.cycle_steps, "pct_start": self.pct_start,
            "div_factor": self.div_factor, "final_div_factor": self.final_div_factor,
        }


def sgd_nesterov(schedule, momentum=0.9, weight_decay=5e-4):
    """SGD with Nesterov momentum and weight decay: the center-loss study's optimiser.

    Keras applies `weight_decay` decoupled (w -= lr * wd * w each step), which
    for SGD equals the L2 penalty's gradient term up to its interaction with
    momentum.
    """
    return keras.optimizers.SGD(learning_rate=schedule, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
