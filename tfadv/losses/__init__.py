"""Losses as plain functions, usable in `model.fit` (the trainers call them) and
in a custom training loop.

- `adversarial_loss`, `trades_loss`, `cross_entropy_loss`: scalars reduced
  like Keras' compiled losses (sample weights, global-batch mean under
  `tf.distribute`).
- `center_loss`, `consistency_loss`: per-example `[N]`; reduce them with
  `global_batch_mean(values, sample_weight)`.
"""

from tfadv.losses.adversarial import (adversarial_loss, consistency_loss, cross_entropy_loss,
                                      trades_loss)
from tfadv.losses.center_loss import center_loss
from tfadv.losses.reduction import global_batch_mean, sample_weights, scale_for_replicas

__all__ = [
    "adversarial_loss",
    "center_loss",
    "consistency_loss",
    "cross_entropy_loss",
    "global_batch_mean",
    "sample_weights",
    "scale_for_replicas",
    "trades_loss",
]
