"""Randomized smoothing against closed forms: for a linear classifier the smoothed classifier
is the base one and its exact certified radius is the distance to the decision boundary."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import beta

from tfadv.certification import ABSTAIN, RandomizedSmoothing, lower_confidence_bound

DIM, SIGMA = 10, 0.5
W = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
B = np.float32(0.3)


def linear(x):
    """Two classes: logit 1 is w.x + b, logit 0 is 0 (class 1 where w.x + b > 0)."""
    score = tf.linalg.matvec(tf.cast(x, tf.float32), W) + B
    return tf.stack([tf.zeros_like(score), score], axis=-1)


def at_distance(d):
    """A point whose signed L2 distance to the boundary w.x + b = 0 is d."""
    unit = W / np.linalg.norm(W)
    return ((d - B / np.linalg.norm(W)) * unit).astype(np.float32)


def test_certified_radius_of_a_linear_classifier_is_the_distance_to_its_boundary():
    distances = np.array([0.2, 0.5, 1.0, -0.7])  # negative: class 0's side
    x = np.stack([at_distance(d) for d in distances])
    smoothed = RandomizedSmoothing(linear, SIGMA, 2, batch_size=5000, seed=1)
    labels, radii = smoothed.certify(x, n0=100, n=100_000, alpha=0.001)
    np.testing.assert_array_equal(labels, (distances > 0).astype(int))
    exact = np.abs(distances)
    assert (radii <= exact + 1e-9).all(), (radii, exact)  # never above the exact radius
    np.testing.assert_allclose(radii, exact, atol=0.06 * SIGMA)  # and close with n = 1e5


def test_counts_and_predict():
    smoothed = RandomizedSmoothing(linear, SIGMA, 2, batch_size=1000)
    x = np.stack([at_distance(1.5), at_distance(-1.5)])
    counts = smoothed.sample_counts(x, 2501)  # the last batch is partial
    assert counts.shape == (2, 2) and (counts.sum(1) == 2501).all()
    # P(class 1) = Phi(d / sigma) = Phi(3) = 0.99865 at d = 1.5
    assert counts[0, 1] > 2450 and counts[1, 0] > 2450
    np.testing.assert_array_equal(smoothed.predict(x, 1000, alpha=0.001), [1, 0])


def test_abstains_when_the_top_two_classes_tie():
    """On the boundary the two classes are equally likely: PREDICT's test is not
    significant and CERTIFY's lower bound stays below 1/2."""
    smoothed = RandomizedSmoothing(linear, SIGMA, 2, batch_size=2000, seed=3)
    x = np.stack([at_distance(0.0)] * 3)
    assert (smoothed.predict(x, 4000, alpha=0.001) == ABSTAIN).all()
    labels, radii = smoothed.certify(x, n0=100, n=4000, alpha=0.001)
    assert (labels == ABSTAIN).all() and (radii == 0).all()


def test_lower_bound_is_clopper_pearson():
    """The one-sided (1 - alpha) Clopper-Pearson bound: the alpha quantile of
    Beta(k, n - k + 1)."""
    for k, n, alpha in [(90, 100, 0.001), (99_000, 100_000, 0.001), (5, 10, 0.05)]:
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(
            beta.ppf(alpha, k, n - k + 1), rel=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": 0.25, "num_classes": 1}, "num_classes"),
    ({"sigma": 0.25, "batch_size": 0}, "batch_size")])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomizedSmoothing(linear, **{"num_classes": 2, **kwargs})
    smoothed = RandomizedSmoothing(linear, 0.25, 2)
    with pytest.raises(ValueError, match="alpha"):
        smoothed.predict(np.zeros((1, DIM), np.float32), 10, alpha=0.7)
    with pytest.raises(ValueError, match="n >= 1"):
        smoothed.sample_counts(np.zeros((1, DIM), np.float32), 0)


def test_agrees_with_art_randomized_smoothing():
    """ART's TensorFlowV2RandomizedSmoothing on the same model, sigma, n and alpha: the same
    labels on >= 98% of 200 inputs, and radii within the Monte Carlo spread."""
    import warnings

    import keras
    from scipy.stats import norm

    warnings.filterwarnings("ignore", message=".*PyTorch not found.*")
    from art.estimators.certification.randomized_smoothing import (
        TensorFlowV2RandomizedSmoothing)

    inputs = keras.Input((DIM,))
    score = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(W[:, None]),
                               bias_initializer=keras.initializers.Constant(B))(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate()([score * 0.0, score]))
    # Inputs at 0.25-2 sigma from the boundary, as most test inputs of a trained model are:
    # nearer, CERTIFY's n0 = 100 selection samples pick either class by chance (at 0.05
    # sigma, 4 in 10), in either implementation, so agreement there measures the coin.
    rng = np.random.default_rng(1)
    distances = rng.uniform(0.25, 2.0, 200) * rng.choice([-1, 1], 200) * SIGMA
    x = np.stack([at_distance(d) for d in distances])
    n, alpha = 10_000, 0.001
    art = TensorFlowV2RandomizedSmoothing(model=model, nb_classes=2, input_shape=(DIM,),
                                          sample_size=100, scale=SIGMA, alpha=alpha)
    np.random.seed(0)
    art_labels, art_radii = art.certify(x, n=n, batch_size=10_000)
    labels, radii = RandomizedSmoothing(model, SIGMA, 2, batch_size=10_000, seed=0).certify(
        x, n0=100, n=n, alpha=alpha)
    assert np.mean(labels == np.asarray(art_labels)) >= 0.98
    both = (labels != ABSTAIN) & (np.asarray(art_labels) != ABSTAIN)
    p = norm.cdf(np.abs(distances[both]) / SIGMA)
    # Two independent estimates of the same bound: 4 standard deviations of their difference.
    spread = 4 * np.sqrt(2) * SIGMA * np.sqrt(p * (1 - p) / n) / norm.pdf(norm.ppf(p))
    assert (np.abs(radii[both] - np.asarray(art_radii)[both]) <= spread + 1e-6).all()


def test_certified_accuracy_at_radii():
    from tfadv.certification import certified_accuracy

    labels = np.array([1, 0, 2, ABSTAIN, 1])
    radii = np.array([0.3, 0.9, 0.1, 0.0, 0.6])
    y = np.array([1, 0, 1, 0, 1])
    assert certified_accuracy(labels, radii, y, at=(0.0, 0.25, 0.5, 1.0)) == {
        0.0: 0.6, 0.25: 0.6, 0.5: 0.4, 1.0: 0.0}
    with pytest.raises(ValueError, match="one shape"):
        certified_accuracy(labels, radii[:2], y)


def test_certify_command(tmp_path):
    """`tfadv certify` on the embedded test digits: the table is the one the labels and
    radii it writes give."""
    import json
    import subprocess
    import sys

    import keras

    from tfadv.certification import certified_accuracy
    from tfadv.data import load_mnist

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(tmp_path / "m.keras")
    run = subprocess.run([sys.executable, "-m", "tfadv.cli", "certify", str(tmp_path / "m.keras"),
                          "--sigma", "0.25", "--n", "300", "--n0", "20", "--n-test", "6",
                          "--json", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert json.loads((tmp_path / "out" / "certify.json").read_text()) == result
    assert (tmp_path / "out" / "certify.md").read_text().startswith("Randomized smoothing")
    assert (tmp_path / "out" / "certify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The digits are a random sample of the split (sorted by label: not its first six zeros).
    from tfadv.data import subset

    _, y = subset(*load_mnist("embedded", "test"), 6, seed=0)
    assert result["true_labels"] == y.tolist() and len(set(y.tolist())) > 1
    want = certified_accuracy(result["labels"], result["radii"], y,
                              at=[float(r) for r in result["certified_accuracy"]])
    assert {float(k): v for k, v in result["certified_accuracy"].items()} == want
    assert result["n_test"] == 6 and len(result["radii"]) == 6
    (tmp_path / "file").write_text("x")
    bad = subprocess.run([sys.executable, "-m", "tfadv.cli", "certify", str(tmp_path / "m.keras"),
                          "--n", "30", "--n-test", "2", "--out", str(tmp_path / "file")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "is a file, not a folder" in bad.stderr


@pytest.mark.parametrize("x, num_classes, match", [
    (np.zeros((0, DIM)), 2, "non-empty batch"),
    (np.full((2, DIM), np.nan), 2, "NaN or inf"),
    (np.zeros((2, DIM)), 3, "2 outputs; num_classes=3"),
])
def test_bad_inputs_get_a_clear_error(x, num_classes, match):
    smoothing = RandomizedSmoothing(linear, SIGMA, num_classes)
    with pytest.raises(ValueError, match=match):
        smoothing.certify(x, n0=10, n=20)


def test_one_image_without_a_batch_axis_is_named():
    import keras

    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"pass x\[None\]"):
        RandomizedSmoothing(model, 0.25, 3).certify(np.zeros((4, 4, 1)), n0=10, n=20)
