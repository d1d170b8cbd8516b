"""Sample and class weights reach every loss term and every centre update.

A zero-weight example must change nothing: the batches [A, B] and [A, C]
with weights [1, 0] give the same step, for every method, with and without
center loss, in both trainers.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tests.conftest import tiny_embedder, tiny_feature_net
from tfadv.attacks import PGD, dodging_pgd
from tfadv.config import CenterLossConfig
from tfadv.layers import ClassCenters
from tfadv.losses import global_batch_mean
from tfadv.models import feature_model
from tfadv.trainers import EmbeddingAdversarialModel

RNG = np.random.default_rng(0)
# A and C are class 0, B is class 1: C must not pull class 0's centre, and
# B must not move class 1's.
X_ADV = RNG.uniform(0.1, 0.9, (3, 6, 6, 1)).astype("float32")
Y_ADV = np.array([0, 1, 0])
X_EMB = np.stack([RNG.uniform(0, 60, (8, 8, 3)) + 50 * k for k in (0, 1, 0)]).astype("float32")
Y_EMB = Y_ADV
C0 = np.array([[0.3, -0.2, 0.1], [-0.4, 0.2, 0.5], [0.1, 0.1, 0.1]], np.float32)


METHODS = {
    "standard": dict(method="standard"),
    "pgd": dict(method="pgd"),
    "pgd_mix": dict(method="pgd", adv_ratio=0.5),
    "trades": dict(method="trades"),
}
CENTERS = {
    "none": None,
    "learned_both": dict(on="both", centers="learned"),
    "inverse_clean": dict(on="clean", centers="inverse_batch"),
}


def adversarial_model(method, center):
    kwargs = dict(METHODS[method])
    # TRADES needs a random start (zero KL gradient at x); the seed fixes it.
    attack = PGD(eps=0.1, step_size=0.05, steps=2, random_start=method == "trades")
    if kwargs["method"] != "standard":
        kwargs["attack"] = attack
    if CENTERS[center] is not None:
        kwargs["center_loss"] = CenterLossConfig(
            num_classes=3, weight=0.5, alpha=0.5, inverse_eps=0.1, inverse_step_size=0.05,
            inverse_steps=2, **CENTERS[center])
    base = tiny_feature_net()
    model = tfadv.AdversarialModel(base, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if model.center_cfg is not None:
        model.centers.centers.assign(C0)
    return model


def adversarial_state(model):
    state = model.base.get_weights()
    if model.center_cfg is not None:
        state.append(model.centers.centers.numpy())
    return state


def embedding_model(center_weight, attack_on):
    e, teacher = tiny_embedder(8, 3, seed=3), tiny_embedder(8, 3, seed=4)
    if attack_on == "embedding":
        attack = dodging_pgd(eps=8.0, steps=2)
    else:
        attack = PGD(eps=8.0, step_size=4.0, steps=2, random_start=False, bounds=(0, 255))
    model = EmbeddingAdversarialModel(e, 3, attack=attack, attack_on=attack_on,
                                      center_weight=center_weight, teacher=teacher,
                                      distill_weight=0.5, eval_threshold=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.build((None, 8, 8, 3))
    if model.centers is not None:
        model.centers.centers.assign(C0)
    return model


def embedding_state(model):
    state = [v.numpy() for v in model.trainable_variables]
    if model.centers is not None:
        state.append(model.centers.centers.numpy())
    return state


def one_step(make, state, x, y, **fit_kwargs):
    keras.utils.set_random_seed(0)
    model = make()
    before = state(model)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **fit_kwargs)
    return before, state(model)


def relative_difference(before, a, b):
    moved = max(np.abs(s - t).max() for s, t in zip(a, before))
    assert moved > 1e-4  # the step did something
    return max(np.abs(s - t).max() for s, t in zip(a, b)) / moved


def assert_zero_weight_changes_nothing(make, state, x, y):
    ab, ac = [0, 1], [0, 2]
    w = np.array([1.0, 0.0], np.float32)
    before, after_ab = one_step(make, state, x[ab], y[ab], sample_weight=w)
    _, after_ac = one_step(make, state, x[ac], y[ac], sample_weight=w)
    assert relative_difference(before, after_ab, after_ac) < 1e-5


@pytest.mark.parametrize("center", sorted(CENTERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_adversarial_model_zero_weight_example_changes_nothing(method, center):
    assert_zero_weight_changes_nothing(lambda: adversarial_model(method, center),
                                       adversarial_state, X_ADV, Y_ADV)


@pytest.mark.parametrize("attack_on", ["embedding", "classification"])
@pytest.mark.parametrize("center_weight", [0.0, 0.5])
def test_embedding_trainer_zero_weight_example_changes_nothing(center_weight, attack_on):
    assert_zero_weight_changes_nothing(lambda: embedding_model(center_weight, attack_on),
                                       embedding_state, X_EMB, Y_EMB)


def test_class_weight_equals_the_sample_weights_it_stands_for():
    ab = [0, 1]
    class_weight = {0: 1.0, 1: 0.0, 2: 1.0}
    w = np.array([1.0, 0.0], np.float32)
    for make, state, x, y in (
        (lambda: adversarial_model("trades", "learned_both"), adversarial_state, X_ADV, Y_ADV),
        (lambda: embedding_model(0.5, "embedding"), embedding_state, X_EMB, Y_EMB),
    ):
        before, by_class = one_step(make, state, x[ab], y[ab], class_weight=class_weight)
        _, by_sample = one_step(make, state, x[ab], y[ab], sample_weight=w)
        _, unweighted = one_step(make, state, x[ab], y[ab])
        assert relative_difference(before, by_class, by_sample) < 1e-6
        assert relative_difference(before, by_class, unweighted) > 1e-2


def numpy_weighted_update(c, f, y, w, alpha):
    new = c.copy()
    for j in range(len(c)):
        m = (y == j).astype(np.float64) * w
        delta = (m[:, None] * (c[j] - f)).sum(0) / (1 + m.sum())
        new[j] = c[j] - alpha * delta
    return new


def test_weighted_centre_update_matches_numpy():
    layer = ClassCenters(4, 2, alpha=0.5)
    c0 = np.array([[0, 0], [1, 1], [2, -1], [5, 5]], np.float32)
    layer.centers.assign(c0)
    f = np.array([[1, 0], [0, 2], [3, 3], [1, 1], [2, 0]], np.float32)
    y = np.array([0, 0, 1, 2, 3])
    w = np.array([0.5, 2.0, 1.0, 0.0, 0.0], np.float32)  # class 2 and 3: weight 0 only
    layer.update(tf.constant(f), tf.constant(y), sample_weight=tf.constant(w))
    got = layer.centers.numpy()
    np.testing.assert_allclose(got, numpy_weighted_update(c0, f, y, w, 0.5), atol=1e-6)
    np.testing.assert_array_equal(got[2:], c0[2:])
    # Weights of 1 are the paper's rule.
    layer.centers.assign(c0)
    layer.update(tf.constant(f), tf.constant(y), sample_weight=tf.ones(5))
    np.testing.assert_allclose(layer.centers.numpy(),
                               numpy_weighted_update(c0, f, y, np.ones(5), 0.5), atol=1e-6)


def test_weighted_training_step_updates_centres_and_logs_the_weighted_loss():
    x = RNG.uniform(0, 1, (6, 6, 6, 1)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 0])
    w = np.array([1.0, 0.5, 0.0, 2.0, 0.0, 1.0], np.float32)
    model = adversarial_model("standard", "learned_both")
    f0 = feature_model(model.base)(x, training=False).numpy()
    hist = model.fit(x, y, sample_weight=w, batch_size=6, epochs=1, shuffle=False,
                     verbose=0).history
    np.testing.assert_allclose(model.centers.centers.numpy(),
                               numpy_weighted_update(C0, f0, y, w, 0.5), atol=1e-5)
    per_example = 0.5 * np.sum((f0 - C0[y]) ** 2, axis=1)
    assert hist["center_loss"][0] == pytest.approx(np.sum(w * per_example) / np.sum(w), rel=1e-4)


def test_global_batch_mean_is_keras_sum_over_batch_size():
    values = tf.constant([1.0, 2.0, 4.0])
    w = tf.constant([1.0, 0.0, 0.5])
    expected = keras.losses.MeanSquaredError()(tf.zeros((3, 1)), tf.sqrt(values)[:, None],
                                               sample_weight=w)
    assert float(global_batch_mean(values, w)) == pytest.approx(float(expected))
    assert float(global_batch_mean(values, w)) == pytest.approx((1.0 + 2.0) / 3)
    assert float(global_batch_mean(tf.zeros([0]))) == 0.0  # empty: 0, not NaN
    with pytest.raises(ValueError, match=r"\[N\]"):
        global_batch_mean(tf.zeros([2, 2]))
    with pytest.raises(ValueError, match="one sample weight per example"):
        global_batch_mean(values, tf.ones([3, 2]))
