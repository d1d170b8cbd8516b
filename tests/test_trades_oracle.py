"""TRADES on a linear model against a closed-form NumPy gradient.

For logits z = x W + b, clean probabilities p = softmax(z), adversarial
logits u = x_adv W + b and q = softmax(u), the trainer minimises

    L = sum_i s_i CE(z_i, y_i) / N + beta * sum_i s_i KL(p_i || q_i) / N

(s: sample weights, Keras' "sum_over_batch_size" reduction). `x_adv` comes
from the attack with its gradient stopped; the clean probabilities in the KL
are NOT stopped (as in the reference TRADES code), so

    dL/dz_i = s_i / N * [(p_i - onehot_i) + beta * p_i * (a_i - <p_i, a_i>)],
              a_i = log p_i - log q_i
    dL/du_i = s_i / N * beta * (q_i - p_i)
    dL/dW = X^T dL/dz + X_adv^T dL/du,   dL/db = sum_i dL/dz_i + dL/du_i.
"""

import keras
import numpy as np
import pytest

import tfadv
from tfadv.attacks import PGD

W = np.array([[0.5, -0.3, 0.2], [-0.2, 0.8, 0.1], [0.3, 0.1, -0.6], [-0.4, 0.2, 0.5]],
             np.float32)
B = np.array([0.1, -0.1, 0.05], np.float32)
X = np.array([[0.2, 0.7, 0.4, 0.5], [0.6, 0.3, 0.8, 0.2], [0.5, 0.5, 0.3, 0.7],
              [0.3, 0.4, 0.6, 0.6], [0.7, 0.2, 0.5, 0.4]], np.float32)
Y = np.array([0, 1, 2, 1, 0], np.int64)
EPS, LR = 0.1, 0.5


class RecordingPGD(PGD):
    """PGD that keeps what it returned in its last eager call (the trainer's x_adv)."""

    def __call__(self, model, x, y, **kwargs):
        x_adv = super().__call__(model, x, y, **kwargs)
        self.calls = getattr(self, "calls", []) + [(np.asarray(y), x_adv.numpy())]
        return x_adv


def linear_model():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, kernel_initializer=keras.initializers.Constant(W),
                           bias_initializer=keras.initializers.Constant(B)),
    ])


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def trades_loss_and_grads(x, x_adv, y, beta, s, w=W, b=B):
    w, b = w.astype(np.float64), b.astype(np.float64)
    x, x_adv = x.astype(np.float64), x_adv.astype(np.float64)
    n = len(x)
    p, q = softmax(x @ w + b), softmax(x_adv @ w + b)
    onehot = np.eye(w.shape[1])[y]
    ce = -np.log(np.sum(p * onehot, 1))
    a = np.log(p) - np.log(q)
    kl = np.sum(p * a, 1)
    loss = np.sum(s * ce) / n + beta * np.sum(s * kl) / n
    dz = (s / n)[:, None] * ((p - onehot) + beta * p * (a - np.sum(p * a, 1, keepdims=True)))
    du = (s / n)[:, None] * beta * (q - p)
    return loss, x.T @ dz + x_adv.T @ du, dz.sum(0) + du.sum(0)


def numeric_grads(x, x_adv, y, beta, s, h=1e-6):
    """Central differences of the loss in float64, x_adv held fixed."""
    def f(w, b):
        return trades_loss_and_grads(x, x_adv, y, beta, s, w, b)[0]
    w0, b0 = W.astype(np.float64), B.astype(np.float64)
    gw, gb = np.zeros_like(w0), np.zeros_like(b0)
    for idx in np.ndindex(w0.shape):
        d = np.zeros_like(w0)
        d[idx] = h
        gw[idx] = (f(w0 + d, b0) - f(w0 - d, b0)) / (2 * h)
    for j in range(len(b0)):
        d = np.zeros_like(b0)
        d[j] = h
        gb[j] = (f(w0, b0 + d) - f(w0, b0 - d)) / (2 * h)
    return gw, gb


def one_trades_step(attack, beta, sample_weight=None):
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=attack, method="trades", trades_beta=beta)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    history = model.fit(X, Y, sample_weight=sample_weight, batch_size=len(X), epochs=1,
                        shuffle=False, verbose=0)
    w, b = base.get_weights()
    return w, b, history.history["loss"][0]


def test_closed_form_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    x_adv = X + rng.uniform(-EPS, EPS, X.shape).astype(np.float32)
    s = np.array([1.0, 0.5, 2.0, 0.0, 1.5])
    _, gw, gb = trades_loss_and_grads(X, x_adv, Y, 6.0, s)
    nw, nb = numeric_grads(X, x_adv, Y, 6.0, s)
    np.testing.assert_allclose(gw, nw, atol=1e-8)
    np.testing.assert_allclose(gb, nb, atol=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades_step_matches_closed_form(beta, weighted):
    # One step of size >= 2 eps from a random start lands on a corner of the ball.
    attack = RecordingPGD(eps=EPS, step_size=2 * EPS, steps=1, random_start=True)
    s = np.array([1.0, 0.5, 2.0, 0.0, 1.5], np.float32) if weighted else None
    w, b, logged = one_trades_step(attack, beta, s)

    (target, x_adv), = attack.calls
    np.testing.assert_allclose(target, softmax(X @ W + B), atol=1e-6)
    np.testing.assert_allclose(np.abs(x_adv - X), EPS, atol=1e-6)
    p, q = softmax(X @ W + B), softmax(x_adv @ W + B)
    assert np.all(np.sum(p * np.log(p / q), 1) > 1e-4)

    sw = np.ones(len(X)) if s is None else s.astype(np.float64)
    loss, gw, gb = trades_loss_and_grads(X, x_adv, Y, beta, sw)
    np.testing.assert_allclose(w, W - LR * gw, atol=1e-5)
    np.testing.assert_allclose(b, B - LR * gb, atol=1e-5)
    np.testing.assert_allclose(logged, loss, rtol=1e-5)


def test_kl_gradient_flows_through_the_clean_probabilities():
    """The step differs from the one with p held constant in the KL."""
    attack = RecordingPGD(eps=EPS, step_size=2 * EPS, steps=1, random_start=True)
    w, b, _ = one_trades_step(attack, 6.0)
    (_, x_adv), = attack.calls
    s = np.ones(len(X))
    _, gw, gb = trades_loss_and_grads(X, x_adv, Y, 6.0, s)
    p, onehot = softmax(X @ W + B), np.eye(3)[Y]
    dz_stopped = (p - onehot) / len(X)
    du = 6.0 * (softmax(x_adv @ W + B) - p) / len(X)
    gw_stopped = X.T @ dz_stopped + x_adv.T @ du
    np.testing.assert_allclose(w, W - LR * gw, atol=1e-5)
    assert np.abs((W - LR * gw_stopped) - w).max() > 1e-3
