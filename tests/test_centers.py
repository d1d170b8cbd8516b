"""Centre extraction and comparison functions, and the centres study's orchestration."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tfadv.attacks import InversePGD
from tfadv.attacks.objectives import cross_entropy
from tfadv.evaluation import centers as C
from tfadv.evaluation import evaluate_robustness
from tfadv.evaluation.centers import CentersModelResult, CentersStudyResult, _extraction_fn
from tfadv.evaluation.verification import cosine_similarity
from tfadv.recipes.centers import (ROBUST_ATTACKS, CentersStudyConfig, load_model_results,
                                   model_backup, robust_attacks, run_centers_study,
                                   save_model_results)


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


def test_cosines_are_the_verification_cosine():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    np.testing.assert_array_equal(C.cosine_per_class(a, b), cosine_similarity(a, b))
    m = C.cosine_matrix(a, b)
    for i in range(4):
        np.testing.assert_allclose(m[i], cosine_similarity(b, a[i]), atol=1e-15)


def _model_result(acc=0.9, **kw):
    return CentersModelResult(**{**dict(
        clean_accuracy=acc, robust_accuracy=0.0, robust_after={"pgd_ce": 0.0},
        intra_class_variance=1.0, inter_class_separation={"mean": 2.0, "min": 1.0},
        variance_to_separation=0.25, comparisons={},
        centers={"clean": np.eye(3, 2, dtype=np.float32)},
        history={"loss": [1.0, 0.5]}), **kw})


def test_study_keeps_finished_models_for_resume(tmp_path):
    cfg = CentersStudyConfig(out=str(tmp_path), epochs=3)
    res = _model_result(centers={"clean": np.eye(3, 2, dtype=np.float32),
                                 "inverse": np.full((3, 2), 0.1, np.float32)})
    feats = np.arange(12.0, dtype=np.float32).reshape(6, 2)
    done = tmp_path / "models_done"
    assert load_model_results(done, "A", cfg) is None
    save_model_results(done, "A", cfg, res, feats)
    got_res, got_feats = load_model_results(done, "A", cfg)
    assert got_res.to_dict() == res.to_dict()
    np.testing.assert_array_equal(got_res.centers["inverse"], res.centers["inverse"])
    np.testing.assert_array_equal(got_feats, feats)
    # Other settings (not another output folder or model list) must not reuse it.
    messages = []
    other = CentersStudyConfig(out=str(tmp_path / "elsewhere"), epochs=4)
    assert load_model_results(done, "A", other, log=messages.append) is None
    assert len(messages) == 1 and "epochs: 3 -> 4" in messages[0]
    same = CentersStudyConfig(out=str(tmp_path / "elsewhere"), epochs=3, models=("A",))
    assert load_model_results(done, "A", same) is not None


def test_a_result_with_another_key_is_recomputed_not_migrated(tmp_path):
    cfg = CentersStudyConfig(out=str(tmp_path), epochs=3)
    done = tmp_path / "models_done"
    for name in "AD":
        save_model_results(done, name, cfg, _model_result(), np.zeros((2, 2)))
    # Model D's own settings (adv_*) do not key models A-C.
    retuned = CentersStudyConfig(out=str(tmp_path), epochs=3, adv_eps=0.2, adv_clean_epochs=1)
    assert load_model_results(done, "A", retuned) is not None
    assert load_model_results(done, "D", retuned, log=lambda m: None) is None
    assert load_model_results(done, "A", CentersStudyConfig(out=str(tmp_path), epochs=4),
                              log=lambda m: None) is None
    # The robust-accuracy attacks are part of the key.
    messages = []
    assert load_model_results(done, "A", CentersStudyConfig(out=str(tmp_path), epochs=3,
                                                            robust_steps=20),
                              log=messages.append) is None
    assert "robust_steps" in messages[0] and "computing them again" in messages[0]
    # A key that lacks a setting (a file of an earlier version) is not completed: recomputed.
    with open(done / "D.json") as f:
        saved = json.load(f)
    del saved["key"]["adv_center_on"]
    with open(done / "D.json", "w") as f:
        json.dump(saved, f)
    messages.clear()
    assert load_model_results(done, "D", cfg, log=messages.append) is None
    assert "adv_center_on" in messages[0]
    # A mid-training backup: kept for A, discarded for D.
    for name in "AD":
        model_backup(str(tmp_path), name, cfg)
        (tmp_path / "backup" / name / "marker").write_text("x")
    model_backup(str(tmp_path), "A", retuned)
    model_backup(str(tmp_path), "D", retuned, log=messages.append)
    assert (tmp_path / "backup" / "A" / "marker").exists()
    assert not (tmp_path / "backup" / "D" / "marker").exists()
    assert "discarding the training backup" in messages[-1]


def test_robust_accuracy_sees_through_a_saturated_softmax(feature_net, mnist_small):
    """CE attacks stall on a very confident model (zero CE gradient); the margin/DLR ones do not."""
    _, _, x, y = mnist_small
    x, y = x[:100], y[:100]
    inp = keras.Input(x.shape[1:])
    saturated = keras.Model(inp, keras.layers.Rescaling(1e5)(feature_net(inp)))
    cfg = CentersStudyConfig(out="unused", robust_eps=0.3, robust_steps=10)
    attacks = robust_attacks(cfg)
    assert list(attacks) == list(ROBUST_ATTACKS)
    assert attacks["pgd_ce"].step_size == pytest.approx(2.5 * 0.3 / 10)  # PGD's default
    r = evaluate_robustness(saturated, x, y, attacks, cascade=True)
    after = r.per_attack
    assert list(after) == list(ROBUST_ATTACKS)
    # Cumulative: never rises, ends at the worst case.
    assert all(a >= b for a, b in zip([r.clean_accuracy, *after.values()], after.values()))
    assert after["pgd_margin"] == r.robust_accuracy
    # The CE attacks stall, the DLR/margin ones break what they left.
    assert after["apgd_ce"] > r.robust_accuracy + 0.1
    # Each attack ran on what the earlier ones left.
    counts = list(r.attacked.values())
    assert counts[0] == round(r.clean_accuracy * 100)
    assert counts[1:] == [round(a * 100) for a in list(after.values())[:-1]]
    plain = evaluate_robustness(feature_net, x, y, attacks, cascade=True)
    assert plain.clean_accuracy == pytest.approx(r.clean_accuracy)
    assert plain.per_attack["apgd_ce"] < after["apgd_ce"]


def test_tiny_study_writes_typed_results_and_resumes(tmp_path, capsys):
    cfg = CentersStudyConfig.quick(str(tmp_path), models=("A",), epochs=1, limit=200,
                                   eval_limit=60, val_limit=60, uiat=False, robust_steps=2)
    study = run_centers_study(cfg, progress=False)
    assert isinstance(study, CentersStudyResult) and study.examples == {"train": 200, "test": 60}
    results = json.load(open(tmp_path / "results.json"))
    assert "_n" not in results["models"] and set(results["models"]) == {"A"}
    assert results["examples"] == {"train": 200, "test": 60}
    assert set(results) == {"config", "examples", "models", "figures", "verdict", "seconds"}
    a = results["models"]["A"]
    assert set(a) == {"clean_accuracy", "robust_accuracy", "robust_after",
                      "intra_class_variance", "inter_class_separation",
                      "variance_to_separation", "comparisons", "centers", "train_seconds",
                      "history", "autoattack"}
    assert a["autoattack"] is None  # the quick setting skips AutoAttack
    assert list(a["robust_after"]) == ["pgd_ce", "apgd_ce", "apgd_dlr", "pgd_margin"]
    assert a["robust_after"]["pgd_margin"] == a["robust_accuracy"]
    assert CentersStudyResult.from_dict(results).to_dict() == study.to_dict() | {
        "seconds": results["seconds"]}
    report = (tmp_path / "report.md").read_text()
    assert "Answer: none: the question compares models A and C" in report
    assert results["verdict"][-1].startswith("Answer: none")
    # Rerun: loaded, not retrained; another setting recomputes, saying why.
    capsys.readouterr()
    again = run_centers_study(cfg, progress=False)
    assert again.models["A"].to_dict() == study.models["A"].to_dict()
    assert capsys.readouterr().out == ""
    changed = CentersStudyConfig.quick(str(tmp_path), models=("A",), epochs=1, limit=200,
                                       eval_limit=60, val_limit=60, uiat=False, robust_steps=3)
    run_centers_study(changed, progress=False)
    out = capsys.readouterr().out
    assert "Model A: the results kept in" in out and "robust_steps: 2 -> 3" in out
    # AutoAttack on the finished model: the model is not retrained, its result is
    # kept in models_done/ and a rerun does not attack again.
    with_aa = dataclasses.replace(changed, autoattack=True)
    study = run_centers_study(with_aa, progress=False)
    aa = study.models["A"].autoattack
    assert aa["n"] == 60 and aa["eps"] == 0.3 and list(aa["per_attack"]) == [
        "apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["robust_accuracy"] <= aa["clean_accuracy"]
    assert os.path.exists(tmp_path / "models_done" / "A.autoattack.json")
    assert "AutoAttack (standard" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    run_centers_study(with_aa, progress=False)
    assert capsys.readouterr().out == ""
