"""APGD-CE (Linf) against ART's AutoProjectedGradientDescent on MNIST.

Same model (the session's cleanly trained small CNN), same 500 held-out
digits (class-balanced slice of the embedded test split), same budget and
iterations. ART is configured like tfadv's APGD: one random start, initial
step 2 * eps, cross-entropy on logits, inputs clipped to [0, 1]. The robust
accuracies must agree within one point. eps = 0.3 drives both to 0 on this
undefended model, so 0.1 and 0.05 (robust accuracy about 20% and 65%) are
the settings that can tell two implementations apart.
"""

import numpy as np
import pytest

from tfadv.attacks import APGD
from tfadv.data import load_mnist, subset

art_evasion = pytest.importorskip("art.attacks.evasion")
art_classification = pytest.importorskip("art.estimators.classification")

N = 500


@pytest.fixture(scope="module")
def digits():
    x, y = subset(*load_mnist("embedded", "test"), N)
    assert len(x) == N
    return x, y


@pytest.fixture(scope="module")
def art_classifier(trained_mnist_model):
    import keras

    return art_classification.TensorFlowV2Classifier(
        trained_mnist_model, nb_classes=10, input_shape=(28, 28, 1),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0))


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=N, verbose=0), 1) == y))


@pytest.mark.parametrize("steps", [20, 40])
@pytest.mark.parametrize("eps", [0.3, 0.1, 0.05])
def test_robust_accuracy_matches_art(trained_mnist_model, art_classifier, digits, eps, steps):
    x, y = digits
    model = trained_mnist_model
    assert accuracy(model, x, y) > 0.8

    x_ours = APGD(eps=eps, steps=steps, norm="inf", objective="ce")(model, x, y).numpy()
    attack = art_evasion.AutoProjectedGradientDescent(
        art_classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
        targeted=False, nb_random_init=1, batch_size=N, loss_type="cross_entropy",
        verbose=False)
    x_art = attack.generate(x, y=np.eye(10, dtype=np.float32)[y])

    for x_adv in (x_ours, x_art):
        assert np.abs(x_adv - x).max() <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    ours, theirs = accuracy(model, x_ours, y), accuracy(model, x_art, y)
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    if eps == 0.3:
        assert ours == theirs == 0.0
