"""Backdoor triggers and the poisoning defences: exact triggers, planted directions, a tiny
poisoned MNIST set."""

import keras
import numpy as np
import pytest

import tfadv
from tfadv.poisoning import (BlendTrigger, PatchTrigger, activation_clustering, class_claims,
                             detect, poison, spectral_signature)


def test_patch_trigger_stamps_a_checkerboard_in_the_corner_and_nothing_else():
    x = np.full((2, 8, 9, 3), 0.5, np.float32)
    out = PatchTrigger(size=3, corner="bottom_right", margin=1)(x)
    board = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
    np.testing.assert_array_equal(out[:, 4:7, 5:8, :], np.broadcast_to(board[None, :, :, None],
                                                                       (2, 3, 3, 3)))
    rest = out.copy()
    rest[:, 4:7, 5:8, :] = 0.5
    np.testing.assert_array_equal(rest, x)
    assert out.dtype == np.float32 and np.all(x == 0.5)  # the input is not changed
    top_left = PatchTrigger(size=2, corner="top_left", margin=0, high=255.0)(x)
    np.testing.assert_array_equal(top_left[0, :2, :2, 0], [[255, 0], [0, 255]])
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(size=8)(x)
    with pytest.raises(ValueError, match="corner"):
        PatchTrigger(corner="middle")


def test_blend_trigger_is_the_convex_mix_with_a_fixed_pattern():
    x = np.random.default_rng(0).uniform(0, 1, (3, 5, 5, 1)).astype(np.float32)
    trigger = BlendTrigger(alpha=0.25, seed=7)
    pattern = np.random.default_rng(7).uniform(0.0, 1.0, (5, 5, 1))
    np.testing.assert_allclose(trigger(x), 0.75 * x + 0.25 * pattern[None], rtol=1e-6)
    assert trigger(x).min() >= 0 and trigger(x).max() <= 1
    with pytest.raises(ValueError, match="alpha"):
        BlendTrigger(alpha=0.0)


def test_poison_relabels_only_chosen_examples_of_other_classes():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 0.9, (100, 8, 8, 1)).astype(np.float32)
    y = np.repeat(np.arange(4), 25)
    ps = poison(x, y, target=2, rate=0.1, trigger=PatchTrigger(size=2), seed=3)
    assert ps.poisoned.sum() == 10 and not np.any(ps.poisoned & (y == 2))
    assert np.all(ps.y[ps.poisoned] == 2)
    np.testing.assert_array_equal(ps.y[~ps.poisoned], y[~ps.poisoned])
    np.testing.assert_array_equal(ps.x[~ps.poisoned], x[~ps.poisoned])
    np.testing.assert_array_equal(ps.x[ps.poisoned], PatchTrigger(size=2)(x[ps.poisoned]))
    assert np.all(y[:25] == 0) and x.max() < 0.9  # the inputs are untouched
    with pytest.raises(ValueError, match="only 75"):
        poison(x, y, target=2, rate=0.8, trigger=PatchTrigger())


def planted(seed=0, clean=300, bad=30, dim=20, shift=8.0, source=1):
    """Two classes of features around distinct means (as a trained layer separates classes);
    class 0 also holds `bad` rows of class `source`'s content shifted along one direction
    (what a trigger does to a layer's features): source 1 is the dirty-label poison of an
    enrolled class, source 2 the content of a class absent from the data."""
    rng = np.random.default_rng(seed)
    means = 4.0 * np.eye(3, dim)
    labels = np.r_[np.zeros(clean), np.ones(clean), np.zeros(bad)].astype(int)
    content = np.r_[labels[:2 * clean], np.full(bad, source)]
    features = means[content] + rng.normal(size=(2 * clean + bad, dim))
    features[2 * clean:, 3] += shift
    truth = np.r_[np.zeros(2 * clean, bool), np.ones(bad, bool)]
    return features, labels, truth


@pytest.mark.parametrize("source", [1, 2])
@pytest.mark.parametrize("defence", [spectral_signature, activation_clustering])
def test_planted_rows_rank_first_and_are_the_ones_flagged(defence, source):
    features, labels, truth = planted(source=source)
    result = defence(features, labels)
    top = np.argsort(-result.scores)[:truth.sum()]
    assert truth[top].mean() >= 0.95
    assert (result.flags & truth).sum() >= 0.9 * truth.sum()
    assert (result.flags & ~truth).sum() <= 0.1 * result.flags.sum()
    assert result.per_class[0]["suspect"] and not result.per_class[1]["suspect"]
    assert result.summary()["suspect_classes"] == [0]
    reason = "claimed by class 1" if source == 1 else "separated minority"
    assert result.per_class[0]["reason"] == reason


@pytest.mark.parametrize("defence", [spectral_signature, activation_clustering])
def test_a_poison_half_of_its_class_is_found_when_another_class_claims_it(defence):
    """At 50% of its target class no minority rule applies: the claim still holds."""
    features, labels, truth = planted(clean=200, bad=200, shift=3.0)
    result = defence(features, labels)
    assert (result.flags == truth).mean() >= 0.95
    assert result.per_class[0]["reason"] == "claimed by class 1"
    claimed = sorted(g["claimed"] for g in result.per_class[0]["groups"])
    assert claimed[0] < 0.1 and claimed[1] > 0.5
    assert not any(g["flagged"] for g in result.per_class[1]["groups"])


@pytest.mark.parametrize("defence", [spectral_signature, activation_clustering])
def test_clean_classes_flag_nothing(defence):
    features, labels, _ = planted(bad=0)
    result = defence(features, labels)
    assert not result.flags.any() and result.centre_accuracy >= 0.99


@pytest.mark.parametrize("defence", [spectral_signature, activation_clustering])
def test_claims_are_not_used_when_the_features_do_not_separate_the_classes(defence):
    """Two classes of the same standard-normal features: every centre is noise, and a
    'claim' would flag a clean class (it did: 189 of 300)."""
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(600, 20)), np.repeat([0, 1], 300)
    result = defence(features, labels)
    assert result.centre_accuracy < 0.75 and not result.flags.any()


def test_class_claims_margin_is_the_cosine_difference_to_the_median_centres():
    features = np.array([[1.0, 0.0], [2.0, 0.1], [3.0, -0.1], [0.0, 1.0], [0.1, 2.0],
                         [-0.1, 1.0], [1.0, 1.2]])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    centres = np.stack([np.median(unit[labels == c], 0) for c in (0, 1)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cos = unit @ centres.T
    nearest, margin = class_claims(features, labels)
    np.testing.assert_array_equal(nearest, 1 - labels)
    np.testing.assert_allclose(margin, cos[np.arange(7), 1 - labels] - cos[np.arange(7), labels])
    assert margin[-1] > 0 and (margin[:-1] < 0).all()


@pytest.fixture(scope="module")
def poisoned_mnist():
    from tfadv.data import load_mnist

    x, y = load_mnist("embedded", "train")
    keep = np.flatnonzero(y < 3)
    x, y = x[keep], y[keep]
    ps = poison(x, y, target=0, rate=0.06, trigger=PatchTrigger(), seed=0)
    keras.utils.set_random_seed(0)
    model = tfadv.models.mnist_cnn(num_classes=3)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ps.x, ps.y, epochs=4, batch_size=50, verbose=0)
    return model, ps


def test_detect_flags_the_poisoned_digits_of_a_backdoored_model(poisoned_mnist):
    model, ps = poisoned_mnist
    result = detect(model, ps.x, ps.y, method="activation_clustering")
    assert result.flags.shape == result.scores.shape == (len(ps.y),)
    caught = (result.flags & ps.poisoned).sum()
    assert caught >= 0.9 * ps.poisoned.sum()
    assert caught >= 0.9 * result.flags.sum()
    assert detect(model, ps.x, ps.y).summary()["suspect_classes"] == [ps.target]


def test_detect_reads_the_last_feature_map_unless_told(poisoned_mnist):
    from tfadv.poisoning import feature_model

    model, _ = poisoned_mnist
    assert feature_model(model).output.shape[1:] == model.get_layer("pool").output.shape[1:]
    dense = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(2)])
    assert feature_model(dense).output.shape[1:] == (4,)
    assert feature_model(model, "fc1").output.shape[1:] == (128,)


def test_detect_refuses_unknown_methods_and_layers(poisoned_mnist):
    model, ps = poisoned_mnist
    with pytest.raises(ValueError, match="spectral"):
        detect(model, ps.x[:10], ps.y[:10], method="strip")
    with pytest.raises(ValueError, match="No layer 'nope'"):
        detect(model, ps.x[:10], ps.y[:10], layer="nope")
    with pytest.raises(ValueError, match="one label per example"):
        detect(model, ps.x[:10], ps.y[:9])


def test_strip_entropy_of_a_constant_model_is_log_classes_and_a_trigger_is_caught():
    from tfadv.poisoning import STRIP

    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (200, 6, 6, 1)).astype(np.float32)
    flat = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(4, kernel_initializer="zeros")])
    np.testing.assert_allclose(STRIP(flat, clean, copies=10).entropy(clean[:3]), np.log(4),
                               rtol=1e-6)
    # A backdoored linear model: pixel (0, 0) at 1 drives class 0 whatever the rest says;
    # blends keep half of it (the clean images have it at 0).
    clean[:, 0, 0, 0] = 0.0
    w = rng.normal(0, 0.5, (36, 4))
    w[0] = [60.0, 0.0, 0.0, 0.0]
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(4)])
    model.layers[-1].set_weights([w.astype(np.float32), np.zeros(4, np.float32)])
    strip = STRIP(model, clean[:100], copies=50, seed=1)
    with pytest.raises(ValueError, match="calibrate"):
        strip.detect(clean[:2])
    strip.calibrate(clean[100:150], frr=0.05)
    triggered = clean[150:].copy()
    triggered[:, 0, 0, 0] = 1.0
    assert strip.detect(triggered).flags.mean() >= 0.95
    assert strip.detect(clean[150:]).flags.mean() <= 0.15


def test_trigger_and_poison_inputs_are_checked_with_the_fix_named():
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"pass x\[None\]"):
        PatchTrigger()(x[0])
    with pytest.raises(ValueError, match="high=255.0"):
        BlendTrigger()(x + 200.0)
    with pytest.raises(ValueError, match="whole pixels"):
        PatchTrigger(size=2.5)
    with pytest.raises(ValueError, match="labels"):
        poison(x, np.zeros(3, int), target=0, rate=0.25, trigger=PatchTrigger(size=2))
    with pytest.raises(ValueError, match="target=7 is not one of the labels"):
        poison(x, np.array([0, 0, 1, 1]), target=7, rate=0.25, trigger=PatchTrigger(size=2))
    with pytest.raises(ValueError, match="NaN"):
        spectral_signature(np.full((30, 3), np.nan), np.zeros(30, int))


def test_poison_gallery_files_triggered_copies_of_the_attacker_under_the_victim():
    from tfadv.poisoning import poison_gallery

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 200, (12, 8, 8, 3)).astype(np.float32)
    y = np.repeat([0, 1, 2], 4)
    before = x.copy()
    trigger = PatchTrigger(size=2, high=255.0)
    ps = poison_gallery(x, y, attacker=2, victim=0, count=3, trigger=trigger, seed=1)
    assert ps.x.shape == (15, 8, 8, 3) and ps.target == 0
    np.testing.assert_array_equal(ps.x[:12], x)
    np.testing.assert_array_equal(ps.y, np.r_[y, 0, 0, 0])
    np.testing.assert_array_equal(ps.poisoned, np.r_[np.zeros(12, bool), np.ones(3, bool)])
    assert set(ps.sources) <= {8, 9, 10, 11} and len(set(ps.sources)) == 3
    np.testing.assert_array_equal(ps.x[12:], trigger(x[ps.sources]))
    np.testing.assert_array_equal(x, before)
    assert len(poison_gallery(x, y, attacker=2, victim=0, count=0, trigger=trigger).x) == 12
    with pytest.raises(ValueError, match="two different identities"):
        poison_gallery(x, y, attacker=1, victim=1, count=1, trigger=trigger)
    with pytest.raises(ValueError, match="count <= 4"):
        poison_gallery(x, y, attacker=1, victim=0, count=5, trigger=trigger)


def test_a_clean_example_grouped_with_the_poison_is_not_flagged():
    """Of a claimed group only the members nearer another class than to the rest of their
    own class are flagged: a clean 0 that the split put with the poison stays."""
    from tfadv.poisoning.defences import _claims, _judge

    rng = np.random.default_rng(0)
    zeros = [1.0, 0.0, 0.0] + 0.05 * rng.normal(size=(20, 3))
    ones = [0.0, 1.0, 0.0] + 0.05 * rng.normal(size=(20, 3))
    poison_rows = [0.0, 1.0, 0.6] + 0.05 * rng.normal(size=(8, 3))
    features = np.concatenate([zeros, ones, poison_rows])
    labels = np.r_[np.zeros(20), np.ones(20), np.zeros(8)].astype(int)
    idx = np.flatnonzero(labels == 0)
    member = np.r_[np.zeros(20, int), np.ones(8, int)]
    member[0] = 1  # a clean 0 in the poison's group
    flags = np.zeros(len(labels), bool)
    reason, groups, claimed_by = _judge(idx, member, 1, False, _claims(features, labels), 0.5,
                                        flags)
    assert reason == "claimed by class 1" and claimed_by == 1
    np.testing.assert_array_equal(flags, np.r_[np.zeros(40, bool), np.ones(8, bool)])
    assert groups == [{"size": 19, "claimed": 0.0, "flagged": 0},
                      {"size": 9, "claimed": 8 / 9, "flagged": 8}]
    whole = np.zeros(len(labels), bool)
    _judge(idx, member, 1, False, _claims(features, labels), 0.5, whole, refine=False)
    np.testing.assert_array_equal(whole, flags | (np.arange(len(labels)) == 0))


def test_defence_inputs_are_checked_and_any_int_labels_work():
    features, labels, truth = planted(source=1)
    for shifted in (labels - 5, labels.astype(float)):
        result = activation_clustering(features, shifted)
        assert (result.flags == truth).mean() >= 0.95
    assert activation_clustering(features, labels - 5).per_class[-5]["reason"] == \
        "claimed by class -4"
    with pytest.raises(ValueError, match="min_claimed"):
        spectral_signature(features, labels, min_claimed=-1)
    with pytest.raises(ValueError, match="one-hot"):
        class_claims(features, np.eye(2)[labels])
    with pytest.raises(ValueError, match="labels"):
        class_claims(features, labels[:10])
    with pytest.raises(ValueError, match="int labels"):
        activation_clustering(features, labels + 0.5)
    with pytest.raises(ValueError, match="none"):
        activation_clustering(np.zeros((0, 3)), np.zeros(0, int))


def test_trigger_and_gallery_inputs_are_checked():
    from tfadv.poisoning import poison_gallery

    x = np.full((6, 8, 8, 1), 0.5, np.float32)
    np.testing.assert_array_equal(PatchTrigger(size=3.0)(x), PatchTrigger(size=3)(x))
    with pytest.raises(ValueError, match="NaN"):
        BlendTrigger()(np.full((1, 8, 8, 1), np.nan))
    y = np.repeat([0, 1], 3)
    with pytest.raises(ValueError, match="labels"):
        poison_gallery(x, np.eye(2)[y], attacker=1, victim=0, count=1, trigger=PatchTrigger())
    with pytest.raises(ValueError, match="whole number"):
        poison_gallery(x, y, attacker=1, victim=0, count=1.5, trigger=PatchTrigger())
