"""The trainer base: the Keras plumbing both adversarial trainers share.

`TrainerBase` is a `keras.Model` that wraps the network being trained and owns
everything a min-max training step needs besides the loss itself:

- unpacking `(x, y, sample_weight)` (and `class_weight`, which `fit` turns
  into sample weights), the labels in tfadv's label contract;
- the optimizer step: loss scaling under mixed precision
  (`optimizer.scale_loss`; a `LossScaleOptimizer` unscales the gradients),
  one overflow decision for all replicas (`apply_gradients`);
- the replica convention: every loss term is this replica's share of the
  global-batch mean (`tfadv.losses.global_batch_mean`), the logged loss is
  the global one (`track_loss`);
- the warm-up budget `eps_fraction` (ramped by `EpsilonWarmup`) and
  `_budget()`, the training attack's per-call budget;
- the metric trackers (`loss` plus each trainer's own, with their
  directions for Keras' monitor callbacks), `metrics` and their reset, and
  which metrics each phase logs;
- `call` / `build` / `get_config` / `from_config`.

A subclass implements its loss and its metrics through five hooks:
`prepare_batch` (the inner maximisation, before the gradient tape),
`compute_adversarial_loss` (the outer loss, under the tape),
`after_train_step` (state updates such as class centres, and metrics),
`evaluate_batch` (validation) and `silent_metrics` (what a phase never
updates). The loss formulas themselves are the plain functions of
`tfadv.losses`.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

# Private Keras module: one of the two Keras internals listed in the
# "Keras internals" section below.
from keras.src.trainers.compile_utils import MetricsList

from tfadv.attacks.registry import deserialize, serialize
from tfadv.losses.reduction import sample_weights, unscale_for_replicas
from tfadv.ops.labels import sparse_labels

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


def track_loss(tracker, loss, batch_size):
    """Records a step's loss the way Keras' own `train_step` does.

    The loss a replica computes is its share (divided by the replicas in
    sync); the tracker records it times the replicas, weighted by the
    replica's batch size, so that the logged loss is the global-batch loss
    and an empty replica counts for nothing.
    """
    tracker.update_state(unscale_for_replicas(tf.cast(loss, tf.float32)),
                         sample_weight=batch_size)


def for_strategy(strategy, logs):
    """Step logs in a form Keras can reduce across workers.

    Keras 3.15 reduces step outputs across workers with reduce(MEAN, axis=0),
    which fails on scalars (tensorflow/tensorflow#72388). Rank-1 logs reduce
    to the same scalars.
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs


def apply_gradients(optimizer, grads, variables):
    """`optimizer.apply(grads, variables)` with one loss-scaling decision for all replicas.

    Keras 3's `LossScaleOptimizer` (TensorFlow backend, `_tf_apply`) decides
    whether a step is finite from replica 0's local gradients, before the
    inner optimizer all-reduces them: when only another replica's scaled
    float16 gradients overflow, it applies the step and the all-reduced inf
    turns every weight into NaN, without lowering the scale. Here the
    replicas first all-reduce one flag; when any replica's gradients are
    non-finite, every replica's gradients are made non-finite, so the
    optimizer skips the step and halves its scale on all replicas alike, as
    on one device (and where a strategy needs no merge call and each replica
    decides from its own gradients, all replicas decide the same). Without a
    `LossScaleOptimizer` or with one replica this is `optimizer.apply`
    unchanged.

    Args:
        optimizer: the compiled optimizer (`model.optimizer`).
        grads: this replica's gradients of the (scaled) loss; None entries
            are passed through.
        variables: the variables they belong to.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            grads = _nonfinite_if_any_replica_is(context, grads)
    optimizer.apply(grads, variables)


def _values(grad):
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def _nonfinite_if_any_replica_is(context, grads):
    present = [_values(g) for g in grads if g is not None]
    if not present:
        return grads
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in present]))
    nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                   1.0 - tf.cast(finite, tf.float32))
    # Adding 0 keeps the gradients; adding NaN marks the step as overflowed.
    poison = tf.where(nonfinite > 0.0, float("nan"), 0.0)

    def mark(g):
        if g is None:
            return None
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(g.values + tf.cast(poison, g.values.dtype), g.indices,
                                    g.dense_shape)
        return g + tf.cast(poison, g.dtype)

    return [mark(g) for g in grads]


class Batch(NamedTuple):
    """One step's data as the hooks see it.

    Attributes:
        x: the inputs.
        y: the targets as given (what `compile()`'s loss and metrics get).
        sample_weight: the weights as given (None, `[N]` or `[N, 1]`).
        labels: `[N]` int64 class labels (`tfadv.ops.sparse_labels`).
        weights: float32 `[N]` sample weights, or None.
        size: this replica's batch size (scalar int32 tensor).
    """

    x: object
    y: object
    sample_weight: object
    labels: object
    weights: object
    size: object


def _as_attack(value):
    """An Attack, its serialised dict (`tfadv.attacks.serialize`) or None -> Attack or None."""
    return None if value is None else deserialize(value)


def _serialize_models(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [keras.saving.serialize_keras_object(m) for m in value]
    return keras.saving.serialize_keras_object(value)


def _deserialize_models(value, custom_objects):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [keras.saving.deserialize_keras_object(m, custom_objects=custom_objects)
                for m in value]
    return keras.saving.deserialize_keras_object(value, custom_objects=custom_objects)


class TrainerBase(_KerasHooks):
    """Base of the adversarial trainers: a `keras.Model` wrapping the network it trains.

    `fit` runs `train_step`: the subclass's `prepare_batch` (the inner
    maximisation, outside the gradient tape), its `compute_adversarial_loss`
    under the tape, the optimizer step (loss scaled under mixed precision,
    one overflow decision for all replicas), then `after_train_step`.
    `evaluate` runs `test_step` with the subclass's `evaluate_batch`. The
    logged `loss` is the global-batch loss either way.

    Subclasses set the attribute holding the wrapped network (the `network`
    property names it), call `_set_metrics` with their own metrics and
    `_built_if_network_is` at the end of `__init__`, and list in
    `_model_args` the constructor arguments that are Keras models (they are
    serialised with their config).

    Args:
        attack: the training attack (a tfadv `Attack` or its serialised dict),
            or None.
        eval_attack: the validation attack, or None.
        num_classes: classes of the labels (one-hot rows of another width are
            rejected), or None.
        **kwargs: `keras.Model` arguments (name, dtype, ...).

    Raises:
        ValueError: an attack that is neither a tfadv Attack nor its
            serialised dict.
    """

    _model_args: tuple = ()

    def __init__(self, *, attack=None, eval_attack=None, num_classes=None, **kwargs):
        super().__init__(**kwargs)
        self.attack = _as_attack(attack)
        self.eval_attack = _as_attack(eval_attack)
        self.num_classes = None if num_classes is None else int(num_classes)
        # Fraction of the training attack's budget in use; EpsilonWarmup ramps it.
        self.eps_fraction = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="eps_fraction", dtype="float32"
        )

    # -- structure ---------------------------------------------------------
    @property
    def network(self):
        """The wrapped network: what is trained, saved and deployed."""
        raise NotImplementedError

    def build_heads(self):
        """Builds layers of the trainer's own that depend on the network's outputs."""

    def _built_if_network_is(self):
        # The trainer is built whenever its network is, so that saving,
        # ModelCheckpoint and BackupAndRestore see every variable before a call.
        if self.network.built:
            self.build_heads()
            self.built = True

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def build(self, input_shape):
        if not self.network.built:
            self.network.build(input_shape)
        self.build_heads()
        self.built = True

    def _budget(self):
        """This step's training budget: the attack's eps times the warm-up fraction.

        None (the attack's own budget) for an attack without a positive eps.
        """
        eps = getattr(self.attack, "eps", None)
        if not eps:
            return None
        return eps * self.eps_fraction

    def _labels(self, y):
        """The labels the trainer itself uses: `[N]` int64 (y as given goes to compile's loss)."""
        return sparse_labels(y, self.num_classes)

    # -- metrics -----------------------------------------------------------
    def _set_metrics(self, metrics, name):
        """Tracks `loss` and the subclass's `metrics` (each from `directed_mean`, or
        a metric given a `_direction`) in one `MetricGroup`."""
        self.tracked_metrics = MetricGroup([directed_mean("loss", DOWN), *metrics], name=name)

    @property
    def metrics(self):
        # This trainer's group first ("loss" leads the logs), then compile()'s
        # metrics. Keras' own loss tracker is left out: the group's `loss`
        # replaces it (both are named "loss").
        own = getattr(self, "tracked_metrics", None)
        if own is None:
            return super().metrics
        rest = [m for m in super().metrics if m is not own and m.name not in own]
        return [own, *rest]

    def silent_metrics(self, training):
        """Names of this trainer's metrics the phase never updates (kept out of its logs)."""
        return ()

    def _logs(self, training, compiled=None):
        if compiled is not None:
            x, y, y_pred, sample_weight = compiled
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        else:
            logs = self.get_metrics_result()
        silent = set(self.silent_metrics(training))
        return for_strategy(self.distribute_strategy,
                            {k: v for k, v in logs.items() if k not in silent})

    # -- steps -------------------------------------------------------------
    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return Batch(x=x, y=y, sample_weight=sample_weight, labels=self._labels(y),
                     weights=sample_weights(sample_weight), size=tf.shape(x)[0])

    def train_step(self, data):
        batch = self._unpack(data)
        prepared = self.prepare_batch(batch)
        with tf.GradientTape() as tape:
            loss, outputs = self.compute_adversarial_loss(batch, prepared)
            scaled = self.optimizer.scale_loss(loss)
        track_loss(self.tracked_metrics["loss"], loss, batch.size)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        # No variable may change before every value of this step is computed.
        # tf.function orders each read of a variable before its update, but
        # Grappler's dependency optimizer can drop those edges; a weight whose
        # gradient is ready early (the classifier's, when the inverse-adversary
        # centres still read it) was then updated under a read still to run, and
        # training was not reproducible (about 1 trace in 10). Control edges
        # from the step's computed values (not from the reads) are kept.
        computed = [t for t in tf.nest.flatten((loss, grads, prepared, outputs))
                    if isinstance(t, tf.Tensor)]
        with tf.control_dependencies(computed):
            apply_gradients(self.optimizer, grads, variables)
            compiled = self.after_train_step(batch, prepared, outputs)
        return self._logs(True, compiled)

    def test_step(self, data):
        batch = self._unpack(data)
        loss, compiled = self.evaluate_batch(batch)
        track_loss(self.tracked_metrics["loss"], loss, batch.size)
        return self._logs(False, compiled)

    def prepare_batch(self, batch):
        """What the loss needs and the gradient must not flow through (adversaries).

        Runs before the gradient tape. Returns anything `compute_adversarial_loss`
        and `after_train_step` take as `prepared`.
        """
        return None

    def compute_adversarial_loss(self, batch, prepared):
        """The training loss of one batch, under the gradient tape.

        Returns:
            (float32 scalar loss, this replica's share of the global-batch
            loss; outputs `after_train_step` needs).
        """
        raise NotImplementedError

    def after_train_step(self, batch, prepared, outputs):
        """Updates state (e.g. class centres) and metrics after the optimizer step.

        Returns:
            None, or `(x, y, y_pred, sample_weight)` for `compile()`'s metrics.
        """
        return None

    def evaluate_batch(self, batch):
        """Validation: updates this trainer's metrics.

        Returns:
            (float32 scalar loss as in training, None or `(x, y, y_pred,
            sample_weight)` for `compile()`'s metrics).
        """
        raise NotImplementedError

    def _compiled_loss(self, y, y_pred, sample_weight, training=True):
        """`compile()`'s loss (plus regularisation losses), `(y, y_pred, sample_weight)`."""
        return self.compute_loss(x=None, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                 training=training)

    # -- serialisation -----------------------------------------------------
    def get_config(self):
        config = super().get_config()
        for name in self._model_args:
            config[name] = _serialize_models(getattr(self, name))
        config.update(
            attack=None if self.attack is None else serialize(self.attack),
            eval_attack=None if self.eval_attack is None else serialize(self.eval_attack),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for name in cls._model_args:
            if name in config:
                config[name] = _deserialize_models(config[name], custom_objects)
        return cls(**config)
