"""Adversarial fine-tuning of embedding models (EmbeddingAdversarialModel)."""

import numpy as np
import pytest

import keras
import tfadv
from tests.conftest import tiny_embedder
from tfadv.attacks import dodging_pgd
from tfadv.trainers import CosineClassifier, EmbeddingAdversarialModel


def embedder(seed=3):
    return tiny_embedder(12, 6, seed=seed)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = np.arange(32) % 4
    # Class-dependent brightness: learnable.
    x = rng.uniform(0, 60, (32, 12, 12, 3)) + 50 * y[:, None, None, None]
    return x.astype("float32"), y


def test_cosine_classifier_is_scaled_cosine_and_round_trips():
    head = CosineClassifier(3, scale=10.0)
    e = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    logits = head(e).numpy()
    w = head.kernel.numpy()
    expected = 10.0 * (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    clone = CosineClassifier.from_config(head.get_config())
    assert clone.get_config() == head.get_config()


def test_clean_finetuning_learns(data):
    x, y = data
    m = EmbeddingAdversarialModel(embedder(), 4)
    m.compile(optimizer=keras.optimizers.Adam(1e-2))
    h = m.fit(x, y, batch_size=8, epochs=6, verbose=0).history
    assert h["ce"][-1] < h["ce"][0]


def test_adversarial_step_with_centres_teacher_and_ensemble(data):
    x, y = data
    e, teacher, static = embedder(), embedder(), embedder(seed=9)
    teacher.set_weights(e.get_weights())
    t_before = [w.copy() for w in teacher.get_weights()]
    s_before = [w.copy() for w in static.get_weights()]
    m = EmbeddingAdversarialModel(
        e, 4, attack=dodging_pgd(eps=8.0, steps=2), center_weight=0.1, teacher=teacher,
        distill_weight=1.0, static_models=[static],
        eval_attack=dodging_pgd(eps=8.0, steps=2), eval_threshold=0.9)
    m.compile(optimizer=keras.optimizers.Adam(1e-3))
    h = m.fit(x, y, batch_size=8, epochs=1, validation_data=(x, y), verbose=0).history
    for key in ("loss", "ce", "adv_cosine", "center_loss", "teacher_cosine",
                "val_dodge_success", "val_adv_cosine", "val_robust_accuracy"):
        assert key in h and np.isfinite(h[key][0]), key
    assert 0.0 <= h["val_dodge_success"][0] <= 1.0
    assert h["adv_cosine"][0] < 1.0
    # Centres are state, not parameters, and they moved.
    assert all(w is not m.centers.centers for w in m.trainable_weights)
    assert np.abs(m.centers.centers.numpy()).sum() > 0
    # Teacher and static models are frozen.
    for a, b in zip(teacher.get_weights(), t_before):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(static.get_weights(), s_before):
        np.testing.assert_array_equal(a, b)
    assert int(m._batch.numpy()) == 4  # one per training batch: sources alternate


def test_attack_against_classification_loss(data):
    x, y = data
    m = EmbeddingAdversarialModel(
        embedder(), 4, attack_on="classification",
        attack=tfadv.attacks.PGD(eps=8.0, steps=2, step_size=4.0, bounds=(0, 255)))
    m.compile(optimizer="adam")
    h = m.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(h["loss"][0]) and "robust_accuracy" in h


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="attack_on"):
        EmbeddingAdversarialModel(embedder(), 2, attack_on="logits")
    with pytest.raises(ValueError, match="teacher"):
        EmbeddingAdversarialModel(embedder(), 2, distill_weight=1.0)
    with pytest.raises(ValueError, match="eval_threshold"):
        EmbeddingAdversarialModel(embedder(), 2, eval_attack=dodging_pgd(eps=1.0))
    with pytest.raises(ValueError, match="adv_weight"):
        EmbeddingAdversarialModel(embedder(), 2, adv_weight=2.0)


def test_training_dodge_success_is_logged_and_recomputes(data):
    """The training `dodge_success` is the training adversaries' success at eval_threshold
    (cosine to the clean embedding below it), recomputed here from the pre-step model."""
    x, y = data
    x, y = x[:16], y[:16]
    attack = tfadv.attacks.PGD(eps=16.0, step_size=8.0, steps=2, random_start=False,
                               bounds=(0, 255))
    m = EmbeddingAdversarialModel(embedder(), 4, attack=attack, attack_on="classification",
                                  eval_threshold=0.0)
    m.compile(optimizer=keras.optimizers.SGD(0.1))
    x_adv = attack(lambda t: m(t, training=False), x, y)
    e, e_adv = m.embedder(x, training=False).numpy(), m.embedder(x_adv, training=False).numpy()
    cos = np.sum(e * e_adv, axis=1) / np.linalg.norm(e, axis=1) / np.linalg.norm(e_adv, axis=1)
    m.eval_threshold = float(np.median(cos))  # about half of the adversaries succeed
    expected = np.mean(cos < m.eval_threshold)
    assert 0.0 < expected < 1.0
    h = m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    assert h["dodge_success"][0] == pytest.approx(expected)
    assert h["adv_cosine"][0] == pytest.approx(cos.mean(), rel=1e-5)


def test_metrics_a_phase_never_updates_are_not_logged(data):
    x, y = data
    m = EmbeddingAdversarialModel(embedder(), 4, attack=None, eval_threshold=0.5)
    m.compile(optimizer="sgd")
    h = m.fit(x, y, batch_size=16, epochs=1, validation_data=(x, y), verbose=0).history
    assert "dodge_success" not in h and "val_dodge_success" not in h  # no attack anywhere
    m = EmbeddingAdversarialModel(embedder(), 4, attack=dodging_pgd(eps=4.0, steps=1))
    m.compile(optimizer="sgd")
    h = m.fit(x, y, batch_size=16, epochs=1, validation_data=(x, y), verbose=0).history
    assert "dodge_success" not in h  # no threshold to judge success at
    assert "val_robust_accuracy" not in h  # no validation attack


def test_eval_threshold_follows_the_one_threshold_rule():
    with pytest.raises(ValueError, match=r"eval_threshold to be a cosine similarity"):
        EmbeddingAdversarialModel(tiny_embedder(), 2, eval_attack=dodging_pgd(eps=2, steps=1),
                                  eval_threshold=1.7)


def test_warmup_budget_reaches_the_training_attack(data):
    """eps_fraction (EpsilonWarmup's variable) scales the training attack: at 0 the
    adversaries are the clean images (adversarial cosine 1, robust accuracy = accuracy)."""
    x, y = data
    m = EmbeddingAdversarialModel(embedder(), 4, attack=dodging_pgd(eps=16.0, steps=2),
                                  eval_threshold=0.9)
    m.compile(optimizer=keras.optimizers.SGD(0.0))
    m.eps_fraction.assign(0.0)
    h = m.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert h["adv_cosine"][0] == pytest.approx(1.0, abs=1e-5)
    assert h["robust_accuracy"][0] == h["accuracy"][0] and h["dodge_success"][0] == 0.0
    m.eps_fraction.assign(1.0)
    h = m.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert h["adv_cosine"][0] < 1.0 - 1e-3


def test_mixed_float16_with_warmup_trains(data):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    x, y = data
    m = EmbeddingAdversarialModel(embedder(), 4, attack=dodging_pgd(eps=8.0, steps=2),
                                  center_weight=0.1)
    m.compile(optimizer=keras.optimizers.Adam(1e-2))
    assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [v.numpy() for v in m.trainable_variables]
    h = m.fit(x, y, sample_weight=np.linspace(0.0, 2.0, len(x)).astype("float32"), batch_size=8,
              epochs=2, verbose=0, callbacks=[tfadv.trainers.EpsilonWarmup(1)]).history
    assert np.all(np.isfinite(h["loss"])) and np.all(np.isfinite(h["center_loss"]))
    assert max(np.abs(a - v.numpy()).max() for a, v in zip(before, m.trainable_variables)) > 1e-3
    assert float(m.eps_fraction.numpy()) == 1.0
