"""Attacks on embeddings: dodging / impersonation, success at a threshold, minimal eps."""

import numpy as np
import pytest
import tensorflow as tf

import keras
import tfadv
from tests.conftest import tiny_embedder
from tfadv.attacks import embedding as E

A = 2.0


class ScalarToy(keras.Model):
    """e(x) = normalize([1, A x]); against reference [1, 0], cos = 1 / sqrt(1 + A^2 x^2).

    Dodging at threshold t succeeds iff |x| > sqrt(1/t^2 - 1) / A: a known minimal eps.
    """

    def call(self, x):
        x = tf.reshape(x, [-1, 1])
        return tf.math.l2_normalize(tf.concat([tf.ones_like(x), A * x], -1), -1)


def _known_min_eps(threshold):
    return np.sqrt(1 / threshold**2 - 1) / A


@pytest.fixture
def conv_embedder():
    return tiny_embedder(16, 6, activation="tanh", seed=3)


@pytest.fixture
def faces():
    return np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")


def _cos(a, b):
    return E.cosine_similarity(a, b).numpy()


def test_cosine_distance_objective_registered():
    f = tfadv.attacks.objectives.get("cosine_distance")
    a = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    b = np.array([[1.0, 0.0], [1.0, 0.0]], "float32")
    np.testing.assert_allclose(f(a, b), [0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("inf", 4.0), ("2", 200.0)])
def test_dodging_stays_in_ball_and_bounds_and_moves_away(conv_embedder, faces, norm, eps):
    ref = conv_embedder(faces)
    attack = E.dodging_pgd(eps=eps, steps=10, norm=norm)
    x_adv = attack(conv_embedder, faces, ref).numpy()
    delta = (x_adv - faces).reshape(len(faces), -1)
    size = np.abs(delta).max(1) if norm == "inf" else np.linalg.norm(delta, axis=1)
    assert (size <= eps + 1e-3).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 255
    assert (_cos(conv_embedder(x_adv), ref) < 1 - 1e-4).all()


def test_cosine_gradient_vanishes_at_the_clean_image(conv_embedder, faces):
    # At the clean image the distance to its own embedding is at its minimum:
    # the gradient is (numerically) zero, which is why dodging PGD starts at a
    # random point of the ball.
    from tfadv.attacks.base import input_gradient

    ref = conv_embedder(faces)
    f = tfadv.attacks.objectives.get("cosine_distance")
    _, _, g0 = input_gradient(conv_embedder, tf.constant(faces), ref, f)
    noisy = tf.constant(faces + np.random.default_rng(1).uniform(-4, 4, faces.shape), tf.float32)
    _, _, g1 = input_gradient(conv_embedder, noisy, ref, f)
    assert np.abs(g0.numpy()).max() < 1e-3 * np.abs(g1.numpy()).max()


def test_impersonation_pulls_toward_target(conv_embedder, faces):
    target = conv_embedder(faces[::-1])
    before = _cos(conv_embedder(faces), target)
    x_adv = E.impersonation_pgd(eps=8.0, steps=10)(conv_embedder, faces, target)
    after = _cos(conv_embedder(x_adv), target)
    assert (after >= before - 1e-6).all() and after.mean() > before.mean()
    assert np.abs(x_adv.numpy() - faces).max() <= 8.0 + 1e-3


def test_attack_success_at_threshold():
    e = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], "float32")
    ref = np.array([[1.0, 0.0]] * 3, "float32")
    np.testing.assert_array_equal(E.attack_success(e, ref, 0.6, "dodging"), [False, False, True])
    np.testing.assert_array_equal(E.attack_success(e, ref, 0.6, "impersonation"),
                                  [True, True, False])
    with pytest.raises(ValueError, match="Expected mode"):
        E.attack_success(e, ref, 0.5, "evade")


@pytest.mark.parametrize("threshold", [0.9, 0.6])
def test_minimal_eps_matches_closed_form(threshold):
    model = ScalarToy()
    x = np.zeros((4, 1), "float32")
    ref = np.tile([[1.0, 0.0]], (4, 1)).astype("float32")
    attack = E.dodging_pgd(eps=2.0, steps=10, bounds=None)
    found = E.minimal_eps(attack, model, x, ref, threshold, search_steps=10)
    np.testing.assert_allclose(found, _known_min_eps(threshold), atol=2.0 / 2**10 + 1e-3)


def test_minimal_eps_inf_when_budget_too_small_and_zero_when_clean_succeeds():
    model = ScalarToy()
    ref = np.tile([[1.0, 0.0]], (2, 1)).astype("float32")
    x = np.array([[0.0], [5.0]], "float32")  # the second already fails to match
    attack = E.dodging_pgd(eps=0.1, steps=5, bounds=None)
    found = E.minimal_eps(attack, model, x, ref, 0.6)
    assert np.isinf(found[0]) and found[1] == 0.0


def test_embedding_cw_finds_the_minimal_l2_perturbation():
    model = ScalarToy()
    thr = 0.8
    x = np.full((3, 1), 0.01, "float32")
    ref = np.tile([[1.0, 0.0]], (3, 1)).astype("float32")
    cw = E.EmbeddingCW(threshold=thr, bounds=(-5.0, 5.0), learning_rate=0.05,
                       max_iterations=200)
    x_adv = cw(model, x, ref).numpy()
    assert E.attack_success(model(x_adv), ref, thr, "dodging").numpy().all()
    np.testing.assert_allclose(np.abs(x_adv).ravel(), _known_min_eps(thr), atol=0.01)


def test_embedding_apgd_succeeds_and_respects_budget(conv_embedder, faces):
    ref = conv_embedder(faces)
    attack = E.EmbeddingAPGD(eps=16.0, threshold=0.9, steps=20)
    x_adv = attack(conv_embedder, faces, ref).numpy()
    assert np.abs(x_adv - faces).max() <= 16.0 + 1e-3
    # It returns the first iterate past the threshold: every face is dodged.
    assert E.attack_success(conv_embedder(x_adv), ref, 0.9, "dodging").numpy().all()
    clean = E.attack_success(conv_embedder(faces), ref, 0.9, "dodging").numpy()
    assert not clean.any()


@pytest.mark.parametrize("attack", [
    E.EmbeddingAPGD(eps=4.0, threshold=0.5, steps=7, targeted=True),
    E.EmbeddingCW(threshold=0.4, confidence=0.1),
    E.dodging_pgd(eps=4.0),
    E.embedding_fgsm("impersonation", eps=2.0),
])
def test_round_trip(attack):
    again = tfadv.attacks.deserialize(tfadv.attacks.serialize(attack))
    assert again == attack and again.get_config() == attack.get_config()


def test_inside_tf_function(conv_embedder, faces):
    ref = conv_embedder(faces)
    attack = E.dodging_pgd(eps=4.0, steps=5)
    fn = tf.function(lambda x, r: attack(conv_embedder, x, r))
    x_adv = fn(tf.constant(faces), ref).numpy()
    assert np.abs(x_adv - faces).max() <= 4.0 + 1e-3


@pytest.mark.parametrize("norm", ["inf", "linf", "Linf", "LINF", "l_inf", "infinity", np.inf,
                                  float("inf")])
def test_linf_spellings_get_the_linf_step(norm):
    attack = E.embedding_pgd(eps=4.0, norm=norm)
    assert attack.norm == "inf" and attack.step_size == 1.0  # eps / 4
    assert E.default_step_size(4.0, norm) == 1.0


@pytest.mark.parametrize("norm", ["2", "l2", "L2", "l_2", 2, 2.0])
def test_l2_spellings_get_the_l2_step(norm):
    attack = E.embedding_pgd(eps=4.0, norm=norm)
    assert attack.norm == "2" and attack.step_size == pytest.approx(0.8)  # eps / 5


@pytest.mark.parametrize("norm", ["l1", "1", "np.inf", "", None, True])
def test_unknown_norm_is_rejected(norm):
    with pytest.raises(ValueError, match="norm"):
        E.embedding_pgd(eps=4.0, norm=norm)
    with pytest.raises(ValueError, match="norm"):
        E.default_step_size(4.0, norm)


def test_generate_step_default_follows_the_norm_spelling():
    from tfadv.recipes import facenet_generate as G

    assert G.default_step_size(8.0, "Linf") == 2.0
    assert G.default_step_size(8.0, "L2") == pytest.approx(1.6)
    run, config = G.make_attack("pgd", "dodging", 8.0, threshold=0.5, norm="l_inf")
    assert config["norm"] == "inf" and config["step_size"] == 2.0
    _, ch = G.make_attack("cleverhans_pgd", "dodging", 8.0, threshold=0.5, norm="Linf")
    assert ch["norm"] == "inf" and ch["eps_iter"] == 2.0


def test_minimal_eps_compiled_once_for_equal_attacks():
    from tfadv.evaluation import compiled as C

    model = ScalarToy()
    x = np.array([[0.05], [0.1]], "float32")  # off 0, where the cosine gradient vanishes
    ref = np.tile([[1.0, 0.0]], (2, 1)).astype("float32")
    for _ in range(3):
        attack = E.embedding_pgd(eps=2.0, steps=5, random_start=False, bounds=None)
        got = E.minimal_eps(attack, model, x, ref, 0.9, search_steps=4)
    assert len(C.cached_keys(model)) == 1 and C.tracing_count(model) <= 2
    # Still the closed form: the search lands at most 2 / 2**4 above the distance to it.
    need = _known_min_eps(0.9) - x[:, 0]
    assert (got >= need - 1e-5).all() and (got <= need + 2.0 / 2**4 + 1e-5).all(), got


@pytest.mark.parametrize("make", [
    lambda t: E.EmbeddingAPGD(eps=4.0, threshold=t),
    lambda t: E.EmbeddingCW(threshold=t),
    lambda t: E.attack_success(np.ones((1, 3)), np.ones((1, 3)), t, "dodging"),
])
@pytest.mark.parametrize("bad", [1.5, -2.0, float("nan")])
def test_embedding_thresholds_follow_the_one_rule(make, bad):
    with pytest.raises(ValueError, match=r"cosine similarity, a finite number in \[-1, 1\]"):
        make(bad)


def test_success_at_is_the_rule_on_similarities():
    sims = np.array([-0.2, 0.29, 0.3, 0.9], np.float32)
    np.testing.assert_array_equal(E.success_at(sims, 0.3, "dodging"), [True, True, False, False])
    np.testing.assert_array_equal(E.success_at(sims, 0.3, "impersonation"),
                                  [False, False, True, True])
    assert E.success_at(0.3, 0.3, "impersonation") is True
    np.testing.assert_array_equal(E.success_at(tf.constant(sims), 0.3, "dodging").numpy(),
                                  [True, True, False, False])
    with pytest.raises(ValueError, match="mode"):
        E.success_at(sims, 0.3, "spoofing")


@pytest.mark.parametrize("traced", [False, True])
def test_attack_success_takes_float64_embeddings(traced):
    """float64 embeddings give float64 similarities: the threshold is compared in
    their dtype (it was a float32 constant: InvalidArgumentError)."""
    rng = np.random.default_rng(5)
    e = rng.normal(size=(40, 8))
    ref = e + rng.normal(scale=0.8, size=e.shape)
    sim = np.sum(e * ref, 1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
    fn = E.attack_success
    if traced:
        fn = tf.function(lambda a, b, t, mode: E.attack_success(a, b, t, mode))
    for mode, expected in (("dodging", sim < 0.5), ("impersonation", sim >= 0.5)):
        threshold = tf.constant(0.5, tf.float64) if traced else 0.5
        got = fn(tf.constant(e), tf.constant(ref), threshold, mode).numpy()
        np.testing.assert_array_equal(got, expected)
        assert 0 < expected.sum() < 40
