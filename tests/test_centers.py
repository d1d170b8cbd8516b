"""Centre extraction and comparison functions."""

import numpy as np
import pytest

import tfadv
from tfadv.attacks import InversePGD
from tfadv.evaluation import centers as C


def test_cosine_and_mse_on_hand_made_vectors():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(C.cosine_per_class(a, b), [1.0, -1.0, 0.0])
    np.testing.assert_allclose(C.mse_per_class(a, b), [0.5, 4.0, 0.5])
    m = C.cosine_matrix(a[:2], b[:2])
    np.testing.assert_allclose(m, [[1.0, -np.sqrt(0.5)], [np.sqrt(0.5), -1.0]], atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        C.cosine_per_class(a, b[:2])


def test_compare_centers_pairs_and_stats():
    kinds = {"a": np.eye(3), "b": np.eye(3) * 2, "c": -np.eye(3)}
    out = C.compare_centers(kinds)
    assert set(out) == {"a vs b", "a vs c", "b vs c"}
    assert out["a vs b"]["cosine_mean"] == pytest.approx(1.0)
    assert out["a vs c"]["cosine_mean"] == pytest.approx(-1.0)
    assert out["a vs b"]["mse_mean"] == pytest.approx(1 / 3)
    assert out["a vs b"]["cosine_std"] == pytest.approx(0.0)


def test_variance_and_separation():
    f = np.array([[0.0, 1.0], [0.0, -1.0], [3.0, 0.0]])
    y = np.array([0, 0, 1])
    c = np.array([[0.0, 0.0], [4.0, 0.0]])
    assert C.intra_class_variance(f, y, c) == pytest.approx((1 + 1 + 1) / 3)
    sep = C.inter_class_separation(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]))
    assert sep["min"] == pytest.approx(1.0)
    assert sep["mean"] == pytest.approx((5 + 1 + np.sqrt(9 + 9)) / 3)


@pytest.fixture(scope="module")
def feature_net(mnist_small):
    import keras

    keras.utils.set_random_seed(0)
    x, y, _, _ = mnist_small
    model = tfadv.models.mnist_feature_net(feature_dim=4, arch="small")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return model


def test_extraction_matches_eager_numpy_mean(feature_net, mnist_small):
    _, _, x, y = mnist_small
    x, y = x[:120], y[:120]
    clean, counts = C.extract_centers(feature_net, (x, y), batch_size=50)
    f = C.features_of(feature_net, x)
    ref = np.stack([f[y == k].mean(0) if (y == k).any() else np.zeros(4) for k in range(10)])
    np.testing.assert_allclose(clean, ref, atol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=10))

    attack = InversePGD(random_start=False)
    inv, _ = C.extract_centers(feature_net, (x, y), attack=attack, batch_size=50)
    f_inv = C.features_of(feature_net, np.concatenate(
        [attack(feature_net, x[i:i + 50], y[i:i + 50]).numpy() for i in range(0, 120, 50)]))
    ref_inv = np.stack([f_inv[y == k].mean(0) for k in range(10)])
    np.testing.assert_allclose(inv, ref_inv, atol=1e-4)
    assert not np.allclose(inv, clean)


def test_repeated_extraction_reuses_one_trace(feature_net, mnist_small):
    from tfadv.evaluation.centers import _extraction_fn

    _, _, x, y = mnist_small
    attack = InversePGD(random_start=False)
    first, _ = C.extract_centers(feature_net, (x[:100], y[:100]), attack=attack, batch_size=50)
    second, _ = C.extract_centers(feature_net, (x[100:200], y[100:200]), attack=attack,
                                  batch_size=50)
    run = _extraction_fn(feature_net, "features", 10, attack, False)
    assert run.experimental_get_tracing_count() == 1
    assert not np.allclose(first, second)  # other data, same trace: not a stale result
    # Class-wise perturbations are an argument, not a constant of the trace.
    d1 = np.zeros((10, 28, 28, 1), np.float32)
    d2 = np.full((10, 28, 28, 1), 0.1, np.float32)
    a, _ = C.extract_centers(feature_net, (x[:100], y[:100]), deltas=d1, batch_size=50)
    with_deltas = _extraction_fn(feature_net, "features", 10, None, True)
    traces = with_deltas.experimental_get_tracing_count()
    b, _ = C.extract_centers(feature_net, (x[:100], y[:100]), deltas=d2, batch_size=50)
    assert with_deltas.experimental_get_tracing_count() == traces
    clean, _ = C.extract_centers(feature_net, (x[:100], y[:100]), batch_size=50)
    np.testing.assert_allclose(a, clean, atol=1e-5)
    f = C.features_of(feature_net, np.clip(x[:100] + 0.1, 0, 1))
    yk = y[:100]
    ref = np.stack([f[yk == k].mean(0) if (yk == k).any() else np.zeros(f.shape[1])
                    for k in range(10)])
    np.testing.assert_allclose(b, ref, atol=1e-4)


def test_uiat_perturbations_lower_the_loss_inside_the_ball(feature_net, mnist_small):
    import tensorflow as tf
    from tfadv.attacks.objectives import cross_entropy

    _, _, x, y = mnist_small
    deltas = C.universal_inverse_perturbations(feature_net, (x, y), epochs=3, batch_size=100)
    assert deltas.shape == (10, 28, 28, 1)
    assert np.abs(deltas).max() <= 4 / 255 + 1e-7
    x_inv = np.clip(x + deltas[y], 0, 1)
    before = float(tf.reduce_mean(cross_entropy(feature_net(x), y)))
    after = float(tf.reduce_mean(cross_entropy(feature_net(x_inv), y)))
    assert after < before
    uiat, _ = C.extract_centers(feature_net, (x, y), deltas=deltas)
    assert uiat.shape == (10, 4)


def test_classifier_weights_shape(feature_net):
    w = C.classifier_weights(feature_net)
    assert w.shape == (10, 4)
    np.testing.assert_array_equal(w[3], feature_net.get_layer("classifier").kernel.numpy()[:, 3])


def test_study_keeps_finished_models_for_resume(tmp_path):
    from tfadv.recipes.centers import (CentersStudyConfig, load_model_results,
                                       save_model_results)

    cfg = CentersStudyConfig(out=str(tmp_path), epochs=3)
    res = {"clean_accuracy": 0.9, "history": {"loss": [1.0, 0.5]}}
    kinds = {"clean": np.eye(3, 2), "inverse": np.ones((3, 2))}
    feats = np.arange(12.0).reshape(6, 2)
    done = tmp_path / "models_done"
    assert load_model_results(done, "A", cfg) is None
    save_model_results(done, "A", cfg, res, kinds, feats)
    got_res, got_kinds, got_feats = load_model_results(done, "A", cfg)
    assert got_res == res and set(got_kinds) == set(kinds)
    np.testing.assert_array_equal(got_kinds["inverse"], kinds["inverse"])
    np.testing.assert_array_equal(got_feats, feats)
    # Other settings (not another output folder or model list) must not reuse it.
    other = CentersStudyConfig(out=str(tmp_path / "elsewhere"), epochs=4)
    assert load_model_results(done, "A", other) is None
    same = CentersStudyConfig(out=str(tmp_path / "elsewhere"), epochs=3, models=("A",))
    assert load_model_results(done, "A", same) is not None


def test_settings_of_model_d_do_not_discard_the_other_models(tmp_path):
    import json

    from tfadv.recipes.centers import (CentersStudyConfig, load_model_results, model_backup,
                                       save_model_results)

    cfg = CentersStudyConfig(out=str(tmp_path), epochs=3)
    done = tmp_path / "models_done"
    for name in "AD":
        save_model_results(done, name, cfg, {"clean_accuracy": 0.5}, {"clean": np.eye(2)},
                           np.zeros((2, 2)))
    retuned = CentersStudyConfig(out=str(tmp_path), epochs=3, adv_eps=0.2, adv_clean_epochs=1)
    assert load_model_results(done, "A", retuned) is not None
    assert load_model_results(done, "D", retuned) is None
    # A kept result whose key still holds D's settings (an earlier format) is reused for A.
    with open(done / "A.json") as f:
        saved = json.load(f)
    saved["key"].update(adv_eps=0.3, adv_warmup_epochs=2.0)
    with open(done / "A.json", "w") as f:
        json.dump(saved, f)
    assert load_model_results(done, "A", retuned) is not None
    assert load_model_results(done, "A", CentersStudyConfig(out=str(tmp_path), epochs=4)) is None
    assert load_model_results(
        done, "A", CentersStudyConfig(out=str(tmp_path), epochs=3, adv_center_on="clean"))
    # A key from before a setting existed matches that setting's default only.
    with open(done / "D.json") as f:
        saved = json.load(f)
    del saved["key"]["adv_center_on"]
    with open(done / "D.json", "w") as f:
        json.dump(saved, f)
    assert load_model_results(done, "D", cfg) is not None
    assert load_model_results(
        done, "D", CentersStudyConfig(out=str(tmp_path), epochs=3, adv_center_on="clean")) is None
    with pytest.raises(ValueError, match="adv_center_on"):
        CentersStudyConfig(out=str(tmp_path), adv_center_on="features")
    # Same for a mid-training backup: kept for A, discarded for D.
    for name in "AD":
        model_backup(str(tmp_path), name, cfg)
        (tmp_path / "backup" / name / "marker").write_text("x")
    model_backup(str(tmp_path), "A", retuned)
    model_backup(str(tmp_path), "D", retuned)
    assert (tmp_path / "backup" / "A" / "marker").exists()
    assert not (tmp_path / "backup" / "D" / "marker").exists()


def test_robust_accuracy_sees_through_a_saturated_softmax(feature_net, mnist_small):
    """CE attacks stall on a very confident model (zero CE gradient); the margin/DLR ones do not."""
    import keras

    from tfadv.recipes.centers import ROBUST_ATTACKS, CentersStudyConfig, robust_results

    _, _, x, y = mnist_small
    x, y = x[:100], y[:100]
    inp = keras.Input(x.shape[1:])
    saturated = keras.Model(inp, keras.layers.Rescaling(1e5)(feature_net(inp)))
    cfg = CentersStudyConfig(out="unused", robust_eps=0.3, robust_steps=10)
    r = robust_results(saturated, x, y, cfg)
    after = r["robust_after"]
    assert list(after) == list(ROBUST_ATTACKS)
    # Cumulative: never rises, ends at the worst case.
    assert all(a >= b for a, b in zip([r["clean_accuracy"], *after.values()], after.values()))
    assert after["pgd_margin"] == r["robust_accuracy"]
    # The CE attacks stall, the DLR/margin ones break what they left.
    assert after["apgd_ce"] > r["robust_accuracy"] + 0.1
    plain = robust_results(feature_net, x, y, cfg)
    assert plain["clean_accuracy"] == pytest.approx(r["clean_accuracy"])
    assert plain["robust_after"]["apgd_ce"] < after["apgd_ce"]


def test_an_undertrained_study_does_not_answer_the_question():
    from tfadv.recipes.centers import _verdict

    def model(acc, var):
        return {"clean_accuracy": acc, "variance_to_separation": var, "robust_accuracy": 0.0,
                "comparisons": {}}

    quick = {"_n": {"test": 300}, "A": model(0.49, 0.02), "C": model(0.50, 0.02)}
    answer = [v for v in _verdict(quick) if v.startswith("Answer:")]
    assert answer and answer[0].startswith("Answer: undecided") and "A (0.490 clean)" in answer[0]
    full = {"_n": {"test": 1000}, "A": model(0.944, 0.0199), "C": model(0.921, 0.0271)}
    answer = [v for v in _verdict(full) if v.startswith("Answer:")]
    assert answer == ["Answer: on this evidence inverse adversaries can NOT simply replace the "
                      "learned centres (accuracy measurably lower)."]
