"""`tfadv.losses` as plain functions: closed forms, and a hand-written
`tf.GradientTape` loop that takes the same step as the trainers' `fit`.

The trainers compute their losses with these functions; a custom training
loop that calls them (with the same adversaries and sample weights) must
therefore move the weights exactly as one step of `model.fit`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tests.conftest import tiny_feature_net
from tfadv.attacks import FGSM, PGD
from tfadv.attacks.base import Attack
from tfadv.attacks.objectives import kl_divergence
from tfadv.config import CenterLossConfig
from tfadv.layers import ClassCenters, CosineClassifier
from tfadv.losses import (adversarial_loss, center_loss, consistency_loss, cross_entropy_loss,
                          global_batch_mean, trades_loss)
from tfadv.models.features import logits_and_features
from tfadv.trainers import EmbeddingAdversarialModel

RNG = np.random.default_rng(3)
W = RNG.normal(size=(4, 3)).astype(np.float32)
B = RNG.normal(scale=0.1, size=3).astype(np.float32)
X = RNG.uniform(0.2, 0.8, (5, 4)).astype(np.float32)
Y = np.array([0, 1, 2, 1, 0])
S = np.array([1.0, 0.5, 2.0, 0.0, 1.5], np.float32)
EPS, LR = 0.1, 0.5
N = len(X)


def linear_model():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, kernel_initializer=keras.initializers.Constant(W),
                           bias_initializer=keras.initializers.Constant(B)),
    ])


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def ce(z, y):
    return -log_softmax(z.astype(np.float64))[np.arange(len(y)), y]


class FixedShift(Attack):
    """A deterministic perturbation: the same adversaries in `fit` and in a custom loop."""

    name = "fixed_shift_for_tests"

    def perturb(self, model, x, y, objective, scale):
        return tf.clip_by_value(x + self.eps * scale * tf.sin(40.0 * x), 0.0, 1.0)


def sgd_step(variables, loss_fn):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    keras.optimizers.SGD(LR).apply(tape.gradient(loss, variables), variables)
    return float(loss)


# -- closed forms ----------------------------------------------------------
@pytest.mark.parametrize("r", [0.0, 0.3, 1.0])
def test_adversarial_loss_is_the_weighted_mix(r):
    z, u = RNG.normal(size=(N, 3)), RNG.normal(size=(N, 3))
    got = adversarial_loss(Y, z if r < 1 else None, u if r > 0 else None, adv_ratio=r,
                           sample_weight=S)
    s = S.astype(np.float64)
    want = (1 - r) * np.sum(s * ce(z, Y)) / N + r * np.sum(s * ce(u, Y)) / N
    assert got.dtype == tf.float32
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_adversarial_loss_takes_any_reduced_loss():
    z, u = RNG.normal(size=(N, 3)), RNG.normal(size=(N, 3))
    keras_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    got = adversarial_loss(Y, z, u, adv_ratio=0.25, sample_weight=S,
                           loss_fn=lambda y, p, w: keras_ce(y, p, sample_weight=w))
    want = adversarial_loss(Y, z, u, adv_ratio=0.25, sample_weight=S)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    onehot = np.eye(3, dtype=np.float32)[Y]
    assert float(cross_entropy_loss(onehot, z, S)) == pytest.approx(
        float(cross_entropy_loss(Y, z, S)), rel=1e-6)


def test_trades_loss_is_ce_plus_beta_kl():
    z, u = RNG.normal(size=(N, 3)), RNG.normal(size=(N, 3))
    p, log_q = np.exp(log_softmax(z)), log_softmax(u)
    kl = np.sum(p * (np.log(p) - log_q), 1)
    s = S.astype(np.float64)
    want = np.sum(s * ce(z, Y)) / N + 6.0 * np.sum(s * kl) / N
    assert float(trades_loss(Y, z, u, beta=6.0, sample_weight=S)) == pytest.approx(want, rel=1e-5)
    assert float(trades_loss(Y, z, z, beta=6.0)) == pytest.approx(np.mean(ce(z, Y)), rel=1e-5)


def test_consistency_and_center_loss_per_example():
    a, b = RNG.normal(size=(N, 3)), RNG.normal(size=(N, 3))
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(consistency_loss(a, b).numpy(), 1 - cos, rtol=1e-5)
    np.testing.assert_allclose(consistency_loss(a, 3 * a).numpy(), 0.0, atol=1e-6)
    got = center_loss(tf.constant(a, tf.float16), b)
    assert got.dtype == tf.float32 and got.shape == (N,)
    np.testing.assert_allclose(got.numpy(), 0.5 * np.sum((a.astype(np.float16) - b) ** 2, 1),
                               rtol=1e-3)


def test_bad_arguments_are_explained():
    z = np.zeros((N, 3), np.float32)
    with pytest.raises(ValueError, match="adv_ratio"):
        adversarial_loss(Y, z, z, adv_ratio=1.5)
    with pytest.raises(ValueError, match="adv_ratio"):
        adversarial_loss(Y, z, z, adv_ratio=tf.constant(0.5))
    with pytest.raises(ValueError, match="needs adversarial_logits"):
        adversarial_loss(Y, z, None, adv_ratio=0.5)
    with pytest.raises(ValueError, match="clean logits"):
        adversarial_loss(Y, None, z, adv_ratio=0.5)
    with pytest.raises(ValueError, match="beta"):
        trades_loss(Y, z, z, beta=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        center_loss(tf.zeros((N, 3)), tf.zeros((N, 2)))
    with pytest.raises(ValueError, match="2 classes|classes"):
        cross_entropy_loss(Y * 0, np.zeros((N, 1), np.float32))


# -- a custom training loop takes the step of model.fit ---------------------
def fit_one_step(model, x, y, **compile_kwargs):
    model.compile(optimizer=keras.optimizers.SGD(LR), **compile_kwargs)
    return model.fit(x, y, sample_weight=S, batch_size=len(x), epochs=1, shuffle=False,
                     verbose=0).history["loss"][0]


def assert_same_weights(got, want):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_custom_loop_matches_fit_for_the_madry_mix():
    attack = PGD(eps=EPS, step_size=EPS, steps=1, random_start=False)
    trained = linear_model()
    logged = fit_one_step(tfadv.AdversarialModel(trained, attack=attack, adv_ratio=0.3), X, Y,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    base = linear_model()
    x_adv = attack(base, X, Y)

    def loss():
        logits = base(tf.concat([X, x_adv], 0), training=True)
        return adversarial_loss(Y, logits[:N], logits[N:], adv_ratio=0.3, sample_weight=S)

    assert sgd_step(base.trainable_variables, loss) == pytest.approx(logged, rel=1e-6)
    assert_same_weights(base.get_weights(), trained.get_weights())


def test_custom_loop_matches_fit_for_trades():
    attack = FixedShift(eps=EPS)
    trained = linear_model()
    logged = fit_one_step(
        tfadv.AdversarialModel(trained, attack=attack, method="trades", trades_beta=3.0), X, Y,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    base = linear_model()
    probs = tf.nn.softmax(base(X, training=False))
    x_adv = attack(base, X, probs, objective=kl_divergence)

    def loss():
        logits = base(tf.concat([X, x_adv], 0), training=True)
        return trades_loss(Y, logits[:N], logits[N:], beta=3.0, sample_weight=S)

    assert sgd_step(base.trainable_variables, loss) == pytest.approx(logged, rel=1e-6)
    assert_same_weights(base.get_weights(), trained.get_weights())


def test_custom_loop_matches_fit_with_center_loss():
    x = RNG.uniform(0.1, 0.9, (N, 6, 6, 1)).astype(np.float32)
    c0 = RNG.normal(scale=0.3, size=(3, 3)).astype(np.float32)
    attack = PGD(eps=EPS, step_size=EPS, steps=1, random_start=False)
    trained = tiny_feature_net()
    model = tfadv.AdversarialModel(
        trained, attack=attack, adv_ratio=0.5,
        center_loss=CenterLossConfig(num_classes=3, weight=0.2, alpha=0.5, on="both"))
    model.centers.centers.assign(c0)
    logged = fit_one_step(model, x, Y,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    base = tiny_feature_net()
    both = logits_and_features(base, "features")
    centers = ClassCenters(3, 3, alpha=0.5)
    centers.centers.assign(c0)
    x_adv = attack(base, x, Y)
    y2, s2 = np.concatenate([Y, Y]), np.concatenate([S, S])
    centers_y = centers(y2)

    def loss():
        logits, features = both(tf.concat([x, x_adv], 0), training=True)
        loss.features = features
        return (adversarial_loss(Y, logits[:N], logits[N:], adv_ratio=0.5, sample_weight=S)
                + 0.2 * global_batch_mean(center_loss(features, centers_y), s2))

    assert sgd_step(base.trainable_variables, loss) == pytest.approx(logged, rel=1e-6)
    centers.update(loss.features, y2, sample_weight=s2)
    assert_same_weights(base.get_weights(), trained.get_weights())
    np.testing.assert_allclose(centers.centers.numpy(), model.centers.centers.numpy(), atol=1e-6)


def linear_embedder(seed):
    rng = np.random.default_rng(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, kernel_initializer=keras.initializers.Constant(
            rng.normal(size=(4, 3)).astype(np.float32))),
        keras.layers.UnitNormalization(),
    ])


def test_custom_loop_matches_fit_for_the_embedding_trainer():
    terms = dict(adv_weight=0.4, ce_weight=0.7, consistency_weight=0.6, center_weight=0.3,
                 distill_weight=0.5)
    attack = FGSM(eps=EPS)
    h0 = np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)
    c0 = np.random.default_rng(6).normal(scale=0.3, size=(3, 3)).astype(np.float32)
    trained = linear_embedder(1)
    model = EmbeddingAdversarialModel(trained, 3, attack=attack, attack_on="classification",
                                      teacher=linear_embedder(2), head_scale=4.0, **terms)
    model.head.set_weights([h0])
    model.centers.centers.assign(c0)
    logged = fit_one_step(model, X, Y)

    embedder, teacher = linear_embedder(1), linear_embedder(2)
    head = CosineClassifier(3, scale=4.0)
    head.build((None, 3))
    head.set_weights([h0])
    centers = ClassCenters(3, 3, alpha=0.5)
    centers.centers.assign(c0)
    x_adv = attack(lambda t: head(embedder(t, training=False)), X, Y)
    target = teacher(X, training=False)

    def mean(values):
        return global_batch_mean(values, S)

    def loss():
        e = embedder(tf.concat([X, x_adv], 0), training=True)
        e_clean, e_adv = e[:N], e[N:]
        logits = head(e)
        loss.e_adv = e_adv
        return (terms["ce_weight"] * adversarial_loss(Y, logits[:N], logits[N:],
                                                      adv_ratio=terms["adv_weight"],
                                                      sample_weight=S)
                + terms["consistency_weight"] * mean(consistency_loss(e_adv, e_clean))
                + terms["center_weight"] * mean(center_loss(e_adv, centers(Y)))
                + terms["distill_weight"] * mean(consistency_loss(e_clean, target)))

    variables = embedder.trainable_variables + head.trainable_variables
    assert sgd_step(variables, loss) == pytest.approx(logged, rel=1e-6)
    centers.update(loss.e_adv, Y, sample_weight=S)
    assert_same_weights(embedder.get_weights() + head.get_weights(),
                        trained.get_weights() + model.head.get_weights())
    np.testing.assert_allclose(centers.centers.numpy(), model.centers.centers.numpy(), atol=1e-6)
