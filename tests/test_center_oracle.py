"""Inverse-batch centres (`centers="inverse_batch"`) against a NumPy reference.

The centre of class j is the weighted mean of the features of the batch's
inverse adversaries of class j,

    c_j = sum_i s_i [y_i = j] f(x_inv_i) / sum_i s_i [y_i = j]     (0 when the sum is 0),

with x_inv from `InversePGD` (deterministic: no random start). The step then
minimises CE + weight * sum_i s_i 1/2 ||f(x_i) - c_{y_i}||^2 / N with the
centres held constant; the post-step weights (SGD) are compared with a
finite-difference gradient of that loss computed in float64 NumPy.
"""

import keras
import numpy as np
import pytest

import tfadv
from tfadv.attacks import PGD, InversePGD
from tests.conftest import finite_difference_grads as fd_grads, tiny_feature_net

NUM_CLASSES, LR, WEIGHT = 3, 0.2, 0.7
INV = dict(inverse_eps=0.1, inverse_step_size=0.04, inverse_steps=3)
ADV = PGD(eps=0.08, step_size=0.04, steps=2, random_start=False)


def data():
    rng = np.random.default_rng(5)
    x = rng.uniform(0.1, 0.9, size=(8, 6, 6, 1)).astype(np.float32)
    # Class 2 appears only with weight 0: its centre is 0 and it adds nothing.
    y = np.array([0, 1, 0, 1, 2, 0, 1, 0], np.int64)
    s = np.array([1.0, 0.5, 2.0, 1.0, 0.0, 0.0, 1.5, 0.25], np.float32)
    return x, y, s


def forward(weights, x):
    """(logits, features) of `tiny_feature_net` in float64."""
    k1, b1, k2, b2, k3, b3 = (w.astype(np.float64) for w in weights)
    h = np.tanh(x.reshape(len(x), -1).astype(np.float64) @ k1 + b1)
    f = np.tanh(h @ k2 + b2)
    return f @ k3 + b3, f


def numpy_centers(f_inv, y, s):
    sums = np.zeros((NUM_CLASSES, f_inv.shape[1]))
    counts = np.zeros(NUM_CLASSES)
    np.add.at(sums, y, s[:, None] * f_inv)
    np.add.at(counts, y, s)
    return np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def total_loss(weights, inputs, ce_w, labels, feats_of, center_w, centers_y):
    logits, f = forward(weights, inputs)
    ce = -log_softmax(logits)[np.arange(len(labels)), labels]
    f = feats_of(f)
    cl = 0.5 * np.sum((f - centers_y) ** 2, 1)
    return np.sum(ce_w * ce) / len(ce) + WEIGHT * np.sum(center_w * cl) / len(cl), cl


def make(method, on):
    base = tiny_feature_net()
    cfg = tfadv.CenterLossConfig(weight=WEIGHT, on=on, centers="inverse_batch",
                                 num_classes=NUM_CLASSES, **INV)
    kwargs = dict(attack=ADV) if method == "pgd" else {}
    model = tfadv.AdversarialModel(base, method=method, center_loss=cfg, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return base, model


def reference_centers(base, x, y, s):
    x_inv = InversePGD(eps=INV["inverse_eps"], step_size=INV["inverse_step_size"],
                       steps=INV["inverse_steps"])(base, x, y).numpy()
    _, f_inv = forward(base.get_weights(), x_inv)
    return x_inv, numpy_centers(f_inv, y, s)


def test_inverse_adversaries_move_and_lower_the_loss():
    base = tiny_feature_net()
    x, y, _ = data()
    x_inv, _ = reference_centers(base, x, y, np.ones(len(x)))
    assert np.abs(x_inv - x).max() == pytest.approx(INV["inverse_eps"], abs=1e-6)
    ce = lambda v: -log_softmax(forward(base.get_weights(), v)[0])[np.arange(len(y)), y]
    assert np.all(ce(x_inv) < ce(x))


@pytest.mark.parametrize("weighted", [False, True])
def test_batch_centers_are_weighted_class_means_of_inverse_features(weighted):
    base, model = make("standard", "clean")
    x, y, s = data()
    sw = s if weighted else np.ones(len(x), np.float32)
    _, centers = reference_centers(base, x, y, sw)
    got = model._batch_centers(x, y, sw if weighted else None).numpy()
    np.testing.assert_allclose(got, centers[y], atol=1e-6)
    if weighted:
        np.testing.assert_array_equal(got[y == 2], 0.0)


@pytest.mark.parametrize("method, on", [("standard", "clean"), ("pgd", "both"),
                                        ("pgd", "adversarial")])
def test_step_with_inverse_batch_centres_matches_numpy(method, on):
    base, model = make(method, on)
    x, y, s = data()
    w0 = base.get_weights()
    _, centers = reference_centers(base, x, y, s.astype(np.float64))
    n = len(x)
    if method == "standard":
        inputs, ce_w, feats_of, center_w, cy = x, s, lambda f: f, s, centers[y]
    else:
        x_adv = ADV(base, x, y).numpy()
        inputs = np.concatenate([x, x_adv])
        ce_w = np.concatenate([0.0 * s, 2.0 * s])
        if on == "both":
            feats_of, center_w, cy = (lambda f: f), np.concatenate([s, s]), centers[
                np.concatenate([y, y])]
        else:
            feats_of, center_w, cy = (lambda f: f[n:]), s, centers[y]
    labels = np.concatenate([y] * (len(inputs) // n))

    def fn(weights):
        return total_loss(weights, inputs, ce_w, labels, feats_of, center_w, cy)[0]

    expected_loss, cl = total_loss(w0, inputs, ce_w, labels, feats_of, center_w, cy)
    grads = fd_grads(w0, fn)
    history = model.fit(x, y, sample_weight=s, batch_size=n, epochs=1, shuffle=False, verbose=0)
    for got, w, g in zip(base.get_weights(), w0, grads):
        np.testing.assert_allclose(got, w - LR * g, atol=2e-6)
    np.testing.assert_allclose(history.history["loss"][0], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(history.history["center_loss"][0],
                               np.sum(center_w * cl) / np.sum(center_w), rtol=1e-5)
