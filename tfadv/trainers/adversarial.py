"""The adversarial training model: min-max training through plain `model.fit`.

`AdversarialModel` wraps a base model (which maps inputs to logits) and an
attack. Its `train_step` solves the inner maximisation with the attack (the
base model in inference mode) and takes the outer minimisation step with the
compiled optimizer; its `test_step` reports clean *and* robust metrics, so
`history` carries both every epoch.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.base import Attack
from tfadv.attacks.pgd import InversePGD
from tfadv.attacks.registry import deserialize, serialize
from tfadv.config import CenterLossConfig
from tfadv.layers.centers import ClassCenters
from tfadv.losses.center_loss import center_loss as center_loss_fn
from tfadv.models.features import logits_and_features
from tfadv.ops.classwise import class_sums

METHODS = ("standard", "pgd", "trades")


def scale_for_replicas(value):
    """Divides a per-replica mean loss by the number of replicas in sync.

    Keras' compiled losses do this themselves; extra terms added in a
    `train_step` must do the same so that the all-reduced gradient is the
    gradient of the global-batch mean.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * tf.cast(1.0 / replicas, value.dtype)
    return value


@keras.saving.register_keras_serializable(package="tfadv")
class AdversarialModel(keras.Model):
    """Adversarial training of a classifier with `compile` / `fit` / `evaluate`.

    Methods:
        - "pgd" (Madry et al., 2018): minimise the loss on `attack(x)`; with
          `adv_ratio < 1`, on the mix `(1 - r) * L(x) + r * L(x_adv)` (a
          "balanced" clean/adversarial batch, one forward pass over both).
        - "trades" (Zhang et al., 2019): `CE(f(x), y) + beta * KL(f(x) || f(x_adv))`,
          with `x_adv` maximising that KL inside the attack's ball.
        - "standard": clean training (still reports robust validation metrics).

    Args:
        base: Keras model mapping inputs to logits. It is what you save and
            deploy; this wrapper only trains it.
        attack: the training attack (inner maximisation), e.g. `PGD(...)`.
        method: one of "standard", "pgd", "trades".
        adv_ratio: weight of the adversarial loss for "pgd", in [0, 1].
        trades_beta: TRADES regularisation weight (6.0 in the paper).
        eval_attack: attack for robust validation metrics; defaults to `attack`.
            None-valued `attack` with method "standard" needs an `eval_attack`
            to report robust metrics; without one only clean metrics are shown.
        center_loss: a `CenterLossConfig` (or its dict) to add center loss on
            the base model's feature layer; the centres are a non-trainable
            `ClassCenters` layer of this model, saved with it.

    Example:
        >>> base = tfadv.models.mnist_cnn()
        >>> robust = AdversarialModel(base, attack=PGD(eps=0.3, step_size=0.04, steps=10))
        >>> robust.compile(optimizer="adam",
        ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...     metrics=["accuracy"])
        >>> robust.fit(train_ds, validation_data=val_ds, epochs=20)
        >>> base.save("model.keras")
    """

    def __init__(
        self,
        base,
        attack=None,
        *,
        method="pgd",
        adv_ratio=1.0,
        trades_beta=6.0,
        eval_attack=None,
        center_loss=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(base, keras.Model):
            raise ValueError(f"Expected base to be a keras.Model. Received: {type(base).__name__}")
        if method not in METHODS:
            raise ValueError(f"Expected method to be one of {METHODS}. Received: method={method!r}")
        attack = None if attack is None else deserialize(attack)
        eval_attack = None if eval_attack is None else deserialize(eval_attack)
        if method != "standard" and attack is None:
            raise ValueError(
                f'method="{method}" needs a training attack, e.g. '
                "attack=tfadv.attacks.PGD(eps=0.3, step_size=0.04, steps=10)."
            )
        if not 0.0 <= float(adv_ratio) <= 1.0:
            raise ValueError(f"Expected 0 <= adv_ratio <= 1. Received: adv_ratio={adv_ratio}")
        if float(trades_beta) < 0:
            raise ValueError(f"Expected trades_beta >= 0. Received: trades_beta={trades_beta}")
        for name, value in (("attack", attack), ("eval_attack", eval_attack)):
            if value is not None and not isinstance(value, Attack):
                raise ValueError(f"Expected {name} to be a tfadv Attack. Received: {value!r}")
        self.base = base
        self.attack = attack
        self.method = method
        self.adv_ratio = float(adv_ratio)
        self.trades_beta = float(trades_beta)
        self.eval_attack = eval_attack if eval_attack is not None else attack
        self.robust_accuracy = keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy")
        self.robust_loss = keras.metrics.Mean(name="robust_loss")
        self.center_cfg = None if center_loss is None else CenterLossConfig.from_dict(center_loss)
        if self.center_cfg is not None:
            both = logits_and_features(base, self.center_cfg.feature_layer)
            # Not tracked as a sublayer: it shares base's variables, and tracking
            # would list them twice.
            object.__setattr__(self, "_logits_features", both)
            dim = int(both.outputs[1].shape[-1])
            self.centers = ClassCenters(self.center_cfg.num_classes, dim,
                                        alpha=self.center_cfg.alpha, name="class_centers")
            self.center_loss_tracker = keras.metrics.Mean(name="center_loss")
            self.inverse_attack = InversePGD(
                eps=self.center_cfg.inverse_eps, step_size=self.center_cfg.inverse_step_size,
                steps=self.center_cfg.inverse_steps)
        # Fraction of the training attack's budget in use; EpsilonWarmup ramps it.
        self.eps_scale = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="eps_scale", dtype="float32"
        )
        if base.built:
            # The wrapper owns no weights of its own: built whenever its base is,
            # so that saving and BackupAndRestore see every variable.
            self.built = True

    # Keras needs to know how to run the model for predict() and summary().
    def call(self, inputs, training=False):
        return self.base(inputs, training=training)

    def build(self, input_shape):
        if not self.base.built:
            self.base.build(input_shape)
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 builds metrics from the first distributed batch by
        # strategy.reduce(), which MultiWorkerMirroredStrategy cannot apply to a
        # tuple of PerReplica values. Only shapes matter for the build, so use
        # this worker's first replica's batch instead.
        strategy = self._distribute_strategy
        if iterator is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                next(it),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    @property
    def _eval_only(self):
        return (self.robust_accuracy.name, self.robust_loss.name)

    # -- training ----------------------------------------------------------
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.method == "trades":
            return self._trades_step(x, y, sample_weight)
        cfg = self.center_cfg
        attacked = self.method != "standard" and self.adv_ratio > 0.0
        x_adv = self.attack(self.base, x, y, eps_scale=self.eps_scale) if attacked else None
        n = tf.shape(x)[0]
        need_clean_features = cfg is not None and cfg.on in ("clean", "both")
        if not attacked:
            inputs, targets, weights, parts = x, y, sample_weight, ("clean",)
        elif self.adv_ratio == 1.0 and not need_clean_features:
            inputs, targets, weights, parts = x_adv, y, sample_weight, ("adversarial",)
        else:
            # One forward pass over [x, x_adv]. The mean over the 2N examples with
            # weights 2(1-r) and 2r equals (1 - r) * mean L(x) + r * mean L(x_adv).
            inputs = tf.concat([x, x_adv], axis=0)
            targets = tf.concat([y, y], axis=0)
            r = self.adv_ratio
            weights = tf.concat([tf.fill([n], 2.0 * (1.0 - r)), tf.fill([n], 2.0 * r)], axis=0)
            if sample_weight is not None:
                sw = tf.cast(sample_weight, weights.dtype)
                weights = weights * tf.concat([sw, sw], axis=0)
            parts = ("clean", "adversarial")
        centers_y = self._batch_centers(x, y) if cfg is not None else None

        with tf.GradientTape() as tape:
            if cfg is None:
                y_pred = self.base(inputs, training=True)
            else:
                y_pred, features = self._logits_features(inputs, training=True)
            loss = self._compute_loss(
                x=inputs, y=targets, y_pred=y_pred, sample_weight=weights, training=True
            )
            if cfg is not None:
                loss = loss + self._center_term(features, y, centers_y, parts)
            self._track_loss(loss, inputs)
            scaled = self.optimizer.scale_loss(loss)
        self._apply(tape, scaled)
        if len(parts) == 2 and self.adv_ratio < 1.0:
            return self._train_logs(inputs, targets, y_pred, weights)
        # Training accuracy is reported on the examples the loss is about.
        if len(parts) == 2:
            return self._train_logs(x_adv, y, y_pred[n:], sample_weight)
        return self._train_logs(inputs, targets, y_pred, weights)

    def _selected(self, features, parts):
        """Features (and how many copies of the labels) the center loss applies to."""
        on = self.center_cfg.on
        if len(parts) == 1:
            return features, 1
        n = tf.shape(features)[0] // 2
        if on == "clean":
            return features[:n], 1
        if on == "adversarial":
            return features[n:], 1
        return features, 2

    def _center_term(self, features, y, centers_y, parts):
        feats, copies = self._selected(features, parts)
        labels = tf.concat([y] * copies, axis=0) if copies > 1 else y
        centers = tf.concat([centers_y] * copies, axis=0) if copies > 1 else centers_y
        per_example = center_loss_fn(feats, centers)
        self.center_loss_tracker.update_state(per_example)
        if self.center_cfg.centers == "learned":
            self.centers.update(feats, labels)
        term = scale_for_replicas(tf.reduce_mean(per_example))
        return tf.cast(self.center_cfg.weight, term.dtype) * term

    def _batch_centers(self, x, y):
        """The centre of each example's class, before this step's update."""
        if self.center_cfg.centers == "learned":
            return self.centers(y)
        # Inverse-adversary centres of this (global) batch: per-class means of
        # the features of the inverse adversaries.
        x_inv = self.inverse_attack(self.base, x, y)
        _, f_inv = self._logits_features(x_inv, training=False)
        f_inv = tf.cast(f_inv, tf.float32)
        sums, counts = class_sums(f_inv, y, self.center_cfg.num_classes, across_replicas=True)
        means = sums / tf.maximum(counts, 1.0)[:, None]
        return tf.stop_gradient(tf.gather(means, tf.cast(y, tf.int32)))

    def _trades_step(self, x, y, sample_weight):
        clean_probs = tf.nn.softmax(tf.cast(self.base(x, training=False), tf.float32))
        x_adv = self.attack(self.base, x, clean_probs, objective=objectives_lib.kl_divergence,
                            eps_scale=self.eps_scale)
        n = tf.shape(x)[0]
        cfg = self.center_cfg
        centers_y = self._batch_centers(x, y) if cfg is not None else None
        with tf.GradientTape() as tape:
            inputs = tf.concat([x, x_adv], axis=0)
            if cfg is None:
                both = self.base(inputs, training=True)
            else:
                both, features = self._logits_features(inputs, training=True)
            logits, logits_adv = both[:n], both[n:]
            natural = self._compute_loss(
                x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
            )
            p = tf.nn.softmax(tf.cast(logits, tf.float32))
            kl = objectives_lib.kl_divergence(logits_adv, p)
            robust = scale_for_replicas(tf.reduce_mean(kl))
            loss = natural + tf.cast(self.trades_beta, natural.dtype) * robust
            if cfg is not None:
                loss = loss + self._center_term(features, y, centers_y, ("clean", "adversarial"))
            self._track_loss(loss, x)
            scaled = self.optimizer.scale_loss(loss)
        self._apply(tape, scaled)
        return self._train_logs(x, y, logits, sample_weight)

    def _track_loss(self, loss, inputs):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(
            loss * tf.cast(replicas, loss.dtype), sample_weight=tf.shape(inputs)[0]
        )

    def _apply(self, tape, loss):
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)

    def _train_logs(self, x, y, y_pred, sample_weight):
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return self._for_strategy({k: v for k, v in logs.items() if k not in self._eval_only})

    def _for_strategy(self, logs):
        # Keras 3.15 reduces step outputs across workers with reduce(MEAN, axis=0),
        # which fails on scalars (tensorflow/tensorflow#72388). Rank-1 logs
        # reduce to the same scalars.
        if isinstance(self._distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    # -- evaluation --------------------------------------------------------
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.center_cfg is not None:
            y_pred, features = self._logits_features(x, training=False)
            # Validation center loss against the learned centres (no update).
            if self.center_cfg.centers == "learned":
                self.center_loss_tracker.update_state(center_loss_fn(features, self.centers(y)))
        else:
            y_pred = self.base(x, training=False)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        self._track_loss(loss, x)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if self.eval_attack is None:
            return self._for_strategy(
                {k: v for k, v in logs.items() if k not in self._eval_only})
        x_adv = self.eval_attack(self.base, x, y)
        adv_pred = self.base(x_adv, training=False)
        self.robust_accuracy.update_state(y, adv_pred, sample_weight=sample_weight)
        self.robust_loss.update_state(
            objectives_lib.cross_entropy(adv_pred, y), sample_weight=sample_weight
        )
        logs[self.robust_accuracy.name] = self.robust_accuracy.result()
        logs[self.robust_loss.name] = self.robust_loss.result()
        return self._for_strategy(logs)

    # -- serialisation -----------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            base=keras.saving.serialize_keras_object(self.base),
            attack=None if self.attack is None else serialize(self.attack),
            method=self.method,
            adv_ratio=self.adv_ratio,
            trades_beta=self.trades_beta,
            eval_attack=None if self.eval_attack is None else serialize(self.eval_attack),
            center_loss=None if self.center_cfg is None else self.center_cfg.to_dict(),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["base"] = keras.saving.deserialize_keras_object(
            config["base"], custom_objects=custom_objects
        )
        return cls(**config)
