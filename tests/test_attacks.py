"""The attack matrix: every attack and norm against the same invariants."""

import numpy as np
import pytest
import tensorflow as tf

from tfadv import attacks
from tfadv.attacks import objectives
from tfadv.ops import lp_norm

EPS = {"inf": 0.1, "2": 1.0}

# name -> (factory(eps), norm, direction): direction +1 raises the loss, -1 lowers it,
# 0: a minimum-norm attack (C&W) that only changes examples it flips.
# Square (a NumPy search, never traced) has the same contract tested in test_square.py.
ATTACKS = {
    "fgsm_inf": (lambda e: attacks.FGSM(eps=e), "inf", +1),
    "fgsm_l2": (lambda e: attacks.FGSM(eps=e, norm="2"), "2", +1),
    "pgd_inf": (lambda e: attacks.PGD(eps=e, step_size=e / 4, steps=8), "inf", +1),
    "pgd_l2": (lambda e: attacks.PGD(eps=e, step_size=e / 4, steps=8, norm="2"), "2", +1),
    "pgd_inf_margin": (lambda e: attacks.PGD(eps=e, step_size=e / 4, steps=8, objective="margin"),
                       "inf", +1),
    "apgd_inf": (lambda e: attacks.APGD(eps=e, steps=12), "inf", +1),
    "apgd_l2": (lambda e: attacks.APGD(eps=e, steps=12, norm="2"), "2", +1),
    "apgd_dlr": (lambda e: attacks.APGD(eps=e, steps=12, objective="dlr"), "inf", +1),
    "apgd_t": (lambda e: attacks.APGDT(eps=e, steps=6, num_targets=2), "inf", +1),
    "fab_inf": (lambda e: attacks.FAB(eps=e, steps=8), "inf", +1),
    "fab_t_l2": (lambda e: attacks.FABT(eps=e, norm="2", steps=8, num_targets=2), "2", +1),
    "inverse_pgd": (lambda e: attacks.InversePGD(eps=e, step_size=e / 2, steps=5), "inf", -1),
    "cw": (lambda e: attacks.CarliniWagnerL2(eps=e, max_iterations=30, binary_search_steps=3,
                                             initial_const=1.0), "2", 0),
}


def _ce(model, x, y):
    return float(tf.reduce_mean(objectives.cross_entropy(model(x), y)))


@pytest.fixture(scope="module")
def data(mnist_small):
    _, _, x, y = mnist_small
    return x[:64], y[:64]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_ball_bounds_shape(name, trained_mnist_model, data):
    factory, norm, _ = ATTACKS[name]
    x, y = data
    x_adv = factory(EPS[norm])(trained_mnist_model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == tf.float32
    assert lp_norm(x_adv - x, norm).numpy().max() <= EPS[norm] + 1e-5
    assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_zero_eps_returns_x(name, trained_mnist_model, data):
    factory, _, _ = ATTACKS[name]
    x, y = data
    np.testing.assert_array_equal(factory(0.0)(trained_mnist_model, x, y).numpy(), x)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_loss_moves_the_right_way(name, trained_mnist_model, data):
    factory, norm, direction = ATTACKS[name]
    x, y = data
    x_adv = factory(EPS[norm])(trained_mnist_model, x, y)
    before, after = _ce(trained_mnist_model, x, y), _ce(trained_mnist_model, x_adv, y)
    if direction > 0:
        assert after > before + 0.1, (before, after)
        acc = np.mean(np.argmax(trained_mnist_model(x_adv), -1) == y)
        clean = np.mean(np.argmax(trained_mnist_model(x), -1) == y)
        assert acc < clean
    elif direction < 0:
        assert after < before, (before, after)
    else:
        changed = np.any(x_adv.numpy() != x, axis=(1, 2, 3))
        assert changed.any() and after >= before
        assert np.all(np.argmax(trained_mnist_model(x_adv), -1)[changed] != y[changed])


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_targeted_pgd_moves_toward_target(norm, trained_mnist_model, data):
    x, y = data
    target = (y + 1) % 10
    eps = {"inf": 0.3, "2": 3.0}[norm]
    atk = attacks.PGD(eps=eps, step_size=eps / 8, steps=20, norm=norm, targeted=True)
    x_adv = atk(trained_mnist_model, x, target)
    assert _ce(trained_mnist_model, x_adv, target) < _ce(trained_mnist_model, x, target) - 1.0
    hit = np.mean(np.argmax(trained_mnist_model(x_adv), -1) == target)
    assert hit > 0.5


def test_targeted_cw_and_apgd_hit_target(trained_mnist_model, data):
    x, y = data
    x, y = x[:16], y[:16]
    target = (y + 3) % 10
    cw = attacks.CarliniWagnerL2(targeted=True, max_iterations=60, binary_search_steps=4,
                                 initial_const=1.0)
    x_cw = cw(trained_mnist_model, x, target)
    assert np.mean(np.argmax(trained_mnist_model(x_cw), -1) == target) > 0.8
    ap = attacks.APGD(eps=0.3, steps=30, targeted=True)
    x_ap = ap(trained_mnist_model, x, target)
    assert np.mean(np.argmax(trained_mnist_model(x_ap), -1) == target) > 0.5


def test_cw_finds_small_perturbations(trained_mnist_model, data):
    x, y = data
    x, y = x[:16], y[:16]
    x_adv = attacks.CarliniWagnerL2(max_iterations=80, binary_search_steps=5,
                                    initial_const=1.0)(trained_mnist_model, x, y)
    changed = np.any(x_adv.numpy() != x, axis=(1, 2, 3))
    fooled = np.argmax(trained_mnist_model(x_adv), -1) != y
    assert changed.mean() > 0.8
    np.testing.assert_array_equal(fooled[changed], True)
    # Unbounded C&W on an undefended MNIST net needs far less than a PGD-style L2 budget.
    assert np.median(lp_norm(x_adv - x, "2").numpy()[changed]) < 3.0


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pgd_matches_cleverhans(norm, tiny_model, batch):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    x, y = batch
    eps, step = (0.2, 0.03) if norm == "inf" else (1.5, 0.25)
    ours = attacks.PGD(eps=eps, step_size=step, steps=10, norm=norm, random_start=False)
    theirs = projected_gradient_descent(
        tiny_model, x, eps, step, 10, np.inf if norm == "inf" else 2, clip_min=0.0, clip_max=1.0,
        y=y, rand_init=False, sanity_checks=False,
    )
    np.testing.assert_allclose(ours(tiny_model, x, y).numpy(), theirs.numpy(), atol=1e-5)


def test_fgsm_matches_cleverhans(tiny_model, batch):
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method

    x, y = batch
    theirs = fast_gradient_method(tiny_model, x, 0.1, np.inf, clip_min=0.0, clip_max=1.0, y=y)
    np.testing.assert_allclose(attacks.FGSM(eps=0.1)(tiny_model, x, y).numpy(), theirs.numpy(),
                               atol=1e-6)


def test_targeted_pgd_matches_cleverhans(tiny_model, batch):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    x, y = batch
    t = (y + 1) % 4
    ours = attacks.PGD(eps=0.2, step_size=0.05, steps=5, random_start=False, targeted=True)
    theirs = projected_gradient_descent(tiny_model, x, 0.2, 0.05, 5, np.inf, clip_min=0.0,
                                        clip_max=1.0, y=t, targeted=True, rand_init=False,
                                        sanity_checks=False)
    np.testing.assert_allclose(ours(tiny_model, x, t).numpy(), theirs.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["pgd_inf", "pgd_l2", "inverse_pgd", "apgd_inf", "cw", "fgsm_inf"])
def test_runs_under_xla(name, tiny_model, batch):
    factory, norm, _ = ATTACKS[name]
    atk = factory(EPS[norm])
    if hasattr(atk, "random_start"):
        atk.random_start = False
    x, y = batch
    eager = atk(tiny_model, x, y).numpy()
    xla = tf.function(lambda a, b: atk(tiny_model, a, b), jit_compile=True)(x, y).numpy()
    np.testing.assert_allclose(xla, eager, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_config_round_trip(name):
    factory, norm, _ = ATTACKS[name]
    atk = factory(EPS[norm])
    again = attacks.deserialize(attacks.serialize(atk))
    assert type(again) is type(atk) and again.get_config() == atk.get_config()
    assert attacks.get(atk.name, **atk.get_config()) == atk


def test_pgd_default_step_size_is_madry():
    assert attacks.PGD(eps=0.3, steps=10).step_size == pytest.approx(0.075)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=0.3, steps=0), "steps"),
    (dict(eps=0.3, steps=2.5), "steps"),
    (dict(eps=0.3, step_size=-1.0), "step_size"),
    (dict(eps=0.3, norm="l1"), "norm"),
    (dict(eps=0.3, bounds=(1, 0)), "bounds"),
    (dict(eps=0.3, objective="nope"), "objective"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=0.3, random_start="yes"), "random_start"),
])
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.PGD(**kwargs)


def test_bad_calls(tiny_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="floating"):
        attacks.PGD(eps=0.1)(tiny_model, (x * 255).astype("uint8"), y)
    with pytest.raises(ValueError, match="targeted"):
        attacks.InversePGD(targeted=True)
    with pytest.raises(ValueError, match="Unknown attack"):
        attacks.get("deepfool")


def test_custom_objective_callable(tiny_model, batch):
    x, y = batch

    def neg_logit_sum(out, target):
        return -tf.reduce_sum(out, axis=-1)

    x_adv = attacks.PGD(eps=0.1, steps=3, objective=neg_logit_sum)(tiny_model, x, y)
    assert tf.reduce_sum(tiny_model(x_adv)) <= tf.reduce_sum(tiny_model(x))


def test_inverse_pgd_defaults_are_the_papers():
    a = attacks.InversePGD()
    assert (a.eps, a.step_size, a.steps, a.norm) == (4 / 255, 2 / 255, 5, "inf")


def test_apgd_checkpoints():
    from tfadv.attacks.apgd import apgd_checkpoints

    # Croce & Hein (2020): p = 0, .22, .41, .57, .70, .80, .87, .93, .99 for 100 iterations.
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("steps", [3, 12])
def test_unroll_choice_gives_the_same_attack(tiny_model, batch, steps):
    x, y = batch
    kw = dict(eps=0.1, steps=steps, random_start=False)
    loop, unrolled = attacks.PGD(unroll=False, **kw), attacks.PGD(unroll=True, **kw)
    auto = attacks.PGD(**kw)
    assert not loop.unrolled and unrolled.unrolled
    assert auto.unrolled == (steps <= attacks.pgd.UNROLL_MAX_STEPS)
    got = [tf.function(lambda a, b, atk=atk: atk(tiny_model, a, b))(x, y).numpy()
           for atk in (loop, unrolled, auto)]
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)
    np.testing.assert_allclose(got[0], got[2], atol=1e-6)
    again = attacks.deserialize(attacks.serialize(loop))
    assert again.unroll is False and again.get_config() == loop.get_config()


def test_unroll_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="unroll"):
        attacks.PGD(eps=0.1, unroll="yes")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_per_call_eps_is_the_attack_built_at_that_budget(name, trained_mnist_model, data):
    """attack(model, x, y, eps=e) == the same attack built with eps=e (step sizes
    are proportional to eps in the table), for a scalar and a per-example budget."""
    factory, norm, _ = ATTACKS[name]
    x, y = data
    x, y = x[:16], y[:16]
    e = EPS[norm]
    big = factory(2 * e)
    if hasattr(big, "random_start"):
        big.random_start = False
    small = factory(e)
    if hasattr(small, "random_start"):
        small.random_start = False
    want = small(trained_mnist_model, x, y).numpy()
    np.testing.assert_allclose(big(trained_mnist_model, x, y, eps=e).numpy(), want, atol=1e-5)
    per_example = tf.fill([len(x)], tf.constant(e, tf.float32))
    np.testing.assert_allclose(big(trained_mnist_model, x, y, eps=per_example).numpy(), want,
                               atol=1e-5)


def test_per_call_eps_varies_per_example_without_retracing(trained_mnist_model, data):
    x, y = data
    x, y = x[:8], y[:8]
    attack = attacks.PGD(eps=0.2, steps=5, random_start=False)
    fn = tf.function(lambda x, y, e: attack(trained_mnist_model, x, y, eps=e))
    budgets = np.linspace(0.0, 0.2, len(x)).astype(np.float32)
    x_adv = fn(tf.constant(x), tf.constant(y), tf.constant(budgets)).numpy()
    assert np.all(np.abs(x_adv - x).reshape(len(x), -1).max(1) <= budgets + 1e-6)
    np.testing.assert_array_equal(x_adv[0], x[0])  # budget 0: unchanged
    for e in (0.05, 0.1):
        fn(tf.constant(x), tf.constant(y), tf.fill([len(x)], e))
    assert fn.experimental_get_tracing_count() == 1


def test_per_call_eps_errors(trained_mnist_model, data):
    x, y = data
    with pytest.raises(ValueError, match="finite and >= 0"):
        attacks.PGD(eps=0.1)(trained_mnist_model, x[:2], y[:2], eps=-0.1)
    with pytest.raises(ValueError, match="positive eps"):
        attacks.PGD(eps=0.0)(trained_mnist_model, x[:2], y[:2], eps=0.1)
    with pytest.raises(ValueError, match="positive eps"):
        attacks.CarliniWagnerL2()(trained_mnist_model, x[:2], y[:2], eps=0.1)
