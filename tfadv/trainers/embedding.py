"""Adversarial fine-tuning of an embedding model (FaceNet): one Keras `train_step`.

    trainer = EmbeddingAdversarialModel(embedder, num_classes=5,
                                        attack=dodging_pgd(eps=4, steps=3),
                                        teacher=frozen_copy_of_embedder)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
    trainer.fit(faces_ds, validation_data=val_ds, epochs=3)
    trainer.embedder.save("embedder.keras")

Inner maximisation: the attack crafts `x_adv` against either the embedding
(`attack_on="embedding"`: cosine distance from the clean embedding, i.e.
dodging; the objective a face system is attacked with) or the classification
loss of the head (`attack_on="classification"`). Outer minimisation of

    ce_weight * [(1 - adv_weight) * CE(head(e(x)), y) + adv_weight * CE(head(e(x_adv)), y)]
    + consistency_weight * mean(1 - cos(e(x_adv), t))             # TRADES-like
      (t = e(x), or the teacher's clean embedding with consistency_target="teacher")
    + center_weight * center_loss(e(x_adv), c_y)                 # Wen et al.
    + distill_weight * mean(1 - cos(e(x), teacher(x)))           # keep the pretrained geometry

Every mean is Keras' compiled-loss reduction (`tfadv.losses.global_batch_mean`):
sample weights (and `class_weight`) weight every term and the centre update,
and under `tf.distribute` each term is the global-batch mean.

The head is a cosine classifier (normalised weights, fixed scale), the natural
head for L2-normalised embeddings. With `static_models` (Tramer et al. 2018,
ensemble adversarial training), batch k takes its adversaries from source
`k mod (1 + len(static_models))`: the model being trained, then each static
model in turn.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfadv.config import check_threshold
from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.base import Attack
from tfadv.layers.centers import ClassCenters
from tfadv.layers.cosine import CosineClassifier
from tfadv.losses.center_loss import center_loss as center_loss_fn
from tfadv.losses.reduction import global_batch_mean, sample_weights
from tfadv.ops.labels import sparse_labels
from tfadv.trainers.base import (DOWN, UP, MetricGroup, apply_gradients, directed_mean,
                                 for_strategy, track_loss)

ATTACK_ON = ("embedding", "classification")


def _cos(a, b):
    a = tf.math.l2_normalize(tf.cast(a, tf.float32), axis=-1)
    b = tf.math.l2_normalize(tf.cast(b, tf.float32), axis=-1)
    return tf.reduce_sum(a * b, axis=-1)


class EmbeddingAdversarialModel(keras.Model):
    """Min-max fine-tuning of an embedding model with a classifier head.

    Args:
        embedder: Keras model, images -> L2-normalised embeddings [N, D].
        num_classes: identities in the training data.
        attack: inner attack (`None`: clean fine-tuning). For
            `attack_on="embedding"` use an untargeted attack with objective
            "cosine_distance" (e.g. `tfadv.attacks.dodging_pgd`).
        attack_on: "embedding" or "classification".
        adv_weight: weight of the adversarial CE against the clean CE.
        ce_weight: weight of the classification terms (the head).
        consistency_weight: weight of `1 - cos(e(x_adv), t)`.
        consistency_target: t = "clean" (the model's own clean embedding,
            gradients through both, as TRADES) or "teacher" (the frozen
            teacher's clean embedding: adversarial images must land where
            the pretrained model put the clean image, which keeps the
            verification threshold and the geometry new identities rely on).
        center_weight, center_alpha: center loss on the adversarial
            embeddings (0 disables); centres are non-trainable float32
            variables.
        teacher: frozen embedding model to distil from (usually the
            pretrained embedder); `distill_weight` its weight.
        static_models: embedding models for ensemble adversarial training.
        head_scale: logit scale of the cosine head.
        eval_attack, eval_threshold: validation dodging attack (reference:
            the clean embedding) and the threshold its success is judged at;
            adds `dodge_success` and `adv_cosine` to the validation metrics.
            With a training attack, `eval_threshold` also adds the training
            adversaries' `dodge_success` (cosine to the clean embedding below
            the threshold) to the training logs.

    Metrics and their direction (Keras' monitor callbacks use it in
    `mode="auto"`): loss, ce, center_loss, dodge_success lower is better;
    accuracy, robust_accuracy, adv_cosine, teacher_cosine higher.

    Shape:
        x: `[N, H, W, C]` images in the embedder's input units; y: `[N]`,
        `[N, 1]` or one-hot `[N, num_classes]`; sample_weight: optional `[N]`.

    Raises:
        ValueError: an unknown attack_on or consistency_target, adv_weight
            outside [0, 1], a negative term weight, a teacher-based term
            without a teacher, eval_attack without eval_threshold.
    """

    def __init__(self, embedder, num_classes, *, attack: Attack | None = None,
                 attack_on="embedding", adv_weight=0.5, ce_weight=1.0, consistency_weight=1.0,
                 consistency_target="clean",
                 center_weight=0.0, center_alpha=0.5, teacher=None, distill_weight=0.0,
                 static_models=(), head_scale=16.0, eval_attack: Attack | None = None,
                 eval_threshold=None, **kwargs):
        super().__init__(**kwargs)
        if attack_on not in ATTACK_ON:
            raise ValueError(f"Expected attack_on in {ATTACK_ON}. Received: {attack_on!r}")
        if not 0.0 <= float(adv_weight) <= 1.0:
            raise ValueError(f"Expected 0 <= adv_weight <= 1. Received: adv_weight={adv_weight}")
        for name, value in (("consistency_weight", consistency_weight), ("ce_weight", ce_weight),
                            ("center_weight", center_weight), ("distill_weight", distill_weight)):
            if float(value) < 0:
                raise ValueError(f"Expected {name} >= 0. Received: {name}={value}")
        if consistency_target not in ("clean", "teacher"):
            raise ValueError(f'Expected consistency_target "clean" or "teacher". '
                             f"Received: {consistency_target!r}")
        if (float(distill_weight) > 0 or consistency_target == "teacher") and teacher is None:
            raise ValueError("distill_weight > 0 needs a teacher model (e.g. a frozen copy "
                             "of the pretrained embedder).")
        if eval_attack is not None and eval_threshold is None:
            raise ValueError("eval_attack needs eval_threshold (the verification threshold).")
        self.embedder = embedder
        self.num_classes = int(num_classes)
        self.head = CosineClassifier(num_classes, scale=head_scale, name="head")
        self.attack = attack
        self.attack_on = attack_on
        self.adv_weight = float(adv_weight)
        self.ce_weight = float(ce_weight)
        self.consistency_weight = float(consistency_weight)
        self.consistency_target = consistency_target
        self.center_weight = float(center_weight)
        self.distill_weight = float(distill_weight)
        self.eval_attack = eval_attack
        self.eval_threshold = (None if eval_threshold is None
                               else check_threshold(eval_threshold, name="eval_threshold"))
        dim = embedder.output_shape[-1]
        self.centers = (ClassCenters(num_classes, dim, alpha=center_alpha, name="centers")
                        if self.center_weight > 0 else None)
        if teacher is not None:
            teacher.trainable = False
        self.teacher = teacher
        self.static_models = list(static_models)
        for m in self.static_models:
            m.trainable = False
        # Every replica counts the same global batches.
        self._batch = self.add_weight(name="batch_counter", shape=(), dtype="int64",
                                      initializer="zeros", trainable=False,
                                      aggregation="only_first_replica")
        self._cosine_distance = objectives_lib.get("cosine_distance")
        tracked = [
            directed_mean("loss", DOWN),
            directed_mean("ce", DOWN),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy"),
            directed_mean("adv_cosine", UP),
        ]
        if self.centers is not None:
            tracked.append(directed_mean("center_loss", DOWN))
        if self.teacher is not None:
            tracked.append(directed_mean("teacher_cosine", UP))
        if self.eval_threshold is not None:
            tracked.append(directed_mean("dodge_success", DOWN))
        self.tracked_metrics = MetricGroup(tracked, name="embedding_metrics")
        # What each phase logs: a metric a phase never updates is not in its logs.
        self._train_names = ["loss", "ce", "accuracy", "robust_accuracy", "adv_cosine"]
        self._test_names = ["loss", "ce", "accuracy"]
        if self.centers is not None:
            self._train_names.append("center_loss")
        if self.teacher is not None:
            self._train_names.append("teacher_cosine")
        if self.attack is not None and self.eval_threshold is not None:
            self._train_names.append("dodge_success")
        if self.eval_attack is not None:
            self._test_names += ["robust_accuracy", "adv_cosine", "dodge_success"]
        if self.teacher is not None:
            self._test_names.append("teacher_cosine")
        if embedder.built:
            # Built whenever the embedder is, so that ModelCheckpoint and
            # BackupAndRestore can save the weights before any call.
            self.head.build(embedder.output_shape)
            self.built = True

    @property
    def metrics(self):
        return [self.tracked_metrics]

    def _logs(self, names):
        return for_strategy(self._distribute_strategy,
                            {n: self.tracked_metrics[n].result() for n in names})

    def call(self, x, training=False):
        return self.head(self.embedder(x, training=training))

    def build(self, input_shape):
        if not self.embedder.built:
            self.embedder.build(input_shape)
        if not self.head.built:
            self.head.build(self.embedder.output_shape)
        self.built = True

    def _classifier(self, x):
        return self.head(self.embedder(x, training=False))

    def _adversarial(self, x, y):
        def on(model):
            def craft():
                if self.attack_on == "classification" and model is self.embedder:
                    return self.attack(self._classifier, x, y)
                ref = tf.stop_gradient(model(x, training=False))
                return self.attack(model, x, ref, objective=self._cosine_distance)
            return craft

        sources = [self.embedder] + self.static_models
        if len(sources) == 1:
            return on(self.embedder)()
        index = tf.cast(self._batch % len(sources), tf.int32)
        return tf.switch_case(index, [on(m) for m in sources])

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y = sparse_labels(y, self.num_classes)
        sw = sample_weights(sample_weight)
        n = tf.shape(x)[0]
        x_adv = self._adversarial(x, y) if self.attack is not None else x
        self._batch.assign_add(1)
        target = None
        if self.teacher is not None:
            target = tf.stop_gradient(self.teacher(x, training=False))
        m = self.tracked_metrics
        with tf.GradientTape() as tape:
            e_all = self.embedder(tf.concat([x, x_adv], 0), training=True)
            e_clean, e_adv = e_all[:n], e_all[n:]
            logits = self.head(e_all)
            ce = keras.losses.sparse_categorical_crossentropy(
                tf.concat([y, y], 0), logits, from_logits=True)
            ce_clean = global_batch_mean(ce[:n], sw)
            ce_adv = global_batch_mean(ce[n:], sw)
            loss = self.ce_weight * ((1.0 - self.adv_weight) * ce_clean
                                     + self.adv_weight * ce_adv)
            adv_cos = _cos(e_adv, e_clean)
            anchor = target if self.consistency_target == "teacher" else e_clean
            loss += self.consistency_weight * global_batch_mean(1.0 - _cos(e_adv, anchor), sw)
            if self.centers is not None:
                c_loss = center_loss_fn(e_adv, self.centers(y))
                loss += self.center_weight * global_batch_mean(c_loss, sw)
            if target is not None:
                t_cos = _cos(e_clean, target)
                loss += self.distill_weight * global_batch_mean(1.0 - t_cos, sw)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        apply_gradients(self.optimizer, grads, variables)
        if self.centers is not None:
            self.centers.update(e_adv, y, sample_weight=sw)
            m["center_loss"].update_state(c_loss, sample_weight=sw)
        if target is not None:
            m["teacher_cosine"].update_state(t_cos, sample_weight=sw)
        track_loss(m["loss"], loss, n)
        m["ce"].update_state(ce[:n], sample_weight=sw)
        m["accuracy"].update_state(y, logits[:n], sample_weight=sw)
        m["robust_accuracy"].update_state(y, logits[n:], sample_weight=sw)
        m["adv_cosine"].update_state(adv_cos, sample_weight=sw)
        if "dodge_success" in self._train_names:
            m["dodge_success"].update_state(self._dodged(adv_cos), sample_weight=sw)
        return self._logs(self._train_names)

    def _dodged(self, cos):
        """1.0 where the adversary's cosine to the clean embedding is below the threshold."""
        return tf.cast(cos < self.eval_threshold, tf.float32)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y = sparse_labels(y, self.num_classes)
        sw = sample_weights(sample_weight)
        m = self.tracked_metrics
        e = self.embedder(x, training=False)
        logits = self.head(e)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        track_loss(m["loss"], global_batch_mean(ce, sw), tf.shape(x)[0])
        m["ce"].update_state(ce, sample_weight=sw)
        m["accuracy"].update_state(y, logits, sample_weight=sw)
        if self.eval_attack is not None:
            ref = tf.stop_gradient(e)
            x_adv = self.eval_attack(self.embedder, x, ref, objective=self._cosine_distance)
            e_adv = self.embedder(x_adv, training=False)
            cos = _cos(e_adv, ref)
            m["robust_accuracy"].update_state(y, self.head(e_adv), sample_weight=sw)
            m["adv_cosine"].update_state(cos, sample_weight=sw)
            m["dodge_success"].update_state(self._dodged(cos), sample_weight=sw)
        if self.teacher is not None:
            m["teacher_cosine"].update_state(
                _cos(e, self.teacher(x, training=False)), sample_weight=sw)
        return self._logs(self._test_names)
