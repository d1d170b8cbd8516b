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

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.registry import deserialize, serialize
from tfadv.losses.reduction import sample_weights
from tfadv.ops.labels import sparse_labels
from tfadv.trainers import fast, noise
from tfadv.trainers.keras_internals import (  # noqa: F401 (re-exported)
    DOWN, UP, MetricGroup, _KerasHooks, directed_mean)
from tfadv.trainers.replicas import (  # noqa: F401 (re-exported)
    apply_gradients, for_strategy, track_loss)

__all__ = ["DOWN", "UP", "Batch", "MetricGroup", "TrainerBase", "apply_gradients",
           "directed_mean", "for_strategy", "track_loss"]

# The Keras internals (metric directions, the first build under
# MultiWorkerMirroredStrategy) live in tfadv.trainers.keras_internals; the
# replica arithmetic of a step (loss tracking, one overflow decision for all
# replicas) in tfadv.trainers.replicas. Both are re-exported here; the steps
# below look `apply_gradients` up in this module.


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

    The inner maximisation (`inner_max`) is chosen by `method`:

    - "pgd" (and the subclass's own attack-based methods): the training
      attack as given, e.g. PGD-10 (Madry et al., ICLR 2018).
    - "fgsm_rs" (Wong, Rice & Kolter, ICLR 2020): one signed step of
      `fast_step * eps` (1.25 eps) from a uniform start in the eps-ball,
      projected onto the ball.
    - "n_fgsm" (de Jorge et al., NeurIPS 2022): one step of `fast_step * eps`
      (eps) from noise `U(-fast_noise * eps, fast_noise * eps)` (2 eps), not
      projected.
    - "free" (Shafahi et al., NeurIPS 2019): each batch replayed
      `free_replays` times (8); each replay's backward pass steps the weights
      and the perturbation (`fast_step * eps`, eps), which is carried to the
      next batch. An epoch costs `free_replays` training passes: divide the
      epochs by it to compare with one-pass methods at equal cost.
    - "gaussian" (Cohen et al., ICML 2019) and "smoothadv" (Salman et al.,
      NeurIPS 2019): the base model of a randomized-smoothing classifier
      trains on `noise_samples` noisy copies of each input (`x + e`, e ~
      N(0, noise_sigma^2 I)), or of SmoothAdv's adversary, PGD on the
      smoothed soft classifier inside the training attack's L2 ball
      (`tfadv.trainers.noise`). "gaussian" needs no training attack.

    The fast methods take eps, norm, bounds, objective and direction from the
    training attack (its own steps and step size are not used) and scale with
    the warm-up like it. `step_scale` (a variable, 1 by default, not saved with
    the model) multiplies their step; `CatastrophicOverfittingGuard` lowers it.

    Args:
        attack: the training attack (a tfadv `Attack` or its serialised dict),
            or None.
        eval_attack: the validation attack, or None.
        num_classes: classes of the labels (one-hot rows of another width are
            rejected), or None.
        method: how the training adversaries are made (above); the
            subclass's `methods` lists those it accepts.
        fast_step, fast_noise: the fast methods' step and start-noise radius
            as multiples of eps; None: the method's paper default.
        free_replays: replays per batch for "free".
        noise_sigma: the Gaussian noise's standard deviation (input units)
            for "gaussian" and "smoothadv".
        noise_samples: noisy copies of each input per step (m) for them.
        **kwargs: `keras.Model` arguments (name, dtype, ...).

    Raises:
        ValueError: an attack that is neither a tfadv Attack nor its
            serialised dict; a method the subclass does not offer; a fast
            method without a training attack with a positive eps; a negative
            fast_step / fast_noise or free_replays < 1; "gaussian" or
            "smoothadv" without noise_sigma > 0 or with noise_samples < 1;
            "smoothadv" without an L2 training attack with a positive eps.
    """

    _model_args: tuple = ()
    methods: tuple = ("pgd", *fast.FAST_METHODS)

    def __init__(self, *, attack=None, eval_attack=None, num_classes=None, method="pgd",
                 fast_step=None, fast_noise=None, free_replays=fast.FREE_REPLAYS,
                 noise_sigma=None, noise_samples=noise.NOISE_SAMPLES, **kwargs):
        super().__init__(**kwargs)
        self.attack = _as_attack(attack)
        self.eval_attack = _as_attack(eval_attack)
        self.num_classes = None if num_classes is None else int(num_classes)
        if method not in self.methods:
            raise ValueError(f"Expected method to be one of {self.methods}. "
                             f"Received: method={method!r}")
        self.method = method
        if method in fast.FAST_METHODS and not getattr(self.attack, "eps", None):
            raise ValueError(
                f'method="{method}" takes its threat model (eps, norm, bounds) from the '
                "training attack: pass one with a positive eps, e.g. "
                "attack=tfadv.attacks.PGD(eps=0.3).")
        defaults = fast.DEFAULTS.get(method, {})
        for name, value in (("fast_step", fast_step), ("fast_noise", fast_noise)):
            if value is not None and not float(value) >= 0:
                raise ValueError(f"Expected {name} >= 0. Received: {name}={value}")
        self.fast_step = float(defaults.get("fast_step", 1.0) if fast_step is None
                               else fast_step)
        self.fast_noise = float(defaults.get("fast_noise", 0.0) if fast_noise is None
                                else fast_noise)
        if int(free_replays) != free_replays or int(free_replays) < 1:
            raise ValueError(f"Expected free_replays >= 1. Received: {free_replays}")
        self.free_replays = int(free_replays)
        self.noise_sigma, self.noise_samples = noise.check_settings(
            method, self.attack, noise_sigma, noise_samples)
        # Fraction of the training attack's budget in use; EpsilonWarmup ramps it.
        self.eps_fraction = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="eps_fraction", dtype="float32"
        )
        # Multiplies the fast methods' step; CatastrophicOverfittingGuard lowers it
        # (and keeps it in its own state file: not a saved weight, so that the
        # save format of the trainers is unchanged).
        object.__setattr__(self, "step_scale", tf.Variable(1.0, trainable=False,
                                                           name="step_scale"))
        object.__setattr__(self, "_carried", None)

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

    def inner_max(self, model, x, target, *, objective=None):
        """The training adversaries of this step, by `method` (see the class docstring).

        Args:
            model: callable x -> outputs to attack.
            x: `[N, ...]` inputs; target: labels or reference outputs for the
                objective.
            objective: overrides the training attack's objective.

        Returns:
            `x_adv` like x, no gradient attached; x itself for "free" (its
            replays perturb inside `train_step`); `[noise_samples * N, ...]`
            noisy inputs for "gaussian" and "smoothadv".
        """
        budget = self._budget()
        if self.method == "free":
            return x
        if self.method == "gaussian":
            return noise.noisy_copies(x, self.noise_sigma, self.noise_samples)
        if self.method == "smoothadv":
            return noise.smoothadv_adversary(self.attack, model, x, target,
                                             sigma=self.noise_sigma,
                                             copies=self.noise_samples, eps=budget)
        if self.method not in fast.ONE_STEP_METHODS:
            return self.attack(model, x, target, objective=objective, eps=budget)
        attack = self.attack
        objective = objectives_lib.get(attack.objective if objective is None else objective)
        step = self.fast_step * budget * tf.cast(self.step_scale, budget.dtype)
        return fast.one_step_adversary(
            model, x, attack.prepare_target(target, objective), objective, eps=budget,
            step_size=step, noise=self.fast_noise * budget, norm=attack.norm,
            bounds=attack.bounds, project=fast.DEFAULTS[self.method]["project"],
            direction=-1.0 if attack.targeted else 1.0)

    # -- ensemble adversarial training ---------------------------------------
    def _set_static_models(self, static_models, *, count_always=False):
        """Keeps frozen static models and the batch counter that rotates the sources.

        Ensemble adversarial training (Tramer et al., ICLR 2018): batch k's
        adversaries come from source `k mod (1 + len(static_models))`, the
        model being trained first, then each static model. The counter is a
        saved weight, created only when there are static models (or
        `count_always`, for trainers whose save format has always had it).
        """
        self.static_models = list(static_models or ())
        for m in self.static_models:
            if not isinstance(m, keras.Model):
                raise ValueError(f"Expected static_models to be Keras models. "
                                 f"Received: {type(m).__name__}")
            m.trainable = False
        self._batch = None
        if self.static_models or count_always:
            # Every replica counts the same global batches.
            self._batch = self.add_weight(name="batch_counter", shape=(), dtype="int64",
                                          initializer="zeros", trainable=False,
                                          aggregation="only_first_replica")

    def from_sources(self, craft):
        """`craft(model)` on this batch's source: the trained network or a static model.

        Args:
            craft: `model -> x_adv`, called with `self.network` or a static model.

        Returns:
            This batch's adversaries (the counter advances after they are made).
        """
        sources = [self.network] + self.static_models
        if len(sources) == 1:
            x_adv = craft(self.network)
        else:
            index = tf.cast(self._batch % len(sources), tf.int32)
            x_adv = tf.switch_case(index, [lambda m=m: craft(m) for m in sources])
        return x_adv

    def count_batch(self, after):
        """Advances the source counter once `after` (this batch's adversaries) is computed."""
        if self._batch is None:
            return
        # After the read that chose this batch's source model (see train_step).
        with tf.control_dependencies(tf.nest.flatten(after)):
            self._batch.assign_add(1)

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
        if self.method == "free":
            # apply_gradients as looked up here (tests may replace it).
            return fast.free_train_step(self, batch, apply_gradients)
        prepared = self.prepare_batch(batch)
        batch = self._noisy_batch(batch)
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

    @property
    def noise_copies(self) -> int:
        """Training inputs per example and step: `noise_samples` for the noise methods, else 1."""
        return self.noise_samples if self.method in noise.NOISE_METHODS else 1

    def _noisy_batch(self, batch):
        """The batch repeated `noise_copies` times (copy-major), to match the noise
        methods' `[m * N]` training inputs."""
        m = self.noise_copies
        if m == 1:
            return batch
        return Batch(*(noise.repeat_rows(t, m) for t in batch[:5]), size=batch.size * m)

    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """`keras.Model.fit`; for method "free" it first sizes the carried perturbation.

        The perturbation that "free" carries between batches needs a fixed
        shape under XLA; its rows are the first batch's (per replica), read
        from a `tf.data.Dataset` (one element), or `batch_size` for arrays.
        """
        if self.method == "free" and self._carried is None:
            rows = fast.batch_rows(x, batch_size)
            shape = getattr(self.network, "input_shape", None)
            if rows and shape is not None and None not in tuple(shape[1:]):
                replicas = self.distribute_strategy.num_replicas_in_sync
                with self.distribute_strategy.scope():
                    carried = fast.CarriedPerturbation(-(-rows // replicas), tuple(shape[1:]))
                object.__setattr__(self, "_carried", carried)
        return super().fit(x, y, batch_size, *args, **kwargs)

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
            value = getattr(self, name)
            if name == "static_models" and not value:
                continue  # as configs were written before static models existed
            config[name] = _serialize_models(value)
        config.update(
            attack=None if self.attack is None else serialize(self.attack),
            eval_attack=None if self.eval_attack is None else serialize(self.eval_attack),
            method=self.method,
        )
        if self.method in fast.FAST_METHODS:
            config.update(fast_step=self.fast_step, fast_noise=self.fast_noise,
                          free_replays=self.free_replays)
        if self.method in noise.NOISE_METHODS:
            config.update(noise_sigma=self.noise_sigma, noise_samples=self.noise_samples)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for name in cls._model_args:
            if name in config:
                config[name] = _deserialize_models(config[name], custom_objects)
        return cls(**config)
