"""AdversarialModel: closed-form oracles, metrics, XLA, mixed precision, serialisation."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tests.conftest import tiny_cnn
from tfadv.attacks import PGD

W = np.array([[0.5, -0.3], [-0.2, 0.8]], np.float32)
B = np.array([0.1, -0.1], np.float32)
X = np.array([[0.2, 0.7], [0.6, 0.3]], np.float32)
Y = np.array([0, 1], np.int64)
EPS, LR = 0.1, 0.5


def linear_model():
    return keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant(W),
                           bias_initializer=keras.initializers.Constant(B)),
    ])


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce_grads(x, y, w=W, b=B):
    """(dL/dx per example, dMeanL/dW, dMeanL/db) for softmax CE of a linear model."""
    d = softmax(x @ w + b) - np.eye(2)[y]
    return d @ w.T, x.T @ d / len(x), d.mean(0)


def fgsm_numpy(x, y):
    gx, _, _ = ce_grads(x, y)
    return np.clip(x + EPS * np.sign(gx), 0, 1)


def fit_one_step(jit=False, **kwargs):
    base = linear_model()
    model = tfadv.AdversarialModel(base, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    model.fit(X, Y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    w, b = base.get_weights()
    return w, b


ONE_STEP = PGD(eps=EPS, step_size=EPS, steps=1, random_start=False)


@pytest.mark.parametrize("jit", [False, True])
def test_madry_step_matches_numpy(jit):
    x_adv = fgsm_numpy(X, Y)
    _, gw, gb = ce_grads(x_adv, Y)
    w, b = fit_one_step(jit=jit, attack=ONE_STEP, method="pgd")
    np.testing.assert_allclose(w, W - LR * gw, atol=1e-6)
    np.testing.assert_allclose(b, B - LR * gb, atol=1e-6)


def test_attack_output_matches_numpy():
    np.testing.assert_allclose(ONE_STEP(linear_model(), X, Y).numpy(), fgsm_numpy(X, Y), atol=1e-7)


def test_clean_adversarial_mix_matches_numpy():
    r = 0.25
    _, gw_c, gb_c = ce_grads(X, Y)
    _, gw_a, gb_a = ce_grads(fgsm_numpy(X, Y), Y)
    w, b = fit_one_step(attack=ONE_STEP, method="pgd", adv_ratio=r)
    np.testing.assert_allclose(w, W - LR * ((1 - r) * gw_c + r * gw_a), atol=1e-6)
    np.testing.assert_allclose(b, B - LR * ((1 - r) * gb_c + r * gb_a), atol=1e-6)


def test_standard_and_zero_ratio_are_clean_training():
    _, gw, gb = ce_grads(X, Y)
    for kwargs in (dict(method="standard"), dict(method="pgd", attack=ONE_STEP, adv_ratio=0.0),
                   dict(method="trades", attack=ONE_STEP, trades_beta=0.0)):
        w, b = fit_one_step(**kwargs)
        np.testing.assert_allclose(w, W - LR * gw, atol=1e-6, err_msg=str(kwargs))
        np.testing.assert_allclose(b, B - LR * gb, atol=1e-6, err_msg=str(kwargs))


def test_trades_regulariser_changes_the_step():
    attack = PGD(eps=EPS, step_size=EPS / 2, steps=3, random_start=True)
    w0, _ = fit_one_step(method="trades", attack=attack, trades_beta=0.0)
    w6, _ = fit_one_step(method="trades", attack=attack, trades_beta=6.0)
    assert np.abs(w6 - w0).max() > 1e-4


def _compiled(base, **kwargs):
    model = tfadv.AdversarialModel(base, **kwargs)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def test_history_has_clean_and_robust_validation(tiny_model, batch):
    x, y = batch
    model = _compiled(tiny_model, attack=PGD(eps=0.1, steps=3))
    hist = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=8, verbose=0).history
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_robust_accuracy",
                "val_robust_loss"):
        assert key in hist and len(hist[key]) == 2, key
    assert "robust_accuracy" not in hist  # training logs carry no stale eval metrics
    assert all(r <= c + 1e-6 for r, c in zip(hist["val_robust_accuracy"], hist["val_accuracy"]))
    ev = model.evaluate(x, y, verbose=0, return_dict=True)
    assert ev["robust_accuracy"] <= ev["accuracy"]


def test_robust_validation_uses_eval_attack(tiny_model, batch):
    x, y = batch
    model = _compiled(tiny_model, method="standard", eval_attack=PGD(eps=0.0, steps=1))
    ev = model.evaluate(x, y, verbose=0, return_dict=True)
    assert ev["robust_accuracy"] == pytest.approx(ev["accuracy"])  # eps=0: identical inputs


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(policy, batch):
    keras.mixed_precision.set_dtype_policy(policy)
    base = tiny_cnn()
    assert base.layers[1].compute_dtype != "float32"
    model = _compiled(base, attack=PGD(eps=0.1, steps=2))
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = batch
    before = [w.copy() for w in base.get_weights()]
    hist = model.fit(x, y, validation_data=(x, y), epochs=1, batch_size=8, verbose=0).history
    assert np.isfinite(hist["loss"][0]) and np.isfinite(hist["val_robust_loss"][0])
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, base.get_weights()))
    x_adv = PGD(eps=0.1, steps=2)(base, x, y)
    assert x_adv.dtype == tf.float32


def test_base_saves_and_loads_in_safe_mode(tmp_path, tiny_model, batch):
    x, y = batch
    model = _compiled(tiny_model, attack=PGD(eps=0.1, steps=2))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "base.keras")
    tiny_model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(again.predict(x, verbose=0), tiny_model.predict(x, verbose=0),
                               atol=1e-6)


def test_adversarial_model_round_trip(tmp_path, tiny_model, batch):
    x, y = batch
    model = _compiled(tiny_model, attack=PGD(eps=0.1, steps=2), method="trades", trades_beta=3.0,
                      eval_attack=tfadv.attacks.APGD(eps=0.1, steps=5))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "wrapper.keras")
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(again, tfadv.AdversarialModel)
    assert again.method == "trades" and again.trades_beta == 3.0
    assert again.attack == model.attack and again.eval_attack == model.eval_attack
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    cfg = json.loads(json.dumps(model.get_config()))  # JSON-serialisable
    assert cfg["attack"]["class_name"] == "pgd"


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fast"), "method"),
    (dict(method="pgd"), "needs a training attack"),
    (dict(attack=PGD(eps=0.1), adv_ratio=1.5), "adv_ratio"),
    (dict(attack=PGD(eps=0.1), trades_beta=-1), "trades_beta"),
    (dict(attack="pgd"), "Attack or a dict"),
])
def test_bad_arguments(kwargs, match, tiny_model):
    with pytest.raises(ValueError, match=match):
        tfadv.AdversarialModel(tiny_model, **kwargs)


def test_base_must_be_a_model():
    with pytest.raises(ValueError, match="keras.Model"):
        tfadv.AdversarialModel(lambda x: x, attack=PGD(eps=0.1))


def test_mirrored_strategy_matches_single_device():
    """Two logical CPUs: one global step equals the single-device step (needs a fresh process)."""
    script = os.path.join(os.path.dirname(__file__), "mirrored_check.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["max_weight_diff"] < 1e-5, result
    assert result["weights_moved"] > 1e-3, result


def test_eps_fraction_scales_the_training_attack():
    """eps_fraction = 0.5 trains on the FGSM point of half the budget (closed form)."""
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=ONE_STEP)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.eps_fraction.assign(0.5)
    model.fit(X, Y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    gx, _, _ = ce_grads(X, Y)
    x_adv = np.clip(X + 0.5 * EPS * np.sign(gx), 0, 1)
    _, gw, _ = ce_grads(x_adv, Y)
    np.testing.assert_allclose(base.get_weights()[0], W - LR * gw, atol=1e-6)


def _eps_fractions_seen(model, x, y, epochs, warmup):
    """The training attack's budget fraction after every step of a fit with `warmup`."""
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            seen.append(float(self.model.eps_fraction.numpy()))

    model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, callbacks=[warmup, Spy()])
    return seen


def test_epsilon_warmup_ramps_linearly(tiny_model, batch):
    x, y = batch
    model = _compiled(tiny_model, attack=PGD(eps=0.1, steps=1))
    seen = _eps_fractions_seen(model, x, y, 3, tfadv.trainers.EpsilonWarmup(2))
    np.testing.assert_allclose(seen, [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0] + [1.0] * 4)
    assert float(model.eps_fraction.numpy()) == 1.0
    with pytest.raises(ValueError, match="epochs"):
        tfadv.trainers.EpsilonWarmup(-1)


def test_epsilon_warmup_starts_after_clean_epochs(tiny_model, batch):
    x, y = batch
    model = _compiled(tiny_model, attack=PGD(eps=0.1, steps=1))
    # 4 steps per epoch: one clean epoch, then a one-epoch ramp, then the full budget.
    seen = _eps_fractions_seen(model, x, y, 3, tfadv.trainers.EpsilonWarmup(1, start=1))
    np.testing.assert_allclose(seen, [0.0] * 4 + [0.25, 0.5, 0.75, 1.0] + [1.0] * 4)
    seen = _eps_fractions_seen(model, x, y, 2, tfadv.trainers.EpsilonWarmup(0, start=1))
    np.testing.assert_allclose(seen, [0.0] * 4 + [1.0] * 4)
    with pytest.raises(ValueError, match="start"):
        tfadv.trainers.EpsilonWarmup(1, start=-1)
