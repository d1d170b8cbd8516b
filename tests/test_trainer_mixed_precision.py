"""Both trainers and every loss term under mixed_float16 / mixed_bfloat16.

One training step under a mixed policy must be the float32 step up to
half-precision rounding, with the centres kept in float32.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tests.conftest import tiny_embedder
from tfadv.attacks import PGD, dodging_pgd
from tfadv.config import CenterLossConfig
from tfadv.layers import ClassCenters
from tfadv.trainers import EmbeddingAdversarialModel

POLICIES = ["mixed_float16", "mixed_bfloat16"]


def feature_net():
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(8, activation="tanh")(h)
    f = keras.layers.Dense(3, activation="tanh", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="classifier", dtype="float32")(f))


def _loss_scaled(policy, optimizer):
    # A moderate fixed start: the default 2**15 skips the first steps of a
    # float16 run (overflow), which would leave nothing to compare after one step.
    if policy == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=64.0)
    return optimizer


def _delta(after, before):
    return np.concatenate([(a - b).ravel() for a, b in zip(after, before)])


def _assert_same_step(mixed, ref, centres_atol):
    loss, delta, centres = mixed
    loss_ref, delta_ref, centres_ref = ref
    assert np.isfinite(loss) and loss == pytest.approx(loss_ref, rel=2e-2)
    assert np.linalg.norm(delta) > 0
    cosine = delta @ delta_ref / (np.linalg.norm(delta) * np.linalg.norm(delta_ref))
    assert cosine > 0.995
    assert np.linalg.norm(delta) / np.linalg.norm(delta_ref) == pytest.approx(1.0, abs=0.03)
    if centres is not None:
        np.testing.assert_allclose(centres, centres_ref, atol=centres_atol)
        assert np.abs(centres - 0.3).max() > 1e-2  # they moved


ADVERSARIAL = {
    "pgd_mix_center_both": dict(method="pgd", adv_ratio=0.5,
                                center_loss=dict(on="both", centers="learned")),
    "pgd": dict(method="pgd"),
    "trades_center_clean": dict(method="trades", center_loss=dict(on="clean")),
    "standard_inverse_centers": dict(method="standard", center_loss=dict(centers="inverse_batch")),
}


def _adversarial_step(policy, kwargs):
    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    base = feature_net()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, 8)
    kwargs = dict(kwargs)
    # TRADES needs its random start (the KL gradient is zero at x); the seed
    # makes it the same in both runs.
    attack = PGD(eps=0.1, step_size=0.05, steps=2, random_start=kwargs["method"] == "trades")
    if "center_loss" in kwargs:
        kwargs["center_loss"] = CenterLossConfig(
            num_classes=3, weight=0.5, inverse_eps=0.1, inverse_step_size=0.05, inverse_steps=2,
            **kwargs["center_loss"])
    model = tfadv.AdversarialModel(base, attack=None if kwargs["method"] == "standard" else attack,
                                   eval_attack=attack, **kwargs)
    model.compile(optimizer=_loss_scaled(policy, keras.optimizers.SGD(0.5)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    centres = None
    if model.center_cfg is not None:
        assert model.centers.centers.dtype == "float32"
        model.centers.centers.assign(np.full((3, 3), 0.3, np.float32))
    before = base.get_weights()
    hist = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                     validation_data=(x, y)).history
    assert all(np.isfinite(v[0]) for v in hist.values()), hist
    if model.center_cfg is not None and model.center_cfg.centers == "learned":
        centres = model.centers.centers.numpy()
        assert centres.dtype == np.float32
    keras.mixed_precision.set_dtype_policy("float32")
    return hist["loss"][0], _delta(base.get_weights(), before), centres


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_model_trains_under_mixed_precision_as_in_float32(policy, case):
    mixed = _adversarial_step(policy, ADVERSARIAL[case])
    ref = _adversarial_step("float32", ADVERSARIAL[case])
    _assert_same_step(mixed, ref, centres_atol=5e-3)


def _embedding_step(policy, center_weight):
    keras.mixed_precision.set_dtype_policy(policy)
    e, teacher = tiny_embedder(8, 4, seed=3), tiny_embedder(8, 4, seed=4)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = np.arange(8) % 4
    x = (rng.uniform(0, 60, (8, 8, 8, 3)) + 50 * y[:, None, None, None]).astype("float32")
    model = EmbeddingAdversarialModel(
        e, 4, attack=dodging_pgd(eps=8.0, steps=2), center_weight=center_weight, teacher=teacher,
        distill_weight=1.0, eval_attack=dodging_pgd(eps=8.0, steps=2), eval_threshold=0.9)
    model.compile(optimizer=_loss_scaled(policy, keras.optimizers.SGD(0.5)))
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.build(x.shape)
    if model.centers is not None:
        assert model.centers.centers.dtype == "float32"
        model.centers.centers.assign(np.full((4, 4), 0.3, np.float32))
    before = [v.numpy() for v in model.trainable_variables]
    hist = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                     validation_data=(x, y)).history
    assert all(np.isfinite(v[0]) for v in hist.values()), hist
    after = [v.numpy() for v in model.trainable_variables]
    keras.mixed_precision.set_dtype_policy("float32")
    centres = None if model.centers is None else model.centers.centers.numpy()
    return hist["loss"][0], _delta(after, before), centres


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("center_weight", [0.5, 0.0])
def test_embedding_trainer_trains_under_mixed_precision_as_in_float32(policy, center_weight):
    """All terms (CE, consistency, center, distillation); under mixed_float16 the
    LossScaleOptimizer's scale must be applied to the loss and removed from the
    gradients (a missing `scale_loss` shrinks the step by the scale, 64 here)."""
    _assert_same_step(_embedding_step(policy, center_weight),
                      _embedding_step("float32", center_weight), centres_atol=3e-2)


def test_embedding_trainer_with_default_loss_scaling_trains():
    """mixed_float16 with Keras' default dynamic loss scale: finite, and the weights move."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    rng = np.random.default_rng(0)
    y = np.arange(16) % 4
    x = (rng.uniform(0, 60, (16, 8, 8, 3)) + 50 * y[:, None, None, None]).astype("float32")
    model = EmbeddingAdversarialModel(tiny_embedder(8, 4), 4, attack=dodging_pgd(eps=8.0, steps=2))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.build(x.shape)
    before = [v.numpy() for v in model.trainable_variables]
    hist = model.fit(x, y, batch_size=4, epochs=3, verbose=0).history
    assert np.all(np.isfinite(hist["loss"]))
    moved = _delta([v.numpy() for v in model.trainable_variables], before)
    assert np.abs(moved).max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_centres_stay_float32_under_a_mixed_policy(policy):
    keras.mixed_precision.set_dtype_policy(policy)
    layer = ClassCenters(3, 2, alpha=0.5)
    assert layer.centers.dtype == "float32" and layer.compute_dtype == "float32"
    layer.update(tf.constant([[1.0, 2.0], [3.0, 4.0]], tf.float16), tf.constant([0, 0]))
    np.testing.assert_allclose(layer.centers.numpy()[0], -0.5 * (-4.0 / 3.0) * np.array([1, 1.5]),
                               rtol=1e-6)
    assert layer(tf.constant([0])).dtype == tf.float32
