"""Center loss: the update rule, the loss, state handling, and composition with training."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tfadv.config import CenterLossConfig
from tfadv.layers import ClassCenters
from tfadv.losses import center_loss
from tfadv.models import feature_model, mnist_feature_net
from tfadv.trainers.schedules import CyclicLR, sgd_nesterov


def numpy_update(c, f, y, alpha):
    c = c.copy()
    new = c.copy()
    for j in range(len(c)):
        idx = np.flatnonzero(y == j)
        delta = (c[j] - f[idx]).sum(0) / (1 + len(idx))
        new[j] = c[j] - alpha * delta
    return new


def test_update_rule_matches_numpy_and_absent_class_stays():
    layer = ClassCenters(4, 2, alpha=0.5)
    c0 = np.array([[0, 0], [1, 1], [2, -1], [5, 5]], np.float32)
    layer.centers.assign(c0)
    f = np.array([[1, 0], [0, 2], [3, 3], [1, 1], [2, 0]], np.float32)
    y = np.array([0, 0, 1, 2, 2])  # class 3 is absent
    layer.update(tf.constant(f), tf.constant(y))
    got = layer.centers.numpy()
    np.testing.assert_allclose(got, numpy_update(c0, f, y, 0.5), atol=1e-6)
    np.testing.assert_array_equal(got[3], c0[3])
    np.testing.assert_allclose(layer(tf.constant([3, 0])).numpy(), got[[3, 0]])


def test_center_loss_value_and_gradient():
    f = tf.constant([[1.0, 2.0], [0.5, -1.0]])
    c = tf.constant([[0.0, 1.0], [1.0, 1.0]])
    with tf.GradientTape() as tape:
        tape.watch(f)
        loss = tf.reduce_mean(center_loss(f, c))
    np.testing.assert_allclose(loss.numpy(), 0.5 * np.mean([2.0, 4.25]), rtol=1e-6)
    # d/df of mean(1/2 ||f - c||^2) = (f - c) / N
    np.testing.assert_allclose(tape.gradient(loss, f).numpy(), (f - c).numpy() / 2, rtol=1e-6)


def test_bad_center_configs():
    with pytest.raises(ValueError, match="alpha"):
        ClassCenters(3, 2, alpha=2.0)
    with pytest.raises(ValueError, match="on"):
        CenterLossConfig(on="features")
    with pytest.raises(ValueError, match="centers"):
        CenterLossConfig(centers="random")
    with pytest.raises(ValueError, match="no layer named"):
        feature_model(tfadv.models.mnist_cnn())


def _small_data(n=32):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (n, 28, 28, 1)).astype("float32"), rng.integers(0, 10, n)


def _center_model(method="standard", **cfg):
    base = mnist_feature_net(feature_dim=3, arch="small")
    attack = None if method == "standard" else tfadv.attacks.PGD(eps=0.1, steps=2)
    model = tfadv.AdversarialModel(base, attack=attack, method=method,
                                   center_loss=CenterLossConfig(**cfg))
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return base, model


def test_training_step_updates_centres_by_the_rule():
    x, y = _small_data()
    base, model = _center_model(weight=0.1, alpha=0.5)
    c0 = np.random.default_rng(1).normal(size=(10, 3)).astype("float32")
    model.centers.centers.assign(c0)
    f0 = feature_model(base)(x, training=False).numpy()  # features at the pre-step weights
    hist = model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    np.testing.assert_allclose(model.centers.centers.numpy(), numpy_update(c0, f0, y, 0.5),
                               atol=1e-5)
    expected = 0.5 * np.mean(np.sum((f0 - c0[y]) ** 2, axis=1))
    assert hist["center_loss"][0] == pytest.approx(expected, rel=1e-4)


def test_centres_are_state_not_parameters(tmp_path):
    x, y = _small_data()
    base, model = _center_model(method="pgd", on="both")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    ids = {id(v) for v in model.trainable_variables}
    assert id(model.centers.centers) not in ids
    assert any(v is model.centers.centers for v in model.non_trainable_variables)
    before = model.centers.centers.numpy().copy()
    assert np.abs(before).max() > 0  # the fit moved them
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    np.testing.assert_array_equal(model.centers.centers.numpy(), before)
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(again.centers.centers.numpy(), before)
    assert again.center_cfg == model.center_cfg


@pytest.mark.parametrize("method,on,centers", [
    ("pgd", "adversarial", "learned"),
    ("trades", "clean", "learned"),
    ("pgd", "clean", "inverse_batch"),
])
def test_center_loss_composes_with_adversarial_training(method, on, centers):
    x, y = _small_data()
    _, model = _center_model(method=method, on=on, centers=centers, weight=0.5)
    hist = model.fit(x, y, validation_data=(x, y), batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.isfinite(hist["loss"])) and "val_robust_accuracy" in hist
    assert hist["center_loss"][0] > 0


def test_cyclic_lr_shapes_and_round_trip():
    tri = CyclicLR(0.01, total_steps=100, mode="triangular", min_lr=0.001)
    vals = [float(tri(s)) for s in (0, 25, 50, 75, 100)]
    np.testing.assert_allclose(vals, [0.001, 0.0055, 0.01, 0.0055, 0.001], rtol=1e-5)
    one = CyclicLR(0.01, total_steps=100, mode="one_cycle")
    vals = np.array([float(one(s)) for s in range(101)])
    assert vals.argmax() == 30 and vals.max() == pytest.approx(0.01)
    assert vals[0] == pytest.approx(0.0004) and vals[-1] == pytest.approx(1e-6)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(one))
    assert again.get_config() == one.get_config()
    opt = sgd_nesterov(one)
    assert opt.nesterov and opt.momentum == 0.9 and opt.weight_decay == 5e-4
    with pytest.raises(ValueError, match="mode"):
        CyclicLR(0.01, 10, mode="cosine")


def test_centres_use_the_global_batch_under_mirrored_strategy():
    script = os.path.join(os.path.dirname(__file__), "mirrored_centers_check.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["replicas"] == 2
    assert r["max_center_diff"] < 1e-5 and r["centers_moved"] > 1e-3


def test_validation_center_loss_is_real_or_absent():
    """Learned centres: the validation center loss is recomputable from the final
    state. Inverse-adversary centres exist only in a training step: no constant-0
    validation column."""
    x, y = _small_data()
    base, model = _center_model(weight=0.1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    ev = model.evaluate(x, y, verbose=0, return_dict=True)
    f = feature_model(base)(x, training=False).numpy()
    c = model.centers.centers.numpy()
    expected = 0.5 * np.mean(np.sum((f - c[y]) ** 2, axis=1))
    assert ev["center_loss"] == pytest.approx(expected, rel=1e-4)
    _, model = _center_model(method="pgd", centers="inverse_batch")
    hist = model.fit(x, y, validation_data=(x, y), batch_size=16, epochs=1, verbose=0).history
    assert hist["center_loss"][0] > 0 and "val_center_loss" not in hist
