"""Loss tracking and optimizer steps across replicas: the arithmetic every trainer step shares."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfadv.losses.reduction import unscale_for_replicas


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
