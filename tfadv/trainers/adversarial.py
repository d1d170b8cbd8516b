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
from tfadv.losses.reduction import global_batch_mean, sample_weights
from tfadv.models.features import logits_and_features
from tfadv.ops.classwise import class_sums
from tfadv.ops.labels import sparse_labels
from tfadv.trainers.base import (DOWN, MetricGroup, apply_gradients, directed_mean,
                                 for_strategy, track_loss)

METHODS = ("standard", "pgd", "trades")


def _output_classes(model):
    """The static number of classes of `model`'s (first) output, or None."""
    try:
        shape = model.output_shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    if isinstance(shape, list):
        shape = shape[0]
    last = shape[-1] if shape else None
    return None if last is None else int(last)


@keras.saving.register_keras_serializable(package="tfadv")
class AdversarialModel(keras.Model):
    """Adversarial training of a classifier with `compile` / `fit` / `evaluate`.

    Every loss term is reduced like Keras' compiled losses: sample weights
    (and `class_weight`) weight every term and every centre update, and under
    `tf.distribute` each term is the global-batch mean (a replica without
    examples contributes nothing). Labels may be `[N]` / `[N, 1]` integers,
    whole-number floats or one-hot `[N, C]`: the compiled loss and metrics get
    them as given; the attack, the center loss and `robust_accuracy` use
    `tfadv.ops.sparse_labels`.

    Metrics: besides `compile()`'s, validation reports `robust_accuracy`
    (higher is better) and `robust_loss` (lower), and center loss adds
    `center_loss` (lower); Keras' monitor callbacks know these directions, so
    `EarlyStopping(monitor="val_robust_accuracy")` works in `mode="auto"`.

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
            `ClassCenters` layer of this model, saved with it (float32 under
            any mixed-precision policy).

    Shape:
        x: `[N, ...]` float inputs of `base`; y: `[N]`, `[N, 1]` or `[N, C]`;
        sample_weight: optional `[N]`.

    Raises:
        ValueError: an unknown method, a base that is not a `keras.Model`, no
            training attack for "pgd"/"trades", adv_ratio outside [0, 1] or
            trades_beta < 0.

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
        self.num_classes = _output_classes(base)
        own_metrics = [keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy"),
                       directed_mean("robust_loss", DOWN)]
        self.center_cfg = None if center_loss is None else CenterLossConfig.from_dict(center_loss)
        if self.center_cfg is not None:
            both = logits_and_features(base, self.center_cfg.feature_layer)
            # Not tracked as a sublayer: it shares base's variables, and tracking
            # would list them twice.
            object.__setattr__(self, "_logits_features", both)
            dim = int(both.outputs[1].shape[-1])
            self.centers = ClassCenters(self.center_cfg.num_classes, dim,
                                        alpha=self.center_cfg.alpha, name="class_centers")
            own_metrics.append(directed_mean("center_loss", DOWN))
            self.inverse_attack = InversePGD(
                eps=self.center_cfg.inverse_eps, step_size=self.center_cfg.inverse_step_size,
                steps=self.center_cfg.inverse_steps)
        self.extra_metrics = MetricGroup(own_metrics, name="adversarial_metrics")
        # Fraction of the training attack's budget in use; EpsilonWarmup ramps it.
        self.eps_fraction = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="eps_fraction", dtype="float32"
        )
        if base.built:
            # The wrapper owns no weights of its own: built whenever its base is,
            # so that saving and BackupAndRestore see every variable.
            self.built = True

    def _budget(self):
        """This step's training budget: the attack's eps times the warm-up fraction."""
        if self.attack.eps is None:
            return None
        return self.attack.eps * self.eps_fraction

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
    def robust_accuracy(self):
        return self.extra_metrics["robust_accuracy"]

    @property
    def robust_loss(self):
        return self.extra_metrics["robust_loss"]

    @property
    def center_loss_tracker(self):
        return self.extra_metrics["center_loss"]

    @property
    def _eval_only(self):
        return ("robust_accuracy", "robust_loss")

    def _labels(self, y):
        """The labels the trainer itself uses: `[N]` int64 (the user's y goes to compile's loss)."""
        return sparse_labels(y, self.num_classes)

    # -- training ----------------------------------------------------------
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels = self._labels(y)
        sw = sample_weights(sample_weight)
        if self.method == "trades":
            return self._trades_step(x, y, labels, sample_weight, sw)
        cfg = self.center_cfg
        attacked = self.method != "standard" and self.adv_ratio > 0.0
        x_adv = self.attack(self.base, x, labels, eps=self._budget()) if attacked else None
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
            if sw is not None:
                weights = weights * tf.concat([sw, sw], axis=0)
            parts = ("clean", "adversarial")
        centers_y = self._batch_centers(x, labels, sw) if cfg is not None else None

        with tf.GradientTape() as tape:
            if cfg is None:
                y_pred = self.base(inputs, training=True)
            else:
                y_pred, features = self._logits_features(inputs, training=True)
            loss = self._compute_loss(
                x=inputs, y=targets, y_pred=y_pred, sample_weight=weights, training=True
            )
            if cfg is not None:
                loss = loss + self._center_term(features, labels, sw, centers_y, parts)
            track_loss(self._loss_tracker, loss, tf.shape(inputs)[0])
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

    def _center_term(self, features, labels, sw, centers_y, parts):
        """Weighted center loss on the selected features; updates the learned centres."""
        feats, copies = self._selected(features, parts)

        def repeat(t):
            return t if t is None or copies == 1 else tf.concat([t] * copies, axis=0)

        labels, centers, weights = repeat(labels), repeat(centers_y), repeat(sw)
        per_example = center_loss_fn(feats, centers)
        self.center_loss_tracker.update_state(per_example, sample_weight=weights)
        if self.center_cfg.centers == "learned":
            self.centers.update(feats, labels, sample_weight=weights)
        term = global_batch_mean(per_example, weights)
        return tf.cast(self.center_cfg.weight, term.dtype) * term

    def _batch_centers(self, x, labels, sw):
        """The centre of each example's class, before this step's update (float32 [N, D])."""
        if self.center_cfg.centers == "learned":
            return self.centers(labels)
        # Inverse-adversary centres of this (global) batch: per-class weighted
        # means of the features of the inverse adversaries.
        x_inv = self.inverse_attack(self.base, x, labels)
        _, f_inv = self._logits_features(x_inv, training=False)
        f_inv = tf.cast(f_inv, tf.float32)
        sums, counts = class_sums(f_inv, labels, self.center_cfg.num_classes, weights=sw,
                                  across_replicas=True)
        means = tf.math.divide_no_nan(sums, counts[:, None])
        return tf.stop_gradient(tf.gather(means, tf.cast(labels, tf.int32)))

    def _trades_step(self, x, y, labels, sample_weight, sw):
        clean_probs = tf.nn.softmax(tf.cast(self.base(x, training=False), tf.float32))
        x_adv = self.attack(self.base, x, clean_probs, objective=objectives_lib.kl_divergence,
                            eps=self._budget())
        n = tf.shape(x)[0]
        cfg = self.center_cfg
        centers_y = self._batch_centers(x, labels, sw) if cfg is not None else None
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
            robust = global_batch_mean(kl, sw)
            loss = natural + tf.cast(self.trades_beta, natural.dtype) * robust
            if cfg is not None:
                loss = loss + self._center_term(features, labels, sw, centers_y,
                                                ("clean", "adversarial"))
            track_loss(self._loss_tracker, loss, n)
            scaled = self.optimizer.scale_loss(loss)
        self._apply(tape, scaled)
        return self._train_logs(x, y, logits, sample_weight)

    def _apply(self, tape, loss):
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        apply_gradients(self.optimizer, grads, variables)

    def _train_logs(self, x, y, y_pred, sample_weight):
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return self._for_strategy({k: v for k, v in logs.items() if k not in self._eval_only})

    def _for_strategy(self, logs):
        return for_strategy(self._distribute_strategy, logs)

    # -- evaluation --------------------------------------------------------
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels = self._labels(y)
        sw = sample_weights(sample_weight)
        if self.center_cfg is not None:
            y_pred, features = self._logits_features(x, training=False)
            # Validation center loss against the learned centres (no update).
            if self.center_cfg.centers == "learned":
                self.center_loss_tracker.update_state(
                    center_loss_fn(features, self.centers(labels)), sample_weight=sw)
        else:
            y_pred = self.base(x, training=False)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        track_loss(self._loss_tracker, loss, tf.shape(x)[0])
        if self.eval_attack is not None:
            x_adv = self.eval_attack(self.base, x, labels)
            adv_pred = self.base(x_adv, training=False)
            self.robust_accuracy.update_state(labels, adv_pred, sample_weight=sw)
            self.robust_loss.update_state(
                objectives_lib.cross_entropy(adv_pred, labels), sample_weight=sw
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return self._for_strategy({k: v for k, v in logs.items() if k not in self._not_evaluated})

    @property
    def _not_evaluated(self):
        """Metrics `test_step` never updates: not logged (a constant 0 column misleads)."""
        names = []
        if self.eval_attack is None:
            names += self._eval_only
        # Inverse-adversary centres exist only inside a training step.
        if self.center_cfg is not None and self.center_cfg.centers != "learned":
            names.append("center_loss")
        return tuple(names)

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
