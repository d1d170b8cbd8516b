"""The Keras internals the trainers rely on, in one place.

The only place tfadv relies on Keras beyond its public API. keras is pinned
below the next minor version (pyproject.toml), and
tests/test_trainer_base.py::test_keras_internals_are_still_there fails
loudly when an upgrade removes or changes one of them.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Private Keras module: one of the two Keras internals listed below.
from keras.src.trainers.compile_utils import MetricsList

UP, DOWN = "up", "down"

# =============================================================================
# Keras internals
#
# The only place tfadv relies on Keras beyond its public API. keras is pinned
# below the next minor version (pyproject.toml), and
# tests/test_trainer_base.py::test_keras_internals_are_still_there fails
# loudly when an upgrade removes or changes one of them:
#
# 1. Metric directions. Keras' monitor callbacks (EarlyStopping,
#    ModelCheckpoint, ReduceLROnPlateau) infer in mode="auto" whether a
#    metric is to be maximised only for metrics held in a
#    `keras.src.trainers.compile_utils.MetricsList` (or the compiled
#    metrics), from the metric's `_direction` attribute
#    (keras/src/callbacks/monitor_callback.py); Keras has no public way to
#    give a custom metric a direction.
# 2. The first build under MultiWorkerMirroredStrategy. Keras 3.15 builds the
#    model and its metrics from the first distributed batch reduced with
#    `strategy.reduce()` (`Trainer._maybe_symbolic_build`), which
#    MultiWorkerMirroredStrategy cannot apply to a tuple of PerReplica
#    values; `_KerasHooks` overrides that method and calls
#    `Trainer._symbolic_build` with this worker's first replica's batch.
# =============================================================================

def directed_mean(name, direction):
    """A `keras.metrics.Mean` that tells Keras' callbacks which way is better.

    Args:
        name: the metric's name (the log key; "val_" + name in validation).
        direction: "up" (higher is better) or "down".

    Returns:
        `keras.metrics.Mean` with Keras' `_direction` set.

    Raises:
        ValueError: another direction.
    """
    if direction not in (UP, DOWN):
        raise ValueError(f'Expected direction "up" or "down". Received: {direction!r}')
    metric = keras.metrics.Mean(name=name)
    metric._direction = direction
    return metric


class MetricGroup(MetricsList):
    """The metrics a trainer reports itself, beyond those given to `compile()`.

    Held in one group so that Keras' monitor callbacks find them (and their
    directions) in `mode="auto"`: `EarlyStopping(monitor="val_robust_accuracy")`
    maximises, `monitor="val_robust_loss"` minimises. `result()` is the dict
    `{name: value}`, which `Model.get_metrics_result` flattens into the logs.

    Args:
        metrics: Keras metrics, each with a `_direction` ("up" or "down").
        name: the group's name.

    Raises:
        ValueError: a metric without a direction, or two with one name.
    """

    def __init__(self, metrics, name="tfadv_metrics"):
        metrics = list(metrics)
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected distinct metric names. Received: {names}")
        for m in metrics:
            if getattr(m, "_direction", None) not in (UP, DOWN):
                raise ValueError(
                    f"Metric {m.name!r} needs a direction ('up' or 'down') for Keras' "
                    "monitor callbacks; build it with tfadv.trainers.base.directed_mean."
                )
        super().__init__(metrics, name=name)

    def result(self):
        return {m.name: m.result() for m in self.metrics}

    def __getitem__(self, name):
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def __contains__(self, name):
        return any(m.name == name for m in self.metrics)

    @property
    def names(self):
        return [m.name for m in self.metrics]


class _KerasHooks(keras.Model):
    """The private `Trainer` methods the trainers override (internal 2 above)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Only shapes matter for the build: under MultiWorkerMirroredStrategy use
        # this worker's first replica's batch instead of a cross-worker reduce.
        strategy = self.distribute_strategy
        if iterator is None or not isinstance(strategy,
                                              tf.distribute.MultiWorkerMirroredStrategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        def first_local(value):
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(first_local, next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)


# =============================================================================
# End of the Keras internals.
# =============================================================================
