"""The fast adversarial training methods (FGSM-RS, N-FGSM, free): closed-form steps on a
linear model, their noise, XLA, the embedding trainer, and their settings."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tests.test_trainer import B, EPS, LR, W, X, Y, ce_grads, linear_model
from tfadv.attacks import PGD
from tfadv.trainers import fast

THREAT = PGD(eps=EPS)  # the fast methods read eps, norm and bounds from it


def fit(x=X, y=Y, epochs=1, jit=False, batch_size=2, **kwargs):
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=THREAT, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return base.get_weights(), model, history.history


def sgd_on(x_adv, w=W, b=B):
    _, gw, gb = ce_grads(x_adv, Y, w, b)
    return w - LR * gw, b - LR * gb


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method, step, projected", [
    ("fgsm_rs", 1.25, True), ("fgsm_rs", 2.0, True), ("n_fgsm", 1.0, False),
    ("n_fgsm", 2.0, False)])
def test_one_step_methods_match_numpy(method, step, projected, jit):
    """No start noise: x_adv = x + min(step, 1) * eps * sign(grad) (FGSM-RS projects onto the
    ball; N-FGSM does not), then one SGD step on it."""
    gx, _, _ = ce_grads(X, Y)
    reach = min(step, 1.0) if projected else step
    x_adv = np.clip(X + reach * EPS * np.sign(gx), 0, 1)
    (w, b), _, _ = fit(method=method, fast_step=step, fast_noise=0.0, jit=jit)
    want_w, want_b = sgd_on(x_adv)
    np.testing.assert_allclose(w, want_w, atol=1e-6)
    np.testing.assert_allclose(b, want_b, atol=1e-6)


def free_numpy(replays, epochs):
    """Shafahi et al.'s algorithm on one batch per epoch, in NumPy."""
    w, b, delta = W.copy(), B.copy(), np.zeros_like(X)
    for _ in range(epochs):
        for _ in range(replays):
            x_adv = np.clip(X + delta, 0, 1)
            gx, gw, gb = ce_grads(x_adv, Y, w, b)
            w, b = w - LR * gw, b - LR * gb
            delta = np.clip(x_adv - X + EPS * np.sign(gx), -EPS, EPS)
    return w, b


@pytest.mark.parametrize("jit", [False, True])
def test_free_replays_match_numpy(jit):
    """m replays per batch, each one SGD step; the perturbation steps on the same backward
    pass and is carried into the next batch (here the next epoch's)."""
    (w, b), model, history = fit(method="free", free_replays=3, epochs=2, jit=jit)
    want_w, want_b = free_numpy(3, 2)
    np.testing.assert_allclose(w, want_w, atol=1e-5)
    np.testing.assert_allclose(b, want_b, atol=1e-5)
    assert int(model.optimizer.iterations.numpy()) == 6
    assert len(history["loss"]) == 2


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_free_logs_every_replay(mode):
    """The logged loss is the mean of the m replays' losses and compiled metrics count every
    replay's examples, whether the replays run eagerly, in one traced loop (graph, XLA)."""
    from tests.test_trainer import softmax
    w, b, delta, losses = W.copy(), B.copy(), np.zeros_like(X), []
    for _ in range(3):
        x_adv = np.clip(X + delta, 0, 1)
        p = softmax(x_adv @ w + b)
        losses.append(-np.log(p[np.arange(len(Y)), Y]).mean())
        gx, gw, gb = ce_grads(x_adv, Y, w, b)
        w, b = w - LR * gw, b - LR * gb
        delta = np.clip(x_adv - X + EPS * np.sign(gx), -EPS, EPS)
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=THREAT, method="free", free_replays=3)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], run_eagerly=mode == "eager", jit_compile=mode == "xla")
    history = model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], np.mean(losses), rtol=1e-5)
    accuracy = next(m for m in model.metrics if m.name == "compile_metrics")
    counts = [float(v.numpy()) for v in accuracy.variables if "count" in v.path]
    assert counts == [3.0 * len(X)]
    np.testing.assert_allclose(base.get_weights()[0], w, atol=1e-5)


def test_free_without_carry_starts_each_batch_at_zero():
    """train_on_batch (no fit to size the carried perturbation): each batch starts at zero."""
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=THREAT, method="free", free_replays=2)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(X, Y)
    model.train_on_batch(X, Y)
    w2, b2 = W.copy(), B.copy()
    for _ in range(2):  # two independent batches from zero
        delta = np.zeros_like(X)
        for _ in range(2):
            x_adv = np.clip(X + delta, 0, 1)
            gx, gw, gb = ce_grads(x_adv, Y, w2, b2)
            w2, b2 = w2 - LR * gw, b2 - LR * gb
            delta = np.clip(x_adv - X + EPS * np.sign(gx), -EPS, EPS)
    np.testing.assert_allclose(base.get_weights()[0], w2, atol=1e-5)


@pytest.mark.parametrize("method, k, projected", [("fgsm_rs", 1.0, True),
                                                  ("n_fgsm", 2.0, False)])
def test_start_noise_is_uniform_with_the_papers_radius(method, k, projected):
    """With a zero gradient the adversary is the start: U(-k eps, k eps) per pixel
    (k = 1 for FGSM-RS, 2 for N-FGSM)."""
    zero = keras.Sequential([keras.Input((4000,)),
                             keras.layers.Dense(2, kernel_initializer="zeros")])
    model = tfadv.AdversarialModel(zero, attack=THREAT, method=method)
    assert (model.fast_step, model.fast_noise) == (fast.DEFAULTS[method]["fast_step"], k)
    x = np.full((8, 4000), 0.5, np.float32)
    tf.random.set_seed(1)
    u = (model.inner_max(zero, x, np.zeros(8, np.int64)).numpy() - x).ravel()
    eps = k * EPS
    assert u.min() >= -eps - 1e-6 and u.max() <= eps + 1e-6
    assert u.min() < -0.99 * eps and u.max() > 0.99 * eps
    assert abs(u.mean()) < 0.01 * eps
    np.testing.assert_allclose(u.var(), eps ** 2 / 3, rtol=0.03)


def test_fgsm_rs_reach_is_the_ball_and_n_fgsm_reach_three_eps():
    """Defaults on a model with a gradient: FGSM-RS stays in the eps-ball; N-FGSM reaches
    past it (noise 2 eps + step eps), but never outside 3 eps or the bounds."""
    base = keras.Sequential([keras.Input((500,)), keras.layers.Dense(2)])
    x = np.random.default_rng(0).uniform(0.3, 0.7, (16, 500)).astype(np.float32)
    y = np.zeros(16, np.int64)
    for method, reach in (("fgsm_rs", EPS), ("n_fgsm", 3 * EPS)):
        model = tfadv.AdversarialModel(base, attack=THREAT, method=method)
        d = model.inner_max(base, x, y).numpy() - x
        assert np.abs(d).max() <= reach + 1e-6
        assert np.abs(d).max() > 0.9 * reach
    assert np.abs(d).max() > EPS * 1.5  # N-FGSM is not projected


@pytest.mark.parametrize("method, variable", [("n_fgsm", "step_scale"),
                                              ("fgsm_rs", "eps_fraction")])
def test_step_scale_and_warmup_scale_the_fast_step(method, variable):
    """step_scale (the guard's) scales the step; the warm-up's eps_fraction scales the step
    and the ball."""
    gx, _, _ = ce_grads(X, Y)
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=THREAT, method=method, fast_noise=0.0)
    getattr(model, variable).assign(0.5)
    d = model.inner_max(base, X, Y).numpy() - X
    np.testing.assert_allclose(d, 0.5 * EPS * np.sign(gx), atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="fgsm_rs", attack=None), "needs a training attack"),
    (dict(method="free", attack=PGD(eps=0.0)), "positive eps"),
    (dict(method="n_fgsm", attack=THREAT, fast_step=-1.0), "fast_step >= 0"),
    (dict(method="free", attack=THREAT, free_replays=0), "free_replays >= 1"),
    (dict(method="fgsm", attack=THREAT), "one of"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfadv.AdversarialModel(linear_model(), **kwargs)


@pytest.mark.parametrize("method", ["fgsm_rs", "n_fgsm", "free"])
def test_config_round_trip(method):
    model = tfadv.AdversarialModel(linear_model(), attack=THREAT, method=method, fast_step=0.7,
                                   free_replays=4)
    again = tfadv.AdversarialModel.from_config(model.get_config())
    assert (again.method, again.fast_step, again.fast_noise, again.free_replays) == (
        method, 0.7, fast.DEFAULTS[method]["fast_noise"], 4)


def test_carried_perturbation_rows():
    carried = fast.CarriedPerturbation(3, (2,))
    carried.store(tf.constant([[1.0, 1], [2, 2], [3, 3]]))
    np.testing.assert_array_equal(carried.start(tf.zeros([2, 2])), [[1, 1], [2, 2]])
    np.testing.assert_array_equal(carried.start(tf.zeros([4, 2])),
                                  [[1, 1], [2, 2], [3, 3], [0, 0]])
    carried.store(tf.constant([[9.0, 9]]))
    np.testing.assert_array_equal(carried.variable.numpy(), [[9, 9], [2, 2], [3, 3]])


def test_batch_rows():
    ds = tf.data.Dataset.from_tensor_slices((X, Y))
    assert fast.batch_rows(ds.batch(2)) == 2
    assert fast.batch_rows(ds.batch(2, drop_remainder=True)) == 2
    assert fast.batch_rows(X, 7) == 7
    assert fast.batch_rows(X) == 32


def _embedding_step(attack, **kwargs):
    from tests.test_embedding_trainer_oracle import (C, C0, H0, K0, SCALE, X as XE, Y as YE,
                                                     linear_embedder)
    embedder = linear_embedder(K0, C0)
    model = tfadv.trainers.EmbeddingAdversarialModel(
        embedder, C, attack=attack, attack_on="classification", head_scale=SCALE, **kwargs)
    model.head.set_weights([H0])
    model.compile(optimizer=keras.optimizers.SGD(LR))
    model.fit(XE, YE, batch_size=len(XE), epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize("method", ["fgsm_rs", "n_fgsm"])
def test_embedding_trainer_one_step_methods_are_its_fgsm_step(method):
    """Without noise and with step eps, both one-step methods are FGSM, whose step the
    embedding oracle (tests/test_embedding_trainer_oracle.py) checks in closed form."""
    from tests.test_embedding_trainer_oracle import EPS as EPS_E
    want = _embedding_step(tfadv.attacks.FGSM(eps=EPS_E))
    got = _embedding_step(PGD(eps=EPS_E), method=method, fast_noise=0.0, fast_step=1.0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_embedding_trainer_free_first_replay_is_clean_training():
    from tests.test_embedding_trainer_oracle import EPS as EPS_E
    want = _embedding_step(None)
    got = _embedding_step(PGD(eps=EPS_E), method="free", free_replays=1)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)
    two = _embedding_step(PGD(eps=EPS_E), method="free", free_replays=2)
    assert max(float(np.abs(a - b).max()) for a, b in zip(two, want)) > 1e-4


def test_fit_keeps_keras_positional_arguments():
    """fit(x, y, batch_size, epochs, verbose) as keras.Model.fit takes them."""
    base = linear_model()
    model = tfadv.AdversarialModel(base, attack=THREAT, method="free", free_replays=3)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(X, Y, 2, 2, 0, shuffle=False)
    assert len(history.history["loss"]) == 2
    np.testing.assert_allclose(base.get_weights()[0], free_numpy(3, 2)[0], atol=1e-5)


@pytest.mark.parametrize("method, kwargs", [("pgd", {}), ("fgsm_rs", {"fast_noise": 0.0})])
def test_static_models_take_turns_as_the_adversaries_source(method, kwargs):
    """Ensemble adversarial training on the shared base: batch 0's adversary is made on the
    model being trained, batch 1's on the static model (Tramer et al. 2018), in closed form."""
    from tests.test_trainer import ONE_STEP

    ws = np.array([[-0.4, 0.6], [0.3, -0.5]], np.float32)
    bs = np.array([0.0, 0.2], np.float32)
    static = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    static.set_weights([ws, bs])
    base = linear_model()
    attack = ONE_STEP if method == "pgd" else THREAT
    model = tfadv.AdversarialModel(base, attack=attack, method=method, static_models=[static],
                                   **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, batch_size=1, epochs=1, shuffle=False, verbose=0)

    def fgsm(x, y, w, b):
        gx, _, _ = ce_grads(x, y, w, b)
        return np.clip(x + EPS * np.sign(gx), 0, 1)

    w, b = W.copy(), B.copy()
    for i, (sw, sb) in enumerate(((W, B), (ws, bs))):
        x, y = X[i:i + 1], Y[i:i + 1]
        src_w, src_b = (w, b) if i == 0 else (sw, sb)
        _, gw, gb = ce_grads(fgsm(x, y, src_w, src_b), y, w, b)
        w, b = w - LR * gw, b - LR * gb
    np.testing.assert_allclose(base.get_weights()[0], w, atol=1e-6)
    np.testing.assert_allclose(base.get_weights()[1], b, atol=1e-6)
    np.testing.assert_array_equal(static.get_weights()[0], ws)  # frozen
    assert int(model._batch.numpy()) == 2


def test_static_models_round_trip_and_refuse_methods_without_an_attack(tmp_path):
    static = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)], name="static")
    model = tfadv.AdversarialModel(linear_model(), attack=THREAT, static_models=[static])
    again = tfadv.AdversarialModel.from_config(model.get_config())
    assert len(again.static_models) == 1 and not again.static_models[0].trainable
    assert "static_models" not in tfadv.AdversarialModel(linear_model(),
                                                         attack=THREAT).get_config()
    for method in ("trades", "free"):
        with pytest.raises(ValueError, match="static_models"):
            tfadv.AdversarialModel(linear_model(), attack=THREAT, method=method,
                                   static_models=[static])
