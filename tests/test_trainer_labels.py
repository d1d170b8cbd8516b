"""Label formats: [N] ints, [N, 1] whole-number floats and one-hot rows train alike.

The compiled loss gets the labels as the user gave them; everything the
trainers do with labels themselves (attack targets, center loss and centre
updates, robust_accuracy, the embedding trainer's head CE) goes through
`tfadv.ops.sparse_labels`.
"""

import keras
import numpy as np
import pytest

import tfadv
from tests.conftest import tiny_embedder, tiny_feature_net
from tfadv.attacks import PGD, dodging_pgd
from tfadv.config import CenterLossConfig
from tfadv.trainers import EmbeddingAdversarialModel

RNG = np.random.default_rng(0)
X = RNG.uniform(0.1, 0.9, (8, 6, 6, 1)).astype("float32")
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
FORMATS = {
    "int": (Y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "float_column": (Y[:, None].astype("float32"),
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "one_hot": (np.eye(3, dtype="float32")[Y],
                keras.losses.CategoricalCrossentropy(from_logits=True)),
}


def adversarial_step(fmt, method, center):
    y, loss = FORMATS[fmt]
    keras.utils.set_random_seed(0)
    attack = PGD(eps=0.1, step_size=0.05, steps=2, random_start=method == "trades")
    kwargs = {} if method == "standard" else {"attack": attack}
    if center is not None:
        kwargs["center_loss"] = CenterLossConfig(
            num_classes=3, weight=0.5, on="both", centers=center, inverse_eps=0.1,
            inverse_step_size=0.05, inverse_steps=2)
    model = tfadv.AdversarialModel(tiny_feature_net(), method=method, eval_attack=attack, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    if center is not None:
        model.centers.centers.assign(np.full((3, 3), 0.2, np.float32))
    model.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    state = model.base.get_weights()
    if center is not None:
        state.append(model.centers.centers.numpy())
    ev = model.evaluate(X, y, verbose=0, return_dict=True)
    return state, ev


@pytest.mark.parametrize("center", [None, "learned", "inverse_batch"])
@pytest.mark.parametrize("method", ["standard", "pgd", "trades"])
def test_adversarial_model_label_formats_give_the_same_step(method, center):
    ref, ref_ev = adversarial_step("int", method, center)
    for fmt in ("float_column", "one_hot"):
        state, ev = adversarial_step(fmt, method, center)
        for a, b in zip(state, ref):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=fmt)
        assert ev["robust_accuracy"] == pytest.approx(ref_ev["robust_accuracy"]), fmt
        assert ev["robust_loss"] == pytest.approx(ref_ev["robust_loss"], rel=1e-5), fmt


def test_one_hot_of_the_wrong_width_is_explained():
    model = tfadv.AdversarialModel(tiny_feature_net(), attack=PGD(eps=0.1, steps=1))
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="One-hot labels have 4 columns"):
        model.fit(X, np.eye(4, dtype="float32")[Y], batch_size=8, epochs=1, verbose=0)


def embedding_step(y, center_weight):
    rng = np.random.default_rng(1)
    x = (rng.uniform(0, 60, (8, 8, 8, 3)) + 50 * Y[:, None, None, None]).astype("float32")
    keras.utils.set_random_seed(0)
    model = EmbeddingAdversarialModel(tiny_embedder(8, 3), 3, attack=dodging_pgd(eps=8.0, steps=2),
                                      center_weight=center_weight,
                                      eval_attack=dodging_pgd(eps=8.0, steps=1),
                                      eval_threshold=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    hist = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                     validation_data=(x, y)).history
    state = [v.numpy() for v in model.trainable_variables]
    if model.centers is not None:
        state.append(model.centers.centers.numpy())
    return state, hist


@pytest.mark.parametrize("center_weight", [0.0, 0.5])
def test_embedding_trainer_label_formats_give_the_same_step(center_weight):
    ref, ref_hist = embedding_step(Y, center_weight)
    for y in (Y[:, None].astype("float32"), np.eye(3, dtype="float32")[Y]):
        state, hist = embedding_step(y, center_weight)
        for a, b in zip(state, ref):
            np.testing.assert_allclose(a, b, atol=1e-6)
        assert hist["ce"] == pytest.approx(ref_hist["ce"])
        assert hist["val_robust_accuracy"] == pytest.approx(ref_hist["val_robust_accuracy"])
