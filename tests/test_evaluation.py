import gc
import json
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_cnn

from tfadv import attacks
from tfadv.attacks.base import Attack
from tfadv.evaluation import (attack_batches, evaluate_robustness, gradient_masking_checks,
                              robustness_curve, save_curve)
from tfadv.evaluation import centers as centers_lib
from tfadv.evaluation import compiled as C
from tfadv.evaluation.compiled import compiled_attack
from tfadv.models import mnist_feature_net


class FlipAttack(Attack):
    """Test double: swaps the two features of the examples selected by a fixed mask."""

    name = "flip"

    def __init__(self, mask, p=None):
        # Swapping two features in [0, 1] moves each by at most 1 (Linf).
        super().__init__(eps=1.0, bounds=None)
        self.mask, self.p = tf.constant(mask), p

    def get_config(self):
        return {**super().get_config(), "mask": self.mask.numpy().tolist(), "p": self.p}

    def perturb(self, model, x, y, objective, scale):
        mask = self.mask
        if self.p is not None:
            mask = tf.random.uniform([tf.shape(x)[0]]) < self.p
        return tf.where(mask[:, None], tf.reverse(x, axis=[1]), x)


def identity_model(x):
    return x  # logits = features: class 0 iff x[:, 0] > x[:, 1]


def test_worst_case_over_attacks():
    x = np.array([[1, 0]] * 5 + [[0, 1]], np.float32)
    y = np.zeros(6, np.int64)  # the last example is misclassified clean
    a = FlipAttack([True, False, False, False, False, False])
    b = FlipAttack([False, True, True, False, False, False])
    res = evaluate_robustness(identity_model, x, y, [a, b])
    assert res.clean_accuracy == pytest.approx(5 / 6)
    assert res.per_attack == {"flip": pytest.approx(4 / 6), "flip_1": pytest.approx(3 / 6)}
    assert res.robust_accuracy == pytest.approx(2 / 6)
    np.testing.assert_array_equal(res.correct, [False, False, False, True, True, False])
    assert json.loads(json.dumps(res.to_dict()))["n"] == 6


def test_restarts_take_the_worst_case():
    x = np.tile(np.array([[1, 0]], np.float32), (400, 1))
    y = np.zeros(400, np.int64)
    tf.random.set_seed(0)
    one = evaluate_robustness(identity_model, x, y, FlipAttack([False] * 400, p=0.5), restarts=1)
    four = evaluate_robustness(identity_model, x, y, FlipAttack([False] * 400, p=0.5), restarts=4)
    assert 0.4 < one.robust_accuracy < 0.6
    assert four.robust_accuracy < 0.15


def test_bad_evaluation_input():
    with pytest.raises(ValueError, match="restarts"):
        evaluate_robustness(identity_model, np.zeros((2, 2), np.float32), np.zeros(2), [],
                            restarts=0)
    with pytest.raises(ValueError, match="float"):
        evaluate_robustness(identity_model, np.zeros((2, 2), np.uint8), np.zeros(2), [])
    with pytest.raises(ValueError, match="eps"):
        robustness_curve(identity_model, np.zeros((2, 2), np.float32), np.zeros(2), [-0.1])


def test_no_examples_is_a_clear_error_everywhere():
    """An empty selection (every digit already broken, --n 0 after filtering) used to reach
    AutoAttack's gradient checks and fail there with a reshape error."""
    from tfadv.evaluation.autoattack import autoattack

    x, y = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    for call in (lambda: evaluate_robustness(identity_model, x, y, [attacks.FGSM(eps=0.1)]),
                 lambda: robustness_curve(identity_model, x, y, [0.1]),
                 lambda: autoattack(identity_model, x, y, eps=0.1)):
        with pytest.raises(ValueError, match="Expected at least one example"):
            call()


def test_agrees_with_art_pgd(trained_mnist_model, mnist_small):
    """Our robust accuracy under PGD and ART's on the same model, budget and data."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    _, _, x, y = mnist_small
    clf = TensorFlowV2Classifier(
        model=trained_mnist_model, nb_classes=10, input_shape=(28, 28, 1), clip_values=(0.0, 1.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    art_pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=0.1, eps_step=0.01, max_iter=20,
                                       num_random_init=1, batch_size=200, verbose=False)
    art_acc = float(np.mean(clf.predict(art_pgd.generate(x, y=y)).argmax(1) == y))
    ours = evaluate_robustness(trained_mnist_model, x, y,
                               attacks.PGD(eps=0.1, step_size=0.01, steps=20)).robust_accuracy
    clean = float(np.mean(trained_mnist_model(x).numpy().argmax(1) == y))
    assert clean - ours > 0.2  # the budget really bites
    assert abs(ours - art_acc) <= 0.05, (ours, art_acc)


def test_curve_and_files(trained_mnist_model, mnist_small, tmp_path):
    _, _, x, y = mnist_small
    curve = robustness_curve(trained_mnist_model, x, y, [0.0, 0.05, 0.15, 0.3])
    clean = float(np.mean(trained_mnist_model(x).numpy().argmax(1) == y))
    assert curve["eps"] == [0.0, 0.05, 0.15, 0.3] and curve["n"] == len(y)
    assert curve["accuracy"][0] == pytest.approx(clean)
    assert curve["accuracy"][-1] < 0.1 < clean
    assert curve["accuracy"][1] >= curve["accuracy"][3]
    js, png = save_curve(curve, tmp_path / "sub" / "curve")
    assert json.load(open(js))["accuracy"] == curve["accuracy"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_checks_pass_on_healthy_model(trained_mnist_model, mnist_small):
    _, _, x, y = mnist_small
    report = gradient_masking_checks(trained_mnist_model, x, y, eps=0.1, steps=5, warn=False)
    assert report.ok, report.problems
    assert report.measurements["large_eps_accuracy"] <= 0.1


def test_checks_flag_probability_outputs(trained_mnist_model, mnist_small):
    _, _, x, y = mnist_small

    def saturated(inp):
        return tf.nn.softmax(1000.0 * trained_mnist_model(inp))

    with pytest.warns(UserWarning, match="probabilities"):
        report = gradient_masking_checks(saturated, x, y, eps=0.1, steps=5)
    assert not report.ok


def test_checks_flag_missing_gradients(mnist_small):
    _, _, x, y = mnist_small
    dense = keras.layers.Dense(10)

    def no_grad(inp):
        return dense(tf.reshape(tf.round(inp), [-1, 784]))

    report = gradient_masking_checks(no_grad, x, y, eps=0.1, warn=False)
    assert not report.ok and "no gradient" in report.problems[0]


def test_repeated_evaluation_reuses_one_trace_and_frees_the_model(batch):
    x, y = batch
    tiny_model = tiny_cnn()
    evaluate_robustness(tiny_model, x, y, attacks.PGD(eps=0.1, steps=2))
    keys, traces = set(C.cached_keys(tiny_model)), C.tracing_count(tiny_model)
    for _ in range(30):
        evaluate_robustness(tiny_model, x, y, attacks.PGD(eps=0.1, steps=2))
    assert set(C.cached_keys(tiny_model)) == keys  # predict + one attack
    assert len(keys) == 2 and C.tracing_count(tiny_model) == traces
    # Another budget is another function; an equal one is not.
    robustness_curve(tiny_model, x, y, [0.1, 0.2, 0.1], attack_fn=lambda e: attacks.PGD(
        eps=e, steps=2))
    assert len(C.cached_keys(tiny_model)) == 3

    ref = weakref.ref(tiny_model)
    del tiny_model
    gc.collect()
    assert ref() is None


def test_centre_extraction_frees_the_model(mnist_small):
    _, _, x, y = mnist_small
    model = mnist_feature_net(arch="small")
    centers_lib.extract_centers(model, (x[:40], y[:40]),
                                attack=attacks.InversePGD(random_start=False), batch_size=20)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


class CountingFlip(FlipAttack):
    """FlipAttack that counts the examples it is run on (in a variable: it runs compiled)."""

    def __init__(self, mask, tag):
        super().__init__(mask)
        self.tag = tag  # in the config: equal masks, other counters, other compiled functions
        self.seen = tf.Variable(0, dtype=tf.int64)

    def get_config(self):
        return {**super().get_config(), "tag": self.tag}

    def perturb(self, model, x, y, objective, scale):
        n = tf.shape(x, out_type=tf.int64)[0]
        self.seen.assign_add(n)
        # The mask addresses examples by their clean first feature's rank in 0..9.
        idx = tf.cast(tf.round(x[:, 2] * 10), tf.int32)
        mask = tf.gather(self.mask, idx)
        return tf.where(mask[:, None], tf.concat([tf.reverse(x[:, :2], [1]), x[:, 2:]], 1), x)


def test_cascade_equals_the_worst_case_and_attacks_only_survivors():
    # Ten examples, example i carries i / 10 in a third feature (ignored by the classifier,
    # which looks at the first two): the attacks below break fixed examples, wherever they sit.
    x = np.array([[1, 0, i / 10] for i in range(10)], np.float32)
    x[9, :2] = [0, 1]  # misclassified clean
    y = np.zeros(10, np.int64)

    def model(inp):
        return inp[:, :2]

    def attacks(tag):
        return {"first": CountingFlip([i in (0, 1, 2) for i in range(10)], f"{tag}1"),
                "second": CountingFlip([i in (1, 3) for i in range(10)], f"{tag}2"),
                "third": CountingFlip([i in (3, 4) for i in range(10)], f"{tag}3")}

    plain_attacks, cascade_attacks = attacks("plain"), attacks("cascade")
    plain = evaluate_robustness(model, x, y, plain_attacks)
    cascade = evaluate_robustness(model, x, y, cascade_attacks, cascade=True)
    assert cascade.robust_accuracy == plain.robust_accuracy == pytest.approx(4 / 10)
    np.testing.assert_array_equal(cascade.correct, plain.correct)
    assert cascade.clean_accuracy == plain.clean_accuracy == pytest.approx(9 / 10)
    # Alone, each attack breaks its own examples; in the cascade, what is left after it.
    assert plain.per_attack == {"first": pytest.approx(6 / 10), "second": pytest.approx(7 / 10),
                                "third": pytest.approx(7 / 10)}
    assert cascade.per_attack == {"first": pytest.approx(6 / 10),
                                  "second": pytest.approx(5 / 10),
                                  "third": pytest.approx(4 / 10)}
    # Without cascade every attack sees all ten; with it, the first sees the nine correct
    # ones, the second the six the first left, the third the five the second left.
    assert {k: int(a.seen.numpy()) for k, a in plain_attacks.items()} == {
        "first": 10, "second": 10, "third": 10}
    assert {k: int(a.seen.numpy()) for k, a in cascade_attacks.items()} == {
        "first": 9, "second": 6, "third": 5}
    assert cascade.attacked == {"first": 9, "second": 6, "third": 5}
    assert plain.attacked == {"first": 10, "second": 10, "third": 10}
    d = json.loads(json.dumps(cascade.to_dict()))
    assert d["cascade"] is True and d["per_attack"]["third"] == pytest.approx(0.4)


def test_cascade_matches_the_worst_case_of_real_attacks(trained_mnist_model, mnist_small):
    """Deterministic PGD and APGD (no random start): same robust examples, fewer attacked."""
    _, _, x, y = mnist_small
    fixed = {"pgd": attacks.PGD(eps=0.08, steps=5, random_start=False),
             "apgd_dlr": attacks.APGD(eps=0.08, steps=5, objective="dlr", random_start=False),
             "pgd_margin": attacks.PGD(eps=0.08, steps=5, random_start=False,
                                       objective="margin")}
    plain = evaluate_robustness(trained_mnist_model, x, y, fixed, batch_size=64)
    cascade = evaluate_robustness(trained_mnist_model, x, y, fixed, cascade=True, batch_size=64)
    assert plain.clean_accuracy - plain.robust_accuracy > 0.1  # the budget bites
    np.testing.assert_array_equal(cascade.correct, plain.correct)
    assert cascade.robust_accuracy == plain.robust_accuracy
    after = list(cascade.per_attack.values())
    assert after == sorted(after, reverse=True) and after[-1] == cascade.robust_accuracy
    assert cascade.attacked["pgd"] == round(plain.clean_accuracy * len(y))
    assert cascade.attacked["apgd_dlr"] == round(after[0] * len(y)) < len(y)


def test_curve_is_one_compiled_function_over_the_budgets(batch):
    x, y = batch  # 16 examples: one batch, one input shape
    model = tiny_cnn()
    budgets = [0.0, 0.05, 0.1, 0.2, 0.05]
    attack = attacks.PGD(eps=0.2, steps=4, random_start=False)
    curve = robustness_curve(model, x, y, budgets, attack=attack)
    fn = compiled_attack(model, attack, with_eps=True)
    assert fn.experimental_get_tracing_count() == 1
    per_budget = [evaluate_robustness(model, x, y, []).clean_accuracy] + [
        evaluate_robustness(model, x, y, attacks.PGD(eps=e, steps=4, random_start=False))
        .robust_accuracy for e in budgets[1:]]
    assert curve["accuracy"] == pytest.approx(per_budget)
    assert curve["accuracy"][1] == curve["accuracy"][4]
    # The per-call budget and step reproduce an attack built at that budget.
    x_call = fn(tf.constant(x), tf.constant(y), tf.constant(0.05)).numpy()
    x_own = attacks.PGD(eps=0.05, steps=4, random_start=False)(model, x, y).numpy()
    np.testing.assert_allclose(x_call, x_own, atol=1e-6)
    # The default attack is PGD-20 at the largest budget, also called per budget.
    robustness_curve(model, x, y, [0.1, 0.3])
    default = compiled_attack(model, attacks.PGD(eps=0.3, steps=20), with_eps=True)
    assert default.experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match="not both"):
        robustness_curve(model, x, y, [0.1], attack=attack, attack_fn=lambda e: attack)


def test_per_example_budgets(batch):
    x, y = batch
    model = tiny_cnn()
    attack = attacks.PGD(eps=0.3, steps=3, random_start=False)
    eps = np.where(np.arange(len(y)) % 2 == 0, 0.0, 0.3).astype(np.float32)
    x_adv = attack_batches(model, attack, x, y, eps=eps, batch_size=5)
    np.testing.assert_array_equal(x_adv[::2], x[::2])  # budget 0: untouched
    assert np.abs(x_adv[1::2] - x[1::2]).max() == pytest.approx(0.3, abs=1e-5)
    res = evaluate_robustness(model, x, y, attack, eps=eps, cascade=True, batch_size=5)
    assert res.robust_accuracy <= res.clean_accuracy
    with pytest.raises(ValueError, match="one budget per example"):
        evaluate_robustness(model, x, y, attack, eps=eps[:3])
