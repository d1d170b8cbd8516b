"""The attack call contract under inputs users really pass: half-precision
floats, every label format, inputs outside the bounds, too few classes.

Every attack of the matrix in tests/test_attacks.py goes through each case.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv import attacks
from tfadv.attacks import objectives
from tfadv.evaluation import evaluate_robustness
from tfadv.ops import lp_norm, normalize_gradient, project, random_start

from test_attacks import ATTACKS

EPS = {"inf": 0.1, "2": 1.0}


def _linear(num_classes=4, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    m = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(num_classes)])
    m.layers[0].set_weights([rng.normal(size=(dim, num_classes)).astype("float32") * 3,
                             np.zeros(num_classes, "float32")])
    return m


def _points(n=200, dim=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.2, 0.8, size=(n, dim)).astype("float32")


# -- 1. float dtypes ------------------------------------------------------------------


def test_l2_pgd_on_float16_zero_gradient_returns_x():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, kernel_initializer="zeros")])
    x = tf.constant(np.full((2, 4), 0.5), tf.float16)
    for attack in (attacks.PGD(eps=0.5, steps=2, norm="2", random_start=False),
                   attacks.FGSM(eps=0.5, norm="2"),
                   attacks.APGD(eps=0.5, steps=3, norm="2", random_start=False)):
        x_adv = attack(m, x, np.array([0, 1]))
        assert x_adv.dtype == tf.float16
        np.testing.assert_array_equal(x_adv.numpy(), x.numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_finite_in_every_float_dtype(name, dtype):
    factory, norm, _ = ATTACKS[name]
    keras.utils.set_random_seed(0)
    # Confident logits (scale 40): the softmax saturates, gradients are tiny.
    m = _linear(num_classes=4, dim=64)
    m.layers[0].set_weights([m.layers[0].get_weights()[0] * 40, np.zeros(4, "float32")])
    x32 = _points(16, 64)
    y = np.argmax(m(x32).numpy(), -1)
    x = tf.cast(x32, dtype)
    eps = EPS[norm]
    x_adv = factory(eps)(m, x, y)
    assert x_adv.dtype == x.dtype
    adv = tf.cast(x_adv, tf.float64).numpy()
    assert np.isfinite(adv).all()
    resolution = {"float16": 1e-3, "bfloat16": 1e-2}.get(dtype, 1e-5)
    assert adv.min() >= 0 and adv.max() <= 1
    delta = adv - tf.cast(x, tf.float64).numpy()
    size = np.abs(delta).max(1) if norm == "inf" else np.sqrt((delta ** 2).sum(1))
    assert size.max() <= eps * (1 + resolution) + resolution


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e30])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_l2_direction_for_any_gradient_scale(scale, dtype):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 50))
    g[2] = 0.0
    gd = tf.cast(tf.constant(g * scale, tf.float64), dtype)
    representable = tf.cast(gd, tf.float64).numpy()
    unit = normalize_gradient(gd, "2")
    assert unit.dtype == gd.dtype
    u = tf.cast(unit, tf.float64).numpy()
    assert np.isfinite(u).all()
    np.testing.assert_array_equal(u[2], 0.0)
    nonzero = np.abs(representable).max(1) > 0
    # What the dtype can represent of the gradient, normalised in float64; where
    # it overflowed to inf, the infinite entries give the direction.
    inf_rows = np.isinf(representable).any(1, keepdims=True)
    representable = np.where(inf_rows, np.where(np.isinf(representable),
                                                np.sign(representable), 0), representable)
    expected = representable[nonzero] / np.linalg.norm(representable[nonzero], axis=1,
                                                       keepdims=True)
    tol = {"float16": 2e-3, "bfloat16": 2e-2}.get(dtype, 1e-6)
    np.testing.assert_allclose(u[nonzero], expected, atol=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_l2_norm_and_projection_do_not_overflow(dtype):
    # ||(300, ..., 300)||_2 over 1000 dims = 9487: representable in float16, but
    # its sum of squares (9e7) is not.
    delta = tf.cast(tf.fill([2, 1000], 300.0), dtype)
    np.testing.assert_allclose(tf.cast(lp_norm(delta, "2"), tf.float64).numpy(),
                               300 * np.sqrt(1000), rtol=1e-2)
    p = tf.cast(project(delta, 10.0, "2"), tf.float64).numpy()
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 10.0, rtol=1e-2)
    # Inside the ball: unchanged.
    small = tf.cast(tf.fill([2, 1000], 1e-3), dtype)
    np.testing.assert_array_equal(project(small, 10.0, "2").numpy(), small.numpy())


def test_l2_random_start_in_half_precision_for_large_inputs():
    # d = 224*224*3 exceeds float16's range: the radius exponent 1/d must not be 0.
    shape = tf.constant([4, 224, 224, 3])
    d = random_start(shape, 2.0, "2", tf.float16)
    norms = np.linalg.norm(tf.cast(d, tf.float64).numpy().reshape(4, -1), axis=1)
    assert np.isfinite(norms).all() and (norms <= 2.0 * 1.01).all() and (norms > 1.9).all()


def test_adversarial_training_on_float16_pipeline_with_l2_attack_stays_finite():
    from tfadv import AdversarialModel

    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model = AdversarialModel(base, attacks.PGD(eps=0.5, steps=3, norm="2"))
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.full((32, 6), 0.5, np.float16)  # identical points: zero-gradient L2 steps
    y = np.zeros(32, np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model.fit(ds, epochs=2, verbose=0)
    assert all(np.isfinite(w).all() for w in base.get_weights())


# -- 2. classes each objective needs ------------------------------------------------


@pytest.mark.parametrize("factory", [
    lambda: attacks.APGD(eps=0.1, steps=3, objective="dlr"),
    lambda: attacks.PGD(eps=0.1, steps=3, objective="dlr"),
])
def test_dlr_with_two_classes_is_a_clear_value_error(factory):
    m = _linear(num_classes=2)
    x, y = _points(8), np.zeros(8, np.int64)
    with pytest.raises(ValueError, match="at least 3 output classes.*margin"):
        factory()(m, x, y)
    # Also when traced inside a tf.function.
    with pytest.raises(ValueError, match="at least 3"):
        tf.function(lambda a, b: factory()(m, a, b))(x, y)


@pytest.mark.parametrize("objective", ["ce", "margin", "dlr", "kl"])
def test_single_logit_models_are_rejected_by_class_objectives(objective):
    m = _linear(num_classes=1)
    target = np.ones((4, 1), np.float32) if objective == "kl" else np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="at least"):
        attacks.PGD(eps=0.1, steps=2, objective=objective)(m, _points(4), target)


def test_dlr_and_margin_values_for_enough_classes():
    logits = tf.constant([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = tf.constant([0, 1])
    np.testing.assert_allclose(objectives.dlr(logits, y).numpy(), [(1 - 3) / 3, (5 - 2) / 5])
    m2 = objectives.margin(tf.constant([[1.0, 4.0]]), tf.constant([0]))
    np.testing.assert_allclose(m2.numpy(), [3.0])


# -- 3. label formats ----------------------------------------------------------------


def _formats(y, num_classes):
    return {
        "int [N]": y.astype(np.int64),
        "int32 [N, 1]": y.astype(np.int32)[:, None],
        "float [N, 1]": y.astype(np.float32)[:, None],
        "float [N]": y.astype(np.float64),
        "one-hot": np.eye(num_classes, dtype=np.float32)[y],
    }


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_label_format_gives_the_same_attack(name):
    factory, norm, _ = ATTACKS[name]
    m = _linear()
    x = _points(40)
    y = np.argmax(m(x).numpy(), -1)
    results = {}
    for fmt, labels in _formats(y, 4).items():
        keras.utils.set_random_seed(3)
        results[fmt] = factory(EPS[norm])(m, x, labels).numpy()
    for fmt, x_adv in results.items():
        np.testing.assert_allclose(x_adv, results["int [N]"], atol=1e-6, err_msg=fmt)


def test_float_column_labels_give_the_int_labels_robust_accuracy():
    m = _linear()
    x = _points(200)
    y = np.argmax(m(x).numpy(), -1)
    attack = attacks.PGD(eps=0.1, steps=10, random_start=False)
    accs = {fmt: evaluate_robustness(m, x, labels, attack).robust_accuracy
            for fmt, labels in _formats(y, 4).items()}
    assert accs["int [N]"] < 0.9
    assert len(set(accs.values())) == 1, accs


def test_trainer_attack_target_accepts_float_column_labels():
    x = _points(8)
    m = _linear()
    y = np.argmax(m(x).numpy(), -1)
    attack = attacks.PGD(eps=0.1, steps=3, random_start=False)
    run = tf.function(lambda a, b: attack(m, a, b))
    np.testing.assert_allclose(run(x, y.astype(np.float32)[:, None]).numpy(),
                               attack(m, x, y).numpy(), atol=1e-6)


@pytest.mark.parametrize("labels,match", [
    (np.array([0.5, 1.0]), "not whole numbers"),
    (np.zeros((2, 1, 1)), "shape"),
])
def test_bad_labels_are_value_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        attacks.PGD(eps=0.1, steps=1)(_linear(), _points(2), labels)
    with pytest.raises(ValueError, match=match):
        evaluate_robustness(_linear(), _points(2), labels, attacks.FGSM(eps=0.1))


# -- 4. inputs outside the bounds ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_raw_pixels_with_unit_bounds_are_refused(name):
    factory, norm, _ = ATTACKS[name]
    m = _linear()
    x = _points(8) * 255
    y = np.zeros(8, np.int64)
    with pytest.raises(ValueError, match=r"outside the attack bounds.*bounds=\(0, 255\)"):
        factory(EPS[norm])(m, x, y)
    # Inside a tf.function the same message comes from an assertion.
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the attack bounds"):
        tf.function(lambda a, b: factory(EPS[norm])(m, a, b))(x, y)


def test_evaluation_refuses_raw_pixels_with_unit_bounds():
    m = _linear()
    with pytest.raises(ValueError, match=r"values in \[5\d\.\d*, 20\d\.?\d*\]"):
        evaluate_robustness(m, _points(8) * 255, np.zeros(8, np.int64),
                            attacks.PGD(eps=8 / 255, steps=2))


def test_pixel_bounds_keep_the_eps_ball():
    m = _linear()
    x = _points(8) * 255
    y = np.zeros(8, np.int64)
    for attack in (attacks.PGD(eps=8, steps=3, bounds=(0, 255)),
                   attacks.FGSM(eps=8, bounds=(0, 255)),
                   attacks.APGD(eps=8, steps=3, bounds=(0, 255))):
        x_adv = attack(m, x, y).numpy()
        assert np.abs(x_adv - x).max() <= 8 + 1e-3
        assert np.abs(x_adv - x).max() > 1


def test_out_of_bounds_inputs_under_xla_stay_in_the_ball():
    # XLA drops assertions; the attack must still not leave the eps-ball.
    m = _linear()
    x = _points(8) * 255
    y = np.zeros(8, np.int64)
    run = tf.function(lambda a, b: attacks.PGD(eps=0.03, steps=2)(m, a, b), jit_compile=True)
    try:
        x_adv = run(x, y).numpy()
    except tf.errors.InvalidArgumentError as e:
        assert "outside the attack bounds" in str(e)
        return
    assert np.abs(x_adv - x).max() <= 0.03 + 1e-4


def test_mixed_float16_backward_pass_does_not_mask_gradients():
    # A confident classifier computing in float16: small logit gradients flush to
    # zero on the way back, so without rescaling PGD leaves 39% of these points
    # standing where the same weights in float32 leave none.
    accs = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        cnn = keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(stddev=3)),
            keras.layers.Activation("linear", dtype="float32")])
        x = tf.random.uniform((64, 8, 8, 1), seed=1).numpy()
        y = np.argmax(cnn(x).numpy(), -1)
        accs[policy] = evaluate_robustness(
            cnn, x, y, attacks.PGD(eps=0.5, steps=20, random_start=False)).robust_accuracy
    keras.mixed_precision.set_global_policy("float32")
    assert accs["float32"] == 0.0
    assert accs["mixed_float16"] == accs["float32"], accs


# -- the same kinds, found in review ------------------------------------------------


def _confident_float64():
    d = 8
    w = np.zeros((d, 3))
    w[:, 0], w[:, 1] = 1.0, -1.0
    inp = keras.Input((d,), dtype="float64")
    out = keras.layers.Dense(3, dtype="float64", kernel_initializer=keras.initializers.Constant(w),
                             bias_initializer=keras.initializers.Constant([200.0, 0, 0]))(inp)
    return keras.Model(inp, out), np.full((2, d), 0.5, np.float64), np.array([0, 0])


def test_confident_float64_model_still_gets_a_step():
    # Its input gradient (about 5e-91) is zero in float32.
    m, x, y = _confident_float64()
    for attack, size in ((attacks.PGD(eps=0.1, steps=3, random_start=False), 0.1),
                         (attacks.FGSM(eps=0.1), 0.1),
                         (attacks.PGD(eps=0.5, steps=3, norm="2", random_start=False), 0.5)):
        delta = attack(m, x, y).numpy() - x
        norm = np.abs(delta).max(1) if attack.norm == "inf" else np.linalg.norm(delta, axis=1)
        np.testing.assert_allclose(norm, size, rtol=1e-6)


def test_float16_logits_still_get_a_step():
    # mixed_float16 with Keras' default float16 logits and a logit gap of 48: the
    # softmax gradient (e^-48) does not exist in float16.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        w = np.zeros((8, 3), np.float32)
        w[:, 0], w[:, 1] = 1.0, -1.0
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(
            3, kernel_initializer=keras.initializers.Constant(w),
            bias_initializer=keras.initializers.Constant([40.0, 0, 0]))])
        x = np.full((2, 8), 0.5, np.float32)
        assert m(x).dtype == tf.float16
        for attack in (attacks.PGD(eps=0.1, steps=2, random_start=False),
                       attacks.PGD(eps=0.5, steps=2, norm="2", random_start=False)):
            assert np.abs(attack(m, x, np.array([0, 0])).numpy() - x).max() > 0.09
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_cw_refuses_single_logit_models():
    with pytest.raises(ValueError, match="at least 2 output classes"):
        attacks.CarliniWagnerL2(max_iterations=2)(_linear(num_classes=1), _points(4),
                                                  np.zeros(4, np.int64))


def test_centre_extraction_from_a_dataset_follows_the_label_contract():
    from tfadv.evaluation.centers import extract_centers
    from tfadv.models import mnist_feature_net

    net = mnist_feature_net(arch="small")
    x = np.random.default_rng(0).uniform(0, 1, (8, 28, 28, 1)).astype("float32")
    y = np.array([0, 1, 2, 3] * 2)
    ref, counts = extract_centers(net, (x, y), num_classes=4)
    onehot = tf.data.Dataset.from_tensor_slices((x, np.eye(4, dtype="float32")[y])).batch(4)
    got, got_counts = extract_centers(net, onehot, num_classes=4)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    np.testing.assert_array_equal(got_counts, counts)
    halves = tf.data.Dataset.from_tensor_slices((x, y + 0.5)).batch(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not whole numbers"):
        extract_centers(net, halves, num_classes=4)


def test_apgd_with_other_targets_returns_the_highest_loss_iterate():
    m = _linear()
    x = _points(16)
    y = np.argmax(m(x).numpy(), -1)

    def my_ce(logits, target):  # an unregistered callable: labels passed unchanged
        return objectives.cross_entropy(logits, tf.reshape(target, [-1]))

    keras.utils.set_random_seed(0)
    col = attacks.APGD(eps=0.1, steps=5, objective=my_ce)(m, x, y[:, None]).numpy()
    keras.utils.set_random_seed(0)
    flat = attacks.APGD(eps=0.1, steps=5, objective=my_ce)(m, x, y).numpy()
    np.testing.assert_allclose(col, flat, atol=1e-6)
    # KL towards the clean probabilities (TRADES' inner problem) runs too.
    probs = tf.nn.softmax(m(x))
    x_kl = attacks.APGD(eps=0.1, steps=5, objective="kl")(m, x, probs).numpy()
    kl = objectives.kl_divergence(m(x_kl), probs).numpy()
    assert np.all(kl > 0)


def test_attacks_with_different_callables_of_one_name_are_different():
    def make(sign):
        def loss(logits, target):
            return sign * objectives.cross_entropy(logits, target)
        return loss

    up = attacks.PGD(eps=0.2, steps=5, random_start=False, objective=make(1.0))
    down = attacks.PGD(eps=0.2, steps=5, random_start=False, objective=make(-1.0))
    assert up != down and len({up, down}) == 2
    assert up == attacks.PGD(eps=0.2, steps=5, random_start=False, objective=up.objective)
    m = _linear()
    x = _points(64)
    y = np.argmax(m(x).numpy(), -1)
    first = evaluate_robustness(m, x, y, up).robust_accuracy
    second = evaluate_robustness(m, x, y, down).robust_accuracy
    assert first < 1.0 and second == 1.0


def test_tensor_thresholds_follow_the_one_rule():
    from tfadv.attacks.embedding import attack_success

    e = np.ones((2, 3), np.float32)
    for thr in (tf.constant(1.5), tf.Variable(-1.5)):
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            attack_success(e, e, thr, "dodging")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[-1, 1\]"):
        tf.function(lambda t: attack_success(e, e, t, "dodging"))(tf.constant(1.5))


def test_best_threshold_of_cosines_stays_in_the_cosine_range(tmp_path):
    from tfadv.evaluation.verification import best_threshold, load_threshold, save_threshold

    from tfadv.evaluation.verification import accuracy_at, verification_report


    scores, same = np.array([1.0, 0.9, 0.5]), np.array([False, False, True])
    # Uncapped, "accept none" (2/3 right) sits above 1; capped at 1.0 the
    # identical pair is accepted (1/3 right), as good as "accept all".
    assert best_threshold(scores, same) == (float(np.nextafter(1.0, 2.0)), 2 / 3)
    threshold, accuracy = best_threshold(scores, same, max_threshold=1.0)
    assert threshold == 1.0 and accuracy == pytest.approx(1 / 3)
    assert accuracy == accuracy_at(scores, same, threshold)
    # Two photos that embed identically but are different people.
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    report = verification_report(emb, pairs=([0, 0, 2], [1, 2, 3], [False, False, True]),
                                 folds=2)
    assert report["threshold"] == 1.0
    save_threshold(tmp_path, report["threshold"])
    assert load_threshold(tmp_path) == 1.0


@pytest.mark.parametrize("spelling,norm", [("Linf", "inf"), ("infinity", "inf"), ("L2", "2")])
def test_cli_norm_options_take_every_spelling(spelling, norm):
    from tfadv.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "m.keras", "--norm", spelling]).norm == norm
    assert parser.parse_args(["curve", "m.keras", "--out", "o", "--norm", spelling]).norm == norm
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "m.keras", "--norm", "l1"])


def test_norm_ops_propagate_and_broadcast_like_linf():
    x = tf.constant([[np.inf, 1.0], [np.nan, 3.0], [3.0, 4.0]])
    np.testing.assert_array_equal(lp_norm(x, "2").numpy(), [np.inf, np.nan, 5.0])
    np.testing.assert_array_equal(project(tf.constant([[np.nan, 2.0]]), 1.0, "inf").numpy(),
                                  [[0.0, 1.0]])
    d = random_start(tf.constant([2, 50]), tf.constant([0.1, 1.0]), "inf").numpy()
    assert np.abs(d[0]).max() <= 0.1 and np.abs(d[1]).max() > 0.5
    d2 = random_start(tf.constant([2, 50]), tf.constant([0.1, 1.0]), "2").numpy()
    assert np.linalg.norm(d2[0]) <= 0.1 + 1e-6 and np.linalg.norm(d2[1]) > 0.5
