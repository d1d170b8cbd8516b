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

The terms are `tfadv.losses.adversarial_loss` (the CE mix),
`tfadv.losses.consistency_loss` (consistency and distillation) and
`tfadv.losses.center_loss`. Every mean is Keras' compiled-loss reduction
(`tfadv.losses.global_batch_mean`): sample weights (and `class_weight`) weight
every term and the centre update, and under `tf.distribute` each term is the
global-batch mean. The optimizer step is `tfadv.trainers.base.TrainerBase`'s:
the loss is scaled under mixed precision, and `EpsilonWarmup` ramps the
training attack's budget.

The head is a cosine classifier (normalised weights, fixed scale), the natural
head for L2-normalised embeddings. With `static_models` (Tramer et al. 2018,
ensemble adversarial training), batch k takes its adversaries from source
`k mod (1 + len(static_models))`: the model being trained, then each static
model in turn.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.embedding import attack_success, cosine_distance, cosine_similarity
from tfadv.config import check_threshold
from tfadv.layers.centers import ClassCenters
from tfadv.layers.cosine import CosineClassifier
from tfadv.losses.adversarial import adversarial_loss, consistency_loss
from tfadv.losses.center_loss import center_loss as center_loss_fn
from tfadv.losses.reduction import global_batch_mean
from tfadv.trainers.base import DOWN, UP, TrainerBase, directed_mean
from tfadv.trainers.fast import FAST_METHODS

ATTACK_ON = ("embedding", "classification")
CONSISTENCY_TARGETS = ("clean", "teacher")


@keras.saving.register_keras_serializable(package="tfadv")
class EmbeddingAdversarialModel(TrainerBase):
    """Min-max fine-tuning of an embedding model with a classifier head.

    Args:
        embedder: Keras model, images -> L2-normalised embeddings [N, D].
        num_classes: identities in the training data.
        attack: inner attack (`None`: clean fine-tuning). For
            `attack_on="embedding"` use an untargeted attack with objective
            "cosine_distance" (e.g. `tfadv.attacks.dodging_pgd`). Its budget
            is `attack.eps * eps_fraction` (see `EpsilonWarmup`).
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
        method: "pgd" (the training attack as given), or a fast method of
            `TrainerBase`: "fgsm_rs", "n_fgsm" (one step against the
            embedder, or the batch's static model) or "free" (replays against
            the embedder; static models are not used). `fast_step`,
            `fast_noise`, `free_replays`: their settings.
        head_scale: logit scale of the cosine head.
        eval_attack, eval_threshold: validation dodging attack (reference:
            the clean embedding) and the threshold its success is judged at;
            adds `dodge_success` and `adv_cosine` to the validation metrics.
            With a training attack, `eval_threshold` also adds the training
            adversaries' `dodge_success` (cosine to the clean embedding below
            the threshold, `tfadv.attacks.embedding.attack_success`) to the
            training logs.

    Metrics and their direction (Keras' monitor callbacks use it in
    `mode="auto"`): loss, ce, center_loss, dodge_success lower is better;
    accuracy, robust_accuracy, adv_cosine, teacher_cosine higher. Metrics
    given to `compile()` are computed on the head's clean logits.

    Shape:
        x: `[N, H, W, C]` images in the embedder's input units; y: `[N]`,
        `[N, 1]` or one-hot `[N, num_classes]`; sample_weight: optional `[N]`.

    Raises:
        ValueError: an unknown attack_on or consistency_target, adv_weight
            outside [0, 1], a negative term weight, a teacher-based term
            without a teacher, eval_attack without eval_threshold, an attack
            that is not a tfadv Attack.
    """

    _model_args = ("embedder", "teacher", "static_models")
    methods = ("pgd", *FAST_METHODS)

    def __init__(self, embedder, num_classes, *, attack=None, attack_on="embedding",
                 adv_weight=0.5, ce_weight=1.0, consistency_weight=1.0,
                 consistency_target="clean", center_weight=0.0, center_alpha=0.5, teacher=None,
                 distill_weight=0.0, static_models=(), head_scale=16.0, eval_attack=None,
                 eval_threshold=None, **kwargs):
        if attack_on not in ATTACK_ON:
            raise ValueError(f"Expected attack_on in {ATTACK_ON}. Received: {attack_on!r}")
        if not 0.0 <= float(adv_weight) <= 1.0:
            raise ValueError(f"Expected 0 <= adv_weight <= 1. Received: adv_weight={adv_weight}")
        for name, value in (("consistency_weight", consistency_weight), ("ce_weight", ce_weight),
                            ("center_weight", center_weight), ("distill_weight", distill_weight)):
            if float(value) < 0:
                raise ValueError(f"Expected {name} >= 0. Received: {name}={value}")
        if consistency_target not in CONSISTENCY_TARGETS:
            raise ValueError(f'Expected consistency_target "clean" or "teacher". '
                             f"Received: {consistency_target!r}")
        if (float(distill_weight) > 0 or consistency_target == "teacher") and teacher is None:
            raise ValueError("distill_weight > 0 needs a teacher model (e.g. a frozen copy "
                             "of the pretrained embedder).")
        if eval_attack is not None and eval_threshold is None:
            raise ValueError("eval_attack needs eval_threshold (the verification threshold).")
        super().__init__(attack=attack, eval_attack=eval_attack, num_classes=num_classes,
                         **kwargs)
        self.embedder = embedder
        self.head = CosineClassifier(num_classes, scale=head_scale, name="head")
        self.attack_on = attack_on
        self.adv_weight = float(adv_weight)
        self.ce_weight = float(ce_weight)
        self.consistency_weight = float(consistency_weight)
        self.consistency_target = consistency_target
        self.center_weight = float(center_weight)
        self.center_alpha = float(center_alpha)
        self.distill_weight = float(distill_weight)
        self.eval_threshold = (None if eval_threshold is None
                               else check_threshold(eval_threshold, name="eval_threshold"))
        dim = embedder.output_shape[-1]
        self.centers = (ClassCenters(num_classes, dim, alpha=center_alpha, name="centers")
                        if self.center_weight > 0 else None)
        if teacher is not None:
            teacher.trainable = False
        self.teacher = teacher
        self._set_static_models(static_models, count_always=True)
        tracked = [
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
        self._set_metrics(tracked, name="embedding_metrics")
        self._built_if_network_is()

    # -- structure ---------------------------------------------------------
    @property
    def network(self):
        return self.embedder

    def build_heads(self):
        if not self.head.built:
            self.head.build(self.embedder.output_shape)

    def call(self, x, training=False):
        return self.head(self.embedder(x, training=training))

    def _logged(self, training):
        """The metrics a phase updates (a metric a phase never updates is not logged)."""
        names = ["loss", "ce", "accuracy"]
        if training:
            names += ["robust_accuracy", "adv_cosine"]
            if self.centers is not None:
                names.append("center_loss")
            if self.attack is not None and self.eval_threshold is not None:
                names.append("dodge_success")
        elif self.eval_attack is not None:
            names += ["robust_accuracy", "adv_cosine", "dodge_success"]
        if self.teacher is not None:
            names.append("teacher_cosine")
        return names

    def silent_metrics(self, training):
        logged = self._logged(training)
        return tuple(n for n in self.tracked_metrics.names if n not in logged)

    def _dodged(self, embeddings, reference):
        """1.0 where the adversary dodges: its cosine to the reference is below the threshold."""
        return tf.cast(attack_success(embeddings, reference, self.eval_threshold, "dodging"),
                       tf.float32)

    # -- training ----------------------------------------------------------
    def _classifier(self, x):
        return self.head(self.embedder(x, training=False))

    def _adversarial(self, x, y):
        def craft(model):
            if self.attack_on == "classification" and model is self.embedder:
                return self.inner_max(self._classifier, x, y)
            ref = tf.stop_gradient(model(x, training=False))
            return self.inner_max(model, x, ref, objective=cosine_distance)

        return self.from_sources(craft)

    def prepare_batch(self, batch):
        """The adversaries (x itself without an attack) and the teacher's embeddings."""
        x = batch.x
        x_adv = self._adversarial(x, batch.labels) if self.attack is not None else x
        self.count_batch(x_adv)
        target = None
        if self.teacher is not None:
            target = tf.stop_gradient(self.teacher(x, training=False))
        return {"x_adv": x_adv, "target": target}

    def compute_adversarial_loss(self, batch, prepared):
        n, labels, sw = batch.size, batch.labels, batch.weights
        target = prepared["target"]
        e_all = self.embedder(tf.concat([batch.x, prepared["x_adv"]], 0), training=True)
        e_clean, e_adv = e_all[:n], e_all[n:]
        logits = self.head(e_all)
        loss = self.ce_weight * adversarial_loss(labels, logits[:n], logits[n:],
                                                 adv_ratio=self.adv_weight, sample_weight=sw)
        anchor = target if self.consistency_target == "teacher" else e_clean
        loss += self.consistency_weight * global_batch_mean(consistency_loss(e_adv, anchor), sw)
        outputs = {"e_clean": e_clean, "e_adv": e_adv, "logits": logits}
        if self.centers is not None:
            outputs["center_loss"] = center_loss_fn(e_adv, self.centers(labels))
            loss += self.center_weight * global_batch_mean(outputs["center_loss"], sw)
        if target is not None:
            loss += self.distill_weight * global_batch_mean(consistency_loss(e_clean, target), sw)
        return loss, outputs

    def after_train_step(self, batch, prepared, outputs):
        n, labels, sw = batch.size, batch.labels, batch.weights
        e_clean, e_adv, logits = outputs["e_clean"], outputs["e_adv"], outputs["logits"]
        m = self.tracked_metrics
        if self.centers is not None:
            self.centers.update(e_adv, labels, sample_weight=sw)
            m["center_loss"].update_state(outputs["center_loss"], sample_weight=sw)
        if prepared["target"] is not None:
            m["teacher_cosine"].update_state(cosine_similarity(e_clean, prepared["target"]),
                                             sample_weight=sw)
        m["ce"].update_state(objectives_lib.cross_entropy(logits[:n], labels), sample_weight=sw)
        m["accuracy"].update_state(labels, logits[:n], sample_weight=sw)
        m["robust_accuracy"].update_state(labels, logits[n:], sample_weight=sw)
        m["adv_cosine"].update_state(cosine_similarity(e_adv, e_clean), sample_weight=sw)
        if "dodge_success" in self._logged(training=True):
            m["dodge_success"].update_state(self._dodged(e_adv, e_clean), sample_weight=sw)
        return batch.x, batch.y, logits[:n], batch.sample_weight

    # -- evaluation --------------------------------------------------------
    def evaluate_batch(self, batch):
        x, labels, sw = batch.x, batch.labels, batch.weights
        m = self.tracked_metrics
        e = self.embedder(x, training=False)
        logits = self.head(e)
        ce = objectives_lib.cross_entropy(logits, labels)
        m["ce"].update_state(ce, sample_weight=sw)
        m["accuracy"].update_state(labels, logits, sample_weight=sw)
        if self.eval_attack is not None:
            ref = tf.stop_gradient(e)
            x_adv = self.eval_attack(self.embedder, x, ref, objective=cosine_distance)
            e_adv = self.embedder(x_adv, training=False)
            m["robust_accuracy"].update_state(labels, self.head(e_adv), sample_weight=sw)
            m["adv_cosine"].update_state(cosine_similarity(e_adv, ref), sample_weight=sw)
            m["dodge_success"].update_state(self._dodged(e_adv, ref), sample_weight=sw)
        if self.teacher is not None:
            m["teacher_cosine"].update_state(
                cosine_similarity(e, self.teacher(x, training=False)), sample_weight=sw)
        return global_batch_mean(ce, sw), (x, batch.y, logits, batch.sample_weight)

    # -- serialisation -----------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes, attack_on=self.attack_on, adv_weight=self.adv_weight,
            ce_weight=self.ce_weight, consistency_weight=self.consistency_weight,
            consistency_target=self.consistency_target, center_weight=self.center_weight,
            center_alpha=self.center_alpha, distill_weight=self.distill_weight,
            head_scale=self.head.scale, eval_threshold=self.eval_threshold,
        )
        return config
