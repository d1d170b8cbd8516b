"""EmbeddingAdversarialModel's five-term loss against a float64 NumPy oracle.

A linear embedder e(x) = normalise(x K + c), a cosine head
logits = scale * e . normalise_columns(H), a frozen linear teacher, and one
batch with sample weights s. With attack_on="classification" and FGSM (no
random start) x_adv = clip(x + eps * sign(grad_x CE(head(e(x)), y))) is
computed in NumPy too. The loss (module docstring of
tfadv/trainers/embedding.py, every mean being sum_i s_i v_i / N):

    ce_weight * [(1 - adv_weight) CE(x) + adv_weight CE(x_adv)]
    + consistency_weight * mean(1 - cos(e(x_adv), t))     t = e(x) or teacher(x)
    + center_weight * mean(1/2 ||e(x_adv) - c_y||^2)      centres held constant
    + distill_weight * mean(1 - cos(e(x), teacher(x)))

is compared with the logged loss; its finite-difference gradient (x_adv and
the centres held fixed) gives the SGD step compared with the post-step
weights, and the centres must move by the weighted Wen et al. rule.
"""

import keras
import numpy as np
import pytest

from tfadv.attacks import FGSM
from tfadv.trainers import EmbeddingAdversarialModel
from tests.conftest import finite_difference_grads as fd_grads

D_IN, D, C = 4, 3, 3
SCALE, EPS, LR, ALPHA = 4.0, 0.05, 0.3, 0.5
TERMS = dict(adv_weight=0.3, ce_weight=0.8, consistency_weight=0.6, center_weight=0.4,
             distill_weight=0.9)

RNG = np.random.default_rng(11)
K0 = RNG.normal(size=(D_IN, D)).astype(np.float32)
C0 = RNG.normal(scale=0.3, size=D).astype(np.float32)
H0 = RNG.normal(size=(D, C)).astype(np.float32)
KT = RNG.normal(size=(D_IN, D)).astype(np.float32)
CT = RNG.normal(scale=0.3, size=D).astype(np.float32)
CENTERS0 = RNG.normal(scale=0.5, size=(C, D)).astype(np.float32)
X = RNG.uniform(0.2, 0.8, size=(6, D_IN)).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1, 0], np.int64)
S = np.array([1.0, 0.5, 2.0, 0.0, 1.5, 1.0], np.float32)


def linear_embedder(k, c):
    return keras.Sequential([
        keras.Input((D_IN,)),
        keras.layers.Dense(D, kernel_initializer=keras.initializers.Constant(k),
                           bias_initializer=keras.initializers.Constant(c)),
        keras.layers.UnitNormalization(),
    ])


def normalise(v, axis=-1):
    return v / np.linalg.norm(v, axis=axis, keepdims=True)


def embed(x, k, c):
    return normalise(x.astype(np.float64) @ k.astype(np.float64) + c)


def logits_of(e, h):
    return SCALE * normalise(e) @ normalise(h.astype(np.float64), axis=0)


def ce_of(logits, y):
    z = logits - logits.max(1, keepdims=True)
    return -(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(y)), y]


def cos(a, b):
    return np.sum(normalise(a) * normalise(b), 1)


def fgsm_numpy(x, y, k, c, h, step=1e-6):
    """x + eps * sign(dCE/dx) (central differences; CE_i depends on x_i only)."""
    grad = np.zeros(x.shape)
    x = x.astype(np.float64)
    for j in range(x.shape[1]):
        d = np.zeros_like(x)
        d[:, j] = step
        grad[:, j] = (ce_of(logits_of(embed(x + d, k, c), h), y)
                      - ce_of(logits_of(embed(x - d, k, c), h), y)) / (2 * step)
    assert np.abs(grad).min() > 1e-4  # every sign is well defined
    return np.clip(x + EPS * np.sign(grad), 0.0, 1.0)


def terms(params, x, x_adv, y, s, target, centers):
    k, c, h = params
    n = len(x)
    e_clean, e_adv = embed(x, k, c), embed(x_adv, k, c)
    ce_clean, ce_adv = ce_of(logits_of(e_clean, h), y), ce_of(logits_of(e_adv, h), y)
    t = embed(x, KT, CT)
    anchor = t if target == "teacher" else e_clean
    center = 0.5 * np.sum((e_adv - centers[y]) ** 2, 1)
    mean = lambda v: np.sum(s * v) / n
    loss = (TERMS["ce_weight"] * ((1 - TERMS["adv_weight"]) * mean(ce_clean)
                                  + TERMS["adv_weight"] * mean(ce_adv))
            + TERMS["consistency_weight"] * mean(1 - cos(e_adv, anchor))
            + TERMS["center_weight"] * mean(center)
            + TERMS["distill_weight"] * mean(1 - cos(e_clean, t)))
    return loss, dict(ce=ce_clean, center=center, e_adv=e_adv,
                      adv_cosine=cos(e_adv, e_clean), teacher_cosine=cos(e_clean, t))


def weighted_mean(v, s):
    return np.sum(s * v) / np.sum(s)


@pytest.mark.parametrize("attacked, target, weighted", [
    (True, "clean", True),
    (True, "teacher", False),
    (True, "teacher", True),
    (False, "teacher", True),
])
def test_one_step_matches_numpy(attacked, target, weighted):
    embedder = linear_embedder(K0, C0)
    teacher = linear_embedder(KT, CT)
    model = EmbeddingAdversarialModel(
        embedder, C, attack=FGSM(eps=EPS) if attacked else None, attack_on="classification",
        consistency_target=target, center_alpha=ALPHA, teacher=teacher, head_scale=SCALE,
        **TERMS)
    model.head.set_weights([H0])
    model.centers.centers.assign(CENTERS0)
    model.compile(optimizer=keras.optimizers.SGD(LR))

    s = S if weighted else np.ones(len(X), np.float32)
    s64 = s.astype(np.float64)
    x_adv = fgsm_numpy(X, Y, K0, C0, H0) if attacked else X.astype(np.float64)
    params = [K0, C0, H0]
    loss, parts = terms(params, X, x_adv, Y, s64, target, CENTERS0)
    grads = fd_grads(params, lambda p: terms(p, X, x_adv, Y, s64, target, CENTERS0)[0])

    history = model.fit(X, Y, sample_weight=s if weighted else None, batch_size=len(X),
                        epochs=1, shuffle=False, verbose=0).history

    k, c = embedder.get_weights()
    (h,) = model.head.get_weights()
    for got, p, g in zip((k, c, h), params, grads):
        np.testing.assert_allclose(got, p - LR * g, atol=1e-5)
    np.testing.assert_allclose(history["loss"][0], loss, rtol=1e-5)
    np.testing.assert_allclose(history["ce"][0], weighted_mean(parts["ce"], s64), rtol=1e-5)
    np.testing.assert_allclose(history["center_loss"][0], weighted_mean(parts["center"], s64),
                               rtol=1e-5)
    np.testing.assert_allclose(history["adv_cosine"][0],
                               weighted_mean(parts["adv_cosine"], s64), rtol=1e-5)
    np.testing.assert_allclose(history["teacher_cosine"][0],
                               weighted_mean(parts["teacher_cosine"], s64), rtol=1e-5)
    # The teacher is frozen.
    for got, want in zip(teacher.get_weights(), (KT, CT)):
        np.testing.assert_array_equal(got, want)

    sums = np.zeros((C, D))
    counts = np.zeros(C)
    np.add.at(sums, Y, s64[:, None] * (CENTERS0[Y] - parts["e_adv"]))
    np.add.at(counts, Y, s64)
    np.testing.assert_allclose(model.centers.centers.numpy(),
                               CENTERS0 - ALPHA * sums / (1 + counts)[:, None], atol=1e-6)


def test_fgsm_oracle_is_the_trainers_attack():
    embedder = linear_embedder(K0, C0)
    model = EmbeddingAdversarialModel(embedder, C, attack=FGSM(eps=EPS),
                                      attack_on="classification", head_scale=SCALE)
    model.head.set_weights([H0])
    x_adv = model._adversarial(X, Y).numpy()
    np.testing.assert_allclose(x_adv, fgsm_numpy(X, Y, K0, C0, H0), atol=1e-6)


def test_sample_weights_change_the_loss_as_the_oracle_says():
    """The same batch with and without weights: the logged training loss and the
    validation loss (`evaluate(..., sample_weight=...)`, the weighted CE) are the
    oracle's, and the weights change them."""
    logged = {}
    for name, s in (("weighted", S), ("unweighted", np.ones(len(X), np.float32))):
        embedder = linear_embedder(K0, C0)
        model = EmbeddingAdversarialModel(
            embedder, C, attack=FGSM(eps=EPS), attack_on="classification",
            consistency_target="teacher", center_alpha=ALPHA,
            teacher=linear_embedder(KT, CT), head_scale=SCALE, **TERMS)
        model.head.set_weights([H0])
        model.centers.centers.assign(CENTERS0)
        model.compile(optimizer=keras.optimizers.SGD(LR))
        s64 = s.astype(np.float64)
        val = model.evaluate(X, Y, sample_weight=s, batch_size=len(X), verbose=0,
                             return_dict=True)
        ce = ce_of(logits_of(embed(X, K0, C0), H0), Y)
        np.testing.assert_allclose(val["loss"], np.sum(s64 * ce) / len(X), rtol=1e-5)
        x_adv = fgsm_numpy(X, Y, K0, C0, H0)
        want, _ = terms([K0, C0, H0], X, x_adv, Y, s64, "teacher", CENTERS0)
        hist = model.fit(X, Y, sample_weight=s, batch_size=len(X), epochs=1, shuffle=False,
                         verbose=0).history
        np.testing.assert_allclose(hist["loss"][0], want, rtol=1e-5)
        logged[name] = (val["loss"], hist["loss"][0])
    for weighted, unweighted in zip(logged["weighted"], logged["unweighted"]):
        assert abs(weighted - unweighted) > 1e-3
