"""The AutoAttack cascade (tfadv.evaluation.autoattack) and `tfadv autoattack`."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv.attacks import APGD, APGDT
from tfadv.attacks.fab import FABT
from tfadv.attacks.square import Square
from tfadv.evaluation.autoattack import (VERSIONS, autoattack, autoattack_suite, markdown_table,
                                         summary_lines)
from tfadv.evaluation.checks import GradientMaskingWarning

D, C = 16, 5


def linear_model(seed=0, quantize=None):
    """A linear classifier on [0, 1]^16; with `quantize=k`, its input is first
    rounded to k levels with a zero gradient: masked on purpose."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((D,))
    h = inputs
    if quantize:
        k = float(quantize)
        h = keras.layers.Lambda(
            lambda x: tf.stop_gradient(tf.round(x * k) / k) + 0.0 * x)(h)
    dense = keras.layers.Dense(C)
    model = keras.Model(inputs, dense(h))
    dense.set_weights([rng.normal(0, 1, (D, C)).astype("float32"),
                       rng.normal(0, 0.1, C).astype("float32")])
    return model


def data(model, n=60, seed=1):
    x = np.random.default_rng(seed).uniform(0, 1, (n, D)).astype("float32")
    return x, np.argmax(model.predict(x, verbose=0), -1)


def small_suite(norm="inf", eps=0.1, **kw):
    return autoattack_suite(norm, eps, num_classes=C, steps=10, queries=300, **kw)


def test_the_suites_are_autoattacks():
    suite = autoattack_suite("inf", 0.3, num_classes=10)
    assert list(suite) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    (ce,) = suite["apgd-ce"]
    assert isinstance(ce, APGD) and ce.steps == 100 and ce.objective == "ce" and ce.eps == 0.3
    assert [a.ranks for a in suite["apgd-t"]] == [(r,) for r in range(1, 10)]
    assert all(isinstance(a, APGDT) and a.steps == 100 for a in suite["apgd-t"])
    (fab,) = suite["fab-t"]
    assert isinstance(fab, FABT) and fab.num_targets == 9 and fab.steps == 100
    (sq,) = suite["square"]
    assert isinstance(sq, Square) and sq.queries == 5000
    # Fewer classes: fewer targets.
    assert len(autoattack_suite("2", 0.5, num_classes=4)["apgd-t"]) == 3
    plus = autoattack_suite("inf", 0.3, version="plus", num_classes=10)
    assert list(plus) == list(VERSIONS["plus"]) and len(plus["apgd-ce"]) == 5
    rand = autoattack_suite("inf", 0.3, version="rand", num_classes=10)
    assert list(rand) == ["apgd-ce", "apgd-dlr"] and rand["apgd-ce"][0].eot_iter == 20
    with pytest.raises(ValueError, match="version"):
        autoattack_suite("inf", 0.3, version="fast")


@pytest.mark.parametrize("norm,eps", [("inf", 0.08), ("2", 0.4)])
def test_cascade_accounts_for_every_example(norm, eps):
    model = linear_model()
    x, y = data(model)
    y[:5] = (y[:5] + 1) % C  # five clean errors
    res = autoattack(model, x, y, norm=norm, eps=eps, suite=small_suite(norm, eps),
                     checks=False)
    assert res.n == 60 and res.clean_accuracy == pytest.approx(55 / 60)
    accs = list(res.per_attack.values())
    assert accs == sorted(accs, reverse=True) and accs[-1] == res.robust_accuracy
    assert res.robust_accuracy <= res.clean_accuracy
    assert set(res.broken_by[:5]) == {"clean"}
    broken = ~np.isin(res.broken_by, ["", "clean"])
    assert broken.any()
    # Every break is real: inside the ball and the bounds, and misclassified.
    d = (res.x_adv - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "inf" else np.linalg.norm(d, axis=1)
    assert size[broken].max() <= eps + 1e-5 and res.max_perturbation <= eps + 1e-5
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    pred = np.argmax(model.predict(res.x_adv, verbose=0), -1)
    assert np.all(pred[broken] != y[broken])
    np.testing.assert_array_equal(res.x_adv[~broken], x[~broken])
    # Each attack ran only on what was standing before it.
    assert res.attacked["apgd-ce"] == 55
    assert res.attacked["square"] == round(res.per_attack["fab-t"] * 60)
    json.dumps(res.to_dict())
    assert "| **AutoAttack (standard)** |" in markdown_table(res)
    # Counts summed over a targeted attack's runs can exceed the examples: then say so.
    from tfadv.evaluation.autoattack import result_from_dict
    within = dict(res.to_dict(), attacked={k: res.n for k in res.attacked})
    over = dict(within, attacked=dict(within["attacked"], **{"apgd-t": 9 * res.n}))
    for d, noted in ((within, False), (over, True)):
        again = result_from_dict(d)
        assert ("summed over its runs" in markdown_table(again)) is noted
        assert ("summed over its runs" in "\n".join(summary_lines(again))) is noted


def test_same_seed_same_result_and_n_takes_the_first_examples():
    model = linear_model()
    x, y = data(model, n=40)
    kw = dict(norm="inf", eps=0.08, checks=False)
    a = autoattack(model, x, y, suite=small_suite(), seed=3, **kw)
    b = autoattack(model, x, y, suite=small_suite(), seed=3, **kw)
    np.testing.assert_array_equal(a.broken_by, b.broken_by)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    first = autoattack(model, x, y, suite=small_suite(), seed=3, n=10, **kw)
    assert first.n == 10
    np.testing.assert_array_equal(first.x_adv, autoattack(
        model, x[:10], y[:10], suite=small_suite(), seed=3, **kw).x_adv)
    with pytest.raises(ValueError, match="eps"):
        autoattack(model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="bounds"):
        autoattack(model, x + 2, y, eps=0.1)


def test_masked_gradients_are_flagged_and_square_still_breaks_them():
    """A quantising input layer with a zero gradient: APGD and FAB cannot move,
    the black-box Square can. The cascade's robust accuracy is no higher than
    Square's alone, and the flags say why."""
    model = linear_model(quantize=4)
    x, y = data(model, n=60)
    eps = 0.2
    with pytest.warns(GradientMaskingWarning):
        res = autoattack(model, x, y, norm="inf", eps=eps, suite=small_suite(eps=eps))
    square_alone = Square(eps=eps, queries=300, seed=0).run(model, x, y)
    assert res.robust_accuracy <= 1 - square_alone.success.mean() + 1e-9
    assert res.checks["fraction_zero_gradients"] == 1.0
    assert res.checks["broken_by_square"] > 0
    text = "\n".join(summary_lines(res))
    assert "FLAG" in text and "zero input gradients" in text and "Square" in text


def test_flags_probabilities_and_randomness():
    base = linear_model()
    x, y = data(base, n=30)
    inputs = keras.Input((D,))
    soft = keras.Model(inputs, keras.layers.Softmax()(base(inputs)))

    class Noisy(keras.Model):
        def call(self, x, training=False):
            return base(x) + tf.random.normal([tf.shape(x)[0], C], stddev=0.01)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        res_soft = autoattack(soft, x, y, eps=0.05, suite=small_suite(eps=0.05))
        res_noisy = autoattack(Noisy(), x, y, eps=0.05, suite=small_suite(eps=0.05))
    assert any("probabilities" in f for f in res_soft.flags)
    assert any("randomised" in f and "rand" in f for f in res_noisy.flags)
    clean = autoattack(base, x, y, eps=0.05, suite=small_suite(eps=0.05))
    assert not any("randomised" in f or "probabilities" in f for f in clean.flags)


@pytest.mark.slow
def test_cli_autoattack_json_on_the_embedded_split(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(4, 5, strides=3, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    path = str(tmp_path / "m.keras")
    model.save(path)
    out = subprocess.run(
        [sys.executable, "-m", "tfadv.cli", "autoattack", path, "--eps", "0.05", "--n", "12",
         "--json", "--out", str(tmp_path / "aa")],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 12
    for key in ("clean_accuracy", "robust_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["robust_accuracy"] <= result["clean_accuracy"]
    assert list(result["per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert os.path.exists(tmp_path / "aa" / "autoattack.md")
    with open(tmp_path / "aa" / "autoattack.json") as f:
        assert json.load(f)["robust_accuracy"] == result["robust_accuracy"]


def test_labels_beyond_the_models_classes_are_refused():
    """A 5-logit model on 10-class labels used to report clean accuracy 0 without a word."""
    import keras

    from tfadv.evaluation import evaluate_robustness, robustness_curve

    five = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    x = np.random.default_rng(0).uniform(0, 1, (6, 4)).astype("float32")
    y = np.array([0, 1, 2, 3, 4, 9])
    for run in (lambda: autoattack(five, x, y, eps=0.1, checks=False),
                lambda: evaluate_robustness(five, x, y, attacks={}),
                lambda: robustness_curve(five, x, y, [0.0])):
        with pytest.raises(ValueError, match="5 outputs .* labels go up to 9"):
            run()
