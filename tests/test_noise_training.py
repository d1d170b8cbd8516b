"""Training for randomized smoothing: "gaussian" and "smoothadv" against closed forms and NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv.attacks import PGD
from tfadv.trainers import AdversarialModel
from tfadv.trainers import noise as noise_lib

D, C = 5, 3


def _linear(w, b):
    model = keras.Sequential([keras.Input((w.shape[0],)), keras.layers.Dense(w.shape[1])])
    model.layers[-1].set_weights([w.astype("float32"), b.astype("float32")])
    return model


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class FixedNoise:
    """Replaces the noise draws with a known array (the trainer's step can then be checked)."""

    def __init__(self, values):
        self.values = values

    def __call__(self, x, sigma, copies):
        n = int(x.shape[0])
        return tf.constant(self.values[:copies * n] * sigma, x.dtype)


def test_smoothed_log_probs_is_the_log_of_the_mean_softmax_over_the_draws():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(D, C)), rng.normal(size=C)
    x = rng.normal(size=(4, D)).astype("float32")
    copies = 3
    noise = rng.normal(size=(copies * 4, D)).astype("float32")
    got = noise_lib.smoothed_log_probs(_linear(w, b), x, noise, copies).numpy()
    probs = _softmax((np.concatenate([x] * copies) + noise) @ w + b).reshape(copies, 4, C)
    np.testing.assert_allclose(got, np.log(probs.mean(0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-6)


def test_smoothadv_adversary_of_a_two_class_linear_model_moves_eps_toward_the_other_class(
        monkeypatch):
    # For two linear classes every draw's gradient of -log p_y points along
    # w_other - w_y, so the smoothed soft classifier's PGD walks straight there
    # and the projection stops it at exactly eps; the copies are the adversary
    # plus the same draws the attack used.
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(D, 2)), rng.normal(size=2)
    x = rng.normal(size=(6, D)).astype("float32")
    y = np.array([0, 1, 0, 1, 1, 0])
    eps, sigma = 0.7, 0.3
    draws = rng.normal(size=(24, D)).astype("float32")
    monkeypatch.setattr(noise_lib, "gaussian_noise", FixedNoise(draws))
    attack = PGD(eps=eps, step_size=0.5, steps=4, norm="2", bounds=None, random_start=False)
    out = noise_lib.smoothadv_adversary(attack, _linear(w, b), x, y, sigma=sigma, copies=4,
                                        eps=eps).numpy()
    direction = (w[:, 1 - y] - w[:, y]).T
    expected = x + eps * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    np.testing.assert_allclose(out, np.concatenate([expected] * 4) + sigma * draws,
                               rtol=1e-5, atol=1e-5)


def test_noisy_copies_are_unclipped_gaussian_draws_of_sigma():
    x = np.full((50, 40), 0.5, np.float32)
    out = noise_lib.noisy_copies(x, 0.25, copies=4).numpy()
    assert out.shape == (200, 40)
    e = out - 0.5
    assert abs(e.mean()) < 0.01 and abs(e.std() - 0.25) < 0.01
    assert out.min() < 0.0 and out.max() > 1.0  # not clipped to the input range


@pytest.mark.parametrize("method", ["gaussian", "smoothadv"])
def test_one_step_descends_the_mean_loss_of_the_noisy_copies(monkeypatch, method):
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(D, 2)), np.zeros(2)
    x = rng.normal(size=(8, D)).astype("float32")
    y = rng.integers(0, 2, 8)
    copies, sigma, eps, lr = 3, 0.4, 0.5, 0.1
    draws = rng.normal(size=(copies * 8, D)).astype("float32")
    monkeypatch.setattr(noise_lib, "gaussian_noise", FixedNoise(draws))
    attack = PGD(eps=eps, step_size=0.5, steps=3, norm="2", bounds=None, random_start=False)
    model = AdversarialModel(_linear(w, b), attack=attack if method == "smoothadv" else None,
                             method=method, noise_sigma=sigma, noise_samples=copies)
    model.compile(optimizer=keras.optimizers.SGD(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logs = model.train_on_batch(x, y, return_dict=True)

    inputs = x
    if method == "smoothadv":
        direction = (w[:, 1 - y] - w[:, y]).T
        inputs = x + eps * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    inputs = np.concatenate([inputs] * copies) + draws * sigma
    labels = np.concatenate([y] * copies)
    p = _softmax(inputs @ w + b)
    loss = -np.log(p[np.arange(len(labels)), labels]).mean()
    g = (p - np.eye(2)[labels]) / len(labels)
    new_w, new_b = model.base.layers[-1].get_weights()
    np.testing.assert_allclose(logs["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(new_w, w - lr * inputs.T @ g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_b, b - lr * g.sum(0), rtol=1e-4, atol=1e-6)


def test_noise_methods_round_trip_their_settings():
    model = AdversarialModel(_linear(np.ones((D, 2)), np.zeros(2)), method="gaussian",
                             noise_sigma=0.5, noise_samples=2)
    again = AdversarialModel.from_config(model.get_config())
    assert (again.method, again.noise_sigma, again.noise_samples) == ("gaussian", 0.5, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="gaussian"), "noise_sigma > 0"),
    (dict(method="gaussian", noise_sigma=-0.1), "noise_sigma > 0"),
    (dict(method="gaussian", noise_sigma=0.25, noise_samples=0), "noise_samples >= 1"),
    (dict(method="smoothadv", noise_sigma=0.25, attack=PGD(eps=0.3)), "L2 training attack"),
    (dict(method="smoothadv", noise_sigma=0.25), "needs a training attack"),
])
def test_bad_noise_settings_say_what_to_pass(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialModel(_linear(np.ones((D, 2)), np.zeros(2)), **kwargs)
