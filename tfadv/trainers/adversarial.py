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
from tfadv.attacks.pgd import InversePGD
from tfadv.config import METHODS, CenterLossConfig
from tfadv.layers.centers import ClassCenters
from tfadv.losses.adversarial import adversarial_loss, trades_loss
from tfadv.losses.center_loss import center_loss as center_loss_fn
from tfadv.losses.reduction import global_batch_mean
from tfadv.models.features import logits_and_features
from tfadv.ops.classwise import class_sums
from tfadv.trainers.base import DOWN, TrainerBase, directed_mean
from tfadv.trainers.noise import repeat_rows



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
class AdversarialModel(TrainerBase):
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
          "balanced" clean/adversarial batch, one forward pass over both);
          `tfadv.losses.adversarial_loss` with `compile()`'s loss as `L`.
        - "trades" (Zhang et al., 2019): `L(f(x), y) + beta * KL(f(x) || f(x_adv))`,
          with `x_adv` maximising that KL inside the attack's ball;
          `tfadv.losses.trades_loss`.
        - "fgsm_rs", "n_fgsm", "free": the fast methods of `TrainerBase`
          (Wong et al. 2020; de Jorge et al. 2022; Shafahi et al. 2019),
          minimising the "pgd" loss on their cheaper adversaries; the
          training attack gives only their threat model (eps, norm, bounds).
        - "gaussian", "smoothadv": the base model of a randomized-smoothing
          classifier (`tfadv.certification`), trained on Gaussian-noise copies
          of the inputs or of SmoothAdv's adversaries (Cohen et al. 2019;
          Salman et al. 2019; `TrainerBase`, `noise_sigma`, `noise_samples`).
        - "standard": clean training (still reports robust validation metrics).

    Args:
        base: Keras model mapping inputs to logits. It is what you save and
            deploy; this wrapper only trains it.
        attack: the training attack (inner maximisation), e.g. `PGD(...)`.
        method: one of "standard", "pgd", "trades", "fgsm_rs", "n_fgsm", "free",
            "gaussian", "smoothadv".
        adv_ratio: weight of the adversarial loss for "pgd" and the fast
            methods, in [0, 1].
        trades_beta: TRADES regularisation weight (6.0 in the paper).
        eval_attack: attack for robust validation metrics; defaults to `attack`.
            None-valued `attack` with method "standard" needs an `eval_attack`
            to report robust metrics; without one only clean metrics are shown.
        center_loss: a `CenterLossConfig` (or its dict) to add center loss on
            the base model's feature layer; the centres are a non-trainable
            `ClassCenters` layer of this model, saved with it (float32 under
            any mixed-precision policy).
        fast_step, fast_noise, free_replays: the fast methods' settings
            (`TrainerBase`; None: each paper's default).
        noise_sigma, noise_samples: the noise methods' settings (`TrainerBase`).
        static_models: frozen classifiers for ensemble adversarial training
            (Tramer et al., ICLR 2018): batch k's adversaries are made on
            source `k mod (1 + len(static_models))`, `base` first ("pgd",
            "fgsm_rs", "n_fgsm").

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

    _model_args = ("base", "static_models")
    methods = METHODS

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
        static_models=(),
        **kwargs,
    ):
        if not isinstance(base, keras.Model):
            raise ValueError(f"Expected base to be a keras.Model. Received: {type(base).__name__}")
        if method not in METHODS:
            raise ValueError(f"Expected method to be one of {METHODS}. Received: method={method!r}")
        if method not in ("standard", "gaussian") and attack is None:
            raise ValueError(
                f'method="{method}" needs a training attack, e.g. '
                "attack=tfadv.attacks.PGD(eps=0.3, step_size=0.04, steps=10)."
            )
        super().__init__(attack=attack, eval_attack=eval_attack, method=method,
                         num_classes=_output_classes(base), **kwargs)
        if self.eval_attack is None:
            self.eval_attack = self.attack
        if static_models and method in ("standard", "trades", "free", "gaussian", "smoothadv"):
            raise ValueError(f'static_models (ensemble adversarial training) take the place of '
                             f'the training attack\'s model for "pgd", "fgsm_rs" and "n_fgsm"; '
                             f'method="{method}" has no such attack.')
        self._set_static_models(static_models)
        if not 0.0 <= float(adv_ratio) <= 1.0:
            raise ValueError(f"Expected 0 <= adv_ratio <= 1. Received: adv_ratio={adv_ratio}")
        if float(trades_beta) < 0:
            raise ValueError(f"Expected trades_beta >= 0. Received: trades_beta={trades_beta}")
        self.base = base
        self.adv_ratio = float(adv_ratio)
        self.trades_beta = float(trades_beta)
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
        self._set_metrics(own_metrics, name="adversarial_metrics")
        self._built_if_network_is()

    @property
    def network(self):
        return self.base

    @property
    def robust_accuracy(self):
        return self.tracked_metrics["robust_accuracy"]

    @property
    def robust_loss(self):
        return self.tracked_metrics["robust_loss"]

    @property
    def center_loss_tracker(self):
        return self.tracked_metrics["center_loss"]

    def silent_metrics(self, training):
        """Training never updates the robust metrics; validation skips what it cannot compute."""
        robust = ("robust_accuracy", "robust_loss")
        if training:
            return robust
        names = [] if self.eval_attack is not None else list(robust)
        # Inverse-adversary centres exist only inside a training step.
        if self.center_cfg is not None and self.center_cfg.centers != "learned":
            names.append("center_loss")
        return tuple(names)

    def _forward(self, inputs, training):
        """(logits, features or None) of the base model."""
        if self.center_cfg is None:
            return self.base(inputs, training=training), None
        return self._logits_features(inputs, training=training)

    # -- training ----------------------------------------------------------
    def prepare_batch(self, batch):
        """The training adversaries (None for clean training) and the batch's class centres."""
        x, labels = batch.x, batch.labels
        if self.method == "trades":
            clean_probs = tf.nn.softmax(tf.cast(self.base(x, training=False), tf.float32))
            x_adv = self.attack(self.base, x, clean_probs,
                                objective=objectives_lib.kl_divergence, eps=self._budget())
        elif self.method not in ("standard", "trades") and self.adv_ratio > 0.0:
            x_adv = self.from_sources(lambda model: self.inner_max(model, x, labels))
            self.count_batch(x_adv)
        else:
            x_adv = None
        centers = None
        if self.center_cfg is not None:
            # One row per training input (noise methods: per noisy copy).
            centers = repeat_rows(self._batch_centers(x, labels, batch.weights),
                                  self.noise_copies)
        return {"x_adv": x_adv, "centers": centers}

    def _parts(self, x_adv):
        """The examples of the forward pass: ("clean",), ("adversarial",) or both, in order."""
        if x_adv is None:
            return ("clean",)
        clean_features = self.center_cfg is not None and self.center_cfg.on in ("clean", "both")
        if self.method != "trades" and self.adv_ratio == 1.0 and not clean_features:
            return ("adversarial",)
        return ("clean", "adversarial")

    def compute_adversarial_loss(self, batch, prepared):
        x_adv = prepared["x_adv"]
        parts = self._parts(x_adv)
        given = {"clean": batch.x, "adversarial": x_adv}
        inputs = (given[parts[0]] if len(parts) == 1
                  else tf.concat([batch.x, x_adv], axis=0))
        y_pred, features = self._forward(inputs, training=True)
        n = batch.size
        split = {parts[0]: y_pred} if len(parts) == 1 else {"clean": y_pred[:n],
                                                              "adversarial": y_pred[n:]}
        if self.method == "trades":
            loss = trades_loss(batch.y, split["clean"], split["adversarial"],
                               beta=self.trades_beta, sample_weight=batch.sample_weight,
                               loss_fn=self._compiled_loss)
        else:
            ratio = 0.0 if parts == ("clean",) else self.adv_ratio
            loss = adversarial_loss(batch.y, split.get("clean"), split.get("adversarial"),
                                    adv_ratio=ratio, sample_weight=batch.sample_weight,
                                    loss_fn=self._compiled_loss)
        outputs = {"inputs": inputs, "y_pred": y_pred, "parts": parts}
        if self.center_cfg is not None:
            term = self._center_term(features, batch, prepared["centers"], parts)
            outputs["center"] = term
            per_example, _, _, weights = term
            loss = loss + self.center_cfg.weight * global_batch_mean(per_example, weights)
        return loss, outputs

    def _center_term(self, features, batch, centers_y, parts):
        """(per-example center loss, features, labels, weights) of the examples it covers."""
        on, copies = self.center_cfg.on, 1
        if len(parts) == 2:
            n = batch.size
            if on == "clean":
                features = features[:n]
            elif on == "adversarial":
                features = features[n:]
            else:
                copies = 2

        def repeat(t):
            return t if t is None or copies == 1 else tf.concat([t] * copies, axis=0)

        labels, centers, weights = repeat(batch.labels), repeat(centers_y), repeat(batch.weights)
        return center_loss_fn(features, centers), features, labels, weights

    def after_train_step(self, batch, prepared, outputs):
        if self.center_cfg is not None:
            per_example, features, labels, weights = outputs["center"]
            self.center_loss_tracker.update_state(per_example, sample_weight=weights)
            if self.center_cfg.centers == "learned":
                self.centers.update(features, labels, sample_weight=weights)
        inputs, y_pred, parts = outputs["inputs"], outputs["y_pred"], outputs["parts"]
        n = batch.size
        if self.method == "trades":
            return batch.x, batch.y, y_pred[:n], batch.sample_weight
        if len(parts) == 2 and self.adv_ratio < 1.0:
            # compile()'s metrics on the mix, weighted as the loss weights it.
            r = self.adv_ratio
            weights = tf.concat([tf.fill([n], 2.0 * (1.0 - r)), tf.fill([n], 2.0 * r)], axis=0)
            if batch.weights is not None:
                weights = weights * tf.concat([batch.weights, batch.weights], axis=0)
            return inputs, tf.concat([batch.y, batch.y], axis=0), y_pred, weights
        # Otherwise on the examples the loss is about.
        if len(parts) == 2:
            return prepared["x_adv"], batch.y, y_pred[n:], batch.sample_weight
        return inputs, batch.y, y_pred, batch.sample_weight

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

    # -- evaluation --------------------------------------------------------
    def evaluate_batch(self, batch):
        x, labels, sw = batch.x, batch.labels, batch.weights
        y_pred, features = self._forward(x, training=False)
        if self.center_cfg is not None and self.center_cfg.centers == "learned":
            # Validation center loss against the learned centres (no update).
            self.center_loss_tracker.update_state(
                center_loss_fn(features, self.centers(labels)), sample_weight=sw)
        loss = self._compiled_loss(batch.y, y_pred, batch.sample_weight, training=False)
        if self.eval_attack is not None:
            x_adv = self.eval_attack(self.base, x, labels)
            adv_pred = self.base(x_adv, training=False)
            self.robust_accuracy.update_state(labels, adv_pred, sample_weight=sw)
            self.robust_loss.update_state(
                objectives_lib.cross_entropy(adv_pred, labels), sample_weight=sw
            )
        return loss, (x, batch.y, y_pred, batch.sample_weight)

    # -- serialisation -----------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            method=self.method,
            adv_ratio=self.adv_ratio,
            trades_beta=self.trades_beta,
            center_loss=None if self.center_cfg is None else self.center_cfg.to_dict(),
        )
        return config
