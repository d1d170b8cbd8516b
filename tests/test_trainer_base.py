"""TrainerBase: the Keras plumbing against Keras' own `fit`, the private Keras
hooks it keeps, and the save formats of both trainers."""

import inspect
import io
import json
import os
import tomllib
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
# Keras' private modules whose behaviour tfadv.trainers.base relies on.
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.callbacks import monitor_callback
from packaging.requirements import Requirement

import tfadv
from tests.conftest import tiny_embedder, tiny_feature_net
from tfadv.attacks import PGD, dodging_pgd
from tfadv.config import CenterLossConfig
from tfadv.trainers import EmbeddingAdversarialModel, TrainerBase
from tfadv.trainers import base as base_module
from tfadv.trainers.base import DOWN, UP, MetricGroup, directed_mean

PYPROJECT = os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")
RNG = np.random.default_rng(0)
X = RNG.uniform(0, 1, (8, 6, 6, 1)).astype("float32")
Y = RNG.integers(0, 3, 8)
S = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.25, 3.0], np.float32)


# -- the private Keras hooks ---------------------------------------------------
def test_keras_is_within_the_pin_the_internals_are_checked_for():
    with open(PYPROJECT, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "keras"]
    assert pin.specifier, ("keras needs an upper bound: tfadv.trainers.keras_internals uses "
                           "Keras internals")
    assert any(s.operator == "<" for s in pin.specifier)
    assert keras.__version__ in pin.specifier


def test_keras_internals_are_still_there():
    """Every private Keras hook of tfadv.trainers.keras_internals.

    A failure here after a Keras upgrade means that section must be revisited
    before the pin in pyproject.toml moves."""
    # 1. Monitor callbacks read `_direction` from metrics held in a MetricsList.
    assert issubclass(MetricGroup, keras.metrics.Metric)
    source = inspect.getsource(monitor_callback.MonitorCallback._set_monitor_op)
    assert "MetricsList" in source and "_direction" in source
    # 2. fit/evaluate build through _maybe_symbolic_build, which calls _symbolic_build.
    for method in ("_maybe_symbolic_build", "_symbolic_build"):
        assert callable(getattr(keras.Model, method, None)), method
    params = inspect.signature(TensorFlowTrainer._maybe_symbolic_build).parameters
    assert list(params) == ["self", "iterator", "data_batch"]
    assert "data_batch" in inspect.signature(keras.Model._symbolic_build).parameters
    for method in (TensorFlowTrainer.fit, TensorFlowTrainer.evaluate):
        assert "_maybe_symbolic_build(" in inspect.getsource(method), method.__name__


@pytest.mark.parametrize("monitor,direction", [("val_up_metric", keras.ops.greater),
                                               ("val_down_metric", keras.ops.less)])
def test_monitor_callbacks_read_the_direction(monitor, direction):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.group = MetricGroup([directed_mean("up_metric", UP), directed_mean("down_metric", DOWN)])
    callback = keras.callbacks.EarlyStopping(monitor=monitor)
    callback.set_model(model)
    callback._set_monitor_op()
    assert callback.monitor_op is direction


def test_keras_loss_tracker_is_replaced_by_the_trainers():
    model = tfadv.AdversarialModel(tiny_feature_net(), attack=PGD(eps=0.1, steps=1))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])
    assert model.metrics[0] is model.tracked_metrics and "loss" in model.tracked_metrics
    assert "loss" not in model.metrics_names  # no second, never-updated "loss"
    # Keras' own tracker (what the trainers leave out) is the one named "loss".
    assert "loss" in [m.name for m in keras.Model.metrics.fget(model)]
    hist = model.fit(X, Y, batch_size=4, epochs=1, verbose=0).history
    assert set(hist) == {"loss", "accuracy"}
    model.reset_metrics()
    assert all(float(v) == 0.0 for v in model.get_metrics_result().values())


# -- the base against Keras' own train_step ----------------------------------------
class CleanTrainer(TrainerBase):
    """The smallest trainer: compile()'s loss on the clean batch (Keras' own step)."""

    _model_args = ("net",)

    def __init__(self, net, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self._set_metrics([], name="clean_metrics")
        self._built_if_network_is()

    @property
    def network(self):
        return self.net

    def compute_adversarial_loss(self, batch, prepared):
        y_pred = self.net(batch.x, training=True)
        return self._compiled_loss(batch.y, y_pred, batch.sample_weight), y_pred

    def after_train_step(self, batch, prepared, outputs):
        return batch.x, batch.y, outputs, batch.sample_weight

    def evaluate_batch(self, batch):
        y_pred = self.net(batch.x, training=False)
        loss = self._compiled_loss(batch.y, y_pred, batch.sample_weight, training=False)
        return loss, (batch.x, batch.y, y_pred, batch.sample_weight)


def _fit(model, policy):
    optimizer = keras.optimizers.SGD(0.5)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=64.0)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])
    hist = model.fit(X, Y, sample_weight=S, batch_size=4, epochs=2, shuffle=False, verbose=0,
                     validation_data=(X, Y, S)).history
    return hist


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_base_step_is_keras_own_step(policy):
    """Sample weights, loss scaling and the logged loss and metrics as in Keras' train_step."""
    keras.mixed_precision.set_dtype_policy(policy)
    plain, wrapped = tiny_feature_net(), tiny_feature_net()
    ours = _fit(CleanTrainer(wrapped), policy)
    theirs = _fit(plain, policy)
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=key)
    for a, b in zip(wrapped.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert all(np.all(np.isfinite(w)) for w in wrapped.get_weights())


def test_base_owns_the_budget_and_the_structure():
    net = tiny_feature_net()
    trainer = CleanTrainer(net, attack=PGD(eps=0.2, steps=1))
    assert trainer.built and trainer.eps_fraction.dtype == "float32"
    trainer.eps_fraction.assign(0.25)
    assert float(trainer._budget()) == pytest.approx(0.05)
    assert CleanTrainer(net)._budget() is None  # no training attack
    assert CleanTrainer(net, attack=PGD(eps=0.0))._budget() is None
    np.testing.assert_allclose(trainer.predict(X, verbose=0), net.predict(X, verbose=0))
    assert CleanTrainer(net, attack=dict(class_name="pgd", config=dict(eps=0.1))).attack == PGD(
        eps=0.1)
    with pytest.raises(ValueError, match="Attack or a dict"):
        CleanTrainer(net, eval_attack=object())


def test_apply_gradients_is_looked_up_where_tests_patch_it(monkeypatch):
    calls = []

    def spy(optimizer, grads, variables):
        calls.append(len(variables))
        optimizer.apply(grads, variables)

    monkeypatch.setattr(base_module, "apply_gradients", spy)
    for model in (tfadv.AdversarialModel(tiny_feature_net(), attack=PGD(eps=0.1, steps=1)),
                  EmbeddingAdversarialModel(tiny_embedder(8, 3), 3)):
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True),
                      run_eagerly=True)
        x = X if isinstance(model, tfadv.AdversarialModel) else RNG.uniform(
            0, 255, (8, 8, 8, 3)).astype("float32")
        model.fit(x, Y, batch_size=8, epochs=1, verbose=0)
    assert len(calls) == 2 and all(c > 0 for c in calls)


# -- reproducible steps ---------------------------------------------------------
def _repeat_step(model, x, y, repeats):
    """The weights after one train_on_batch from the same state, `repeats` times,
    each with a newly traced train function (what Grappler makes of a trace varies)."""
    start = [v.numpy() for v in model.variables]
    results = []
    for _ in range(repeats):
        for v, value in zip(model.variables, start):
            v.assign(value)
        model.make_train_function(force=True)
        model.train_on_batch(x, y)
        results.append(np.concatenate([v.numpy().ravel() for v in model.trainable_variables]))
    return results


@pytest.mark.parametrize("trainer", ["inverse_centers", "embedding_centers"])
def test_a_training_step_is_reproducible(trainer):
    """The same step from the same state gives the same weights, bit for bit.

    With inverse-adversary centres the classifier's gradient is ready before
    the centres' reads of the classifier have run; Grappler dropped the
    read-before-update edges, and about one trace in ten updated the
    classifier under the centres' reads (6 and 9 of 60 repeats here; weights
    off by up to 0.06 after two epochs of the replica test)."""
    if trainer == "inverse_centers":
        net = tiny_feature_net()
        cfg = CenterLossConfig(num_classes=3, weight=0.5, inverse_eps=0.1,
                               inverse_step_size=0.05, inverse_steps=2, centers="inverse_batch")
        model = tfadv.AdversarialModel(net, method="standard", center_loss=cfg)
        x, y = X[:4], Y[:4]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        model = EmbeddingAdversarialModel(
            tiny_embedder(8, 3), 3, attack=PGD(eps=8.0, step_size=4.0, steps=2,
                                               random_start=False, bounds=(0, 255)),
            attack_on="classification", center_weight=0.5)
        x, y = RNG.uniform(0, 255, (4, 8, 8, 3)).astype("float32"), Y[:4]
        loss = None
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    results = _repeat_step(model, x, y, 40)
    differ = sum(not np.array_equal(r, results[0]) for r in results)
    assert differ == 0, f"{differ} of 40 repeats of one step gave other weights"


# -- save formats ---------------------------------------------------------------
def _weight_groups(path):
    with zipfile.ZipFile(path) as archive:
        f = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        return sorted(k for k in f.keys()), f["vars"].keys()


def test_adversarial_model_save_format_is_unchanged(tmp_path):
    """The layout earlier releases wrote: the config keys, `base`, `centers`, and
    eps_fraction as the model's only own variable."""
    cfg = CenterLossConfig(num_classes=3)
    model = tfadv.AdversarialModel(tiny_feature_net(), attack=PGD(eps=0.1, steps=1),
                                   method="trades", center_loss=cfg)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(X, Y, epochs=1, verbose=0)
    config = model.get_config()
    assert {"name", "trainable", "dtype", "base", "attack", "method", "adv_ratio", "trades_beta",
            "eval_attack", "center_loss"} == set(config)
    path = str(tmp_path / "m.keras")
    model.save(path)
    groups, own = _weight_groups(path)
    assert {"base", "centers", "optimizer", "vars"} <= set(groups)
    assert list(own) == ["0"]  # eps_fraction
    # A config as earlier releases wrote it (no new keys) still builds the model.
    old = json.loads(json.dumps(config))
    again = tfadv.AdversarialModel.from_config(old)
    assert again.method == "trades" and again.center_cfg == model.center_cfg


def test_embedding_trainer_round_trips(tmp_path):
    e, teacher = tiny_embedder(8, 4), tiny_embedder(8, 4, seed=5)
    static = tiny_embedder(8, 4, seed=9)
    model = EmbeddingAdversarialModel(
        e, 3, attack=dodging_pgd(eps=4.0, steps=1), adv_weight=0.3, center_weight=0.2,
        center_alpha=0.4, teacher=teacher, distill_weight=0.5, static_models=[static],
        head_scale=8.0, eval_attack=dodging_pgd(eps=4.0, steps=1), eval_threshold=0.6,
        consistency_target="teacher")
    model.compile(optimizer="adam")
    x = RNG.uniform(0, 255, (6, 8, 8, 3)).astype("float32")
    model.fit(x, Y[:6], epochs=1, verbose=0)
    model.eps_fraction.assign(0.5)
    path = str(tmp_path / "embedding.keras")
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(again, EmbeddingAdversarialModel)
    models = ("embedder", "teacher", "static_models")
    scalars = {k: v for k, v in model.get_config().items() if k not in models}
    assert {k: v for k, v in again.get_config().items() if k not in models} == json.loads(
        json.dumps(scalars))
    for a, b in zip(again.teacher.get_weights() + again.static_models[0].get_weights(),
                    teacher.get_weights() + static.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert again.attack == model.attack and again.eval_attack == model.eval_attack
    assert not again.teacher.trainable and not again.static_models[0].trainable
    assert float(again.eps_fraction.numpy()) == 0.5
    np.testing.assert_array_equal(again.centers.centers.numpy(), model.centers.centers.numpy())
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    again.fit(x, Y[:6], epochs=1, verbose=0)  # the optimizer state came back too


def test_trainers_report_their_hooks_only():
    """Both trainers are TrainerBase subclasses; the step itself is not theirs."""
    for cls in (tfadv.AdversarialModel, EmbeddingAdversarialModel):
        assert issubclass(cls, TrainerBase)
        for name in ("train_step", "test_step", "metrics", "_budget", "build"):
            assert name not in vars(cls), (cls.__name__, name)
    assert tf.is_tensor(tfadv.AdversarialModel(tiny_feature_net(), attack=PGD(eps=0.1))._budget())
