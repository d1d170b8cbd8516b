"""Verification pairs and metrics: ROC/AUC against scikit-learn, TAR@FAR, k-fold, thresholds."""

import json
import math

import numpy as np
import pytest
from sklearn import metrics
from sklearn.model_selection import StratifiedKFold

from tfadv.data.pairs import cross_pairs, make_pairs, read_lfw_pairs
from tfadv.evaluation import verification as V

# Hand-made scores with ties inside and across classes.
SCORES = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.6, 0.4, 0.3, 0.3, 0.1, -0.2])
IS_SAME = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0], bool)


# --------------------------------------------------------------------------- pairs


def test_make_pairs_properties():
    labels = np.repeat(np.arange(6), [1, 2, 3, 4, 10, 1])  # two singletons
    a, b, same = make_pairs(labels, 40, seed=1)
    assert len(a) == 40 and same.sum() == 20
    assert a.dtype == np.int64 and same.dtype == bool
    assert np.all(a != b)
    np.testing.assert_array_equal(labels[a] == labels[b], same)
    keys = {(min(i, j), max(i, j)) for i, j in zip(a, b)}
    assert len(keys) == 40  # no repeated pair
    singletons = {0, 20}
    assert not singletons & set(a[same]) | singletons & set(b[same])
    # Deterministic in the seed, different across seeds.
    again = make_pairs(labels, 40, seed=1)
    for x, y in zip((a, b, same), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(make_pairs(labels, 40, seed=2)[0], a)
    # Same pairs are spread over identities, not dominated by the big one.
    a, b, same = make_pairs(labels, 8, seed=0)
    assert len(np.unique(labels[a[same]])) == 4


def test_make_pairs_limits_and_errors():
    labels = np.array([0, 0, 1, 1, 2])  # 2 distinct same pairs possible
    with pytest.warns(UserWarning, match="allow only 2 distinct same"):
        a, b, same = make_pairs(labels, 100)
    assert same.sum() == 2 and (~same).sum() == 2
    a, b, same = make_pairs(labels)  # default: as many as allowed, balanced, no warning
    assert same.sum() == 2 and (~same).sum() == 2
    a, b, same = make_pairs(labels, 6, same_fraction=0.0)
    assert not same.any() and len(a) == 6
    with pytest.raises(ValueError, match="at least 2 identities"):
        make_pairs([3, 3, 3])
    with pytest.raises(ValueError, match="single image"):
        make_pairs([0, 1, 2])
    with pytest.raises(ValueError, match="same_fraction"):
        make_pairs(labels, same_fraction=1.5)
    a, b, same = make_pairs(["ann", "ann", "bo", "cy"], 2)  # string labels
    assert same.sum() == 1


def test_make_pairs_large_sparse_request_uses_sampling():
    labels = np.repeat(np.arange(200), 20)
    a, b, same = make_pairs(labels, 2000, seed=0)
    assert same.sum() == 1000 and len({(i, j) for i, j in zip(a, b)}) == 2000
    np.testing.assert_array_equal(labels[a] == labels[b], same)


def test_cross_pairs():
    a, b, same = cross_pairs([0, 1], [1, 1, 0])
    np.testing.assert_array_equal(a, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(same, [False, False, True, True, True, False])


def test_read_lfw_pairs(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("2\t1\n"
                    "Ann_Lee\t1\t2\n"
                    "Ann_Lee\t1\tBo_Chan\t3\n"
                    "Bo_Chan  2 3\n"
                    "Cy_Day\t1\tAnn_Lee\t2\n")
    pairs = read_lfw_pairs(path)
    assert len(pairs) == 4
    np.testing.assert_array_equal(pairs.is_same, [True, False, True, False])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 1, 1])
    first, second = pairs.file_names("/lfw")
    assert first[0] == "/lfw/Ann_Lee/Ann_Lee_0001.jpg" and second[1] == "/lfw/Bo_Chan/Bo_Chan_0003.jpg"
    loaded = ["x/Ann_Lee/Ann_Lee_0001.png", "x/Ann_Lee/Ann_Lee_0002.png",
              "x/Bo_Chan/Bo_Chan_0003.png", "x/Bo_Chan/Bo_Chan_0002.png"]  # Cy_Day missing
    a, b, same, fold, dropped = pairs.to_indices(loaded)
    np.testing.assert_array_equal(a, [0, 0, 3])
    np.testing.assert_array_equal(b, [1, 2, 2])
    np.testing.assert_array_equal(same, [True, False, True])
    assert dropped == 1 and list(fold) == [0, 0, 1]

    (tmp_path / "dev.txt").write_text("1\nAnn_Lee 1 2\nAnn_Lee 1 Bo_Chan 1\n")
    assert len(read_lfw_pairs(tmp_path / "dev.txt")) == 2
    (tmp_path / "bad.txt").write_text("1\nAnn_Lee 1 2\nAnn_Lee one\n")
    with pytest.raises(ValueError, match="bad.txt:3"):
        read_lfw_pairs(tmp_path / "bad.txt")
    (tmp_path / "short.txt").write_text("10\t300\nAnn_Lee 1 2\n")
    with pytest.raises(ValueError, match="6000 lines"):
        read_lfw_pairs(tmp_path / "short.txt")
    with pytest.raises(FileNotFoundError):
        read_lfw_pairs(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- metrics


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(V.cosine_similarity(a, b), [1.0, -1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(V.cosine_similarity(a[:2], [1.0, 0.0]), [1.0, math.sqrt(0.5)])
    np.testing.assert_allclose(V.similarity_matrix(a[:2], b[:2]),
                               [[1.0, -math.sqrt(0.5)], [math.sqrt(0.5), -1.0]], atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        V.cosine_similarity(a, b[:2])


def test_roc_and_auc_match_sklearn():
    rng = np.random.default_rng(0)
    cases = [(SCORES, IS_SAME)]
    for n in (5, 17, 60):  # coarse scores: many ties
        y = rng.integers(0, 2, n).astype(bool)
        y[:2] = [True, False]
        cases.append((rng.integers(0, 5, n) / 4.0, y))
    for scores, y in cases:
        far, tar, thr = V.roc_curve(scores, y)
        fpr, tpr, sk_thr = metrics.roc_curve(y, scores, drop_intermediate=False)
        np.testing.assert_allclose(far, fpr)
        np.testing.assert_allclose(tar, tpr)
        np.testing.assert_allclose(thr[1:], sk_thr[1:])
        assert thr[0] == np.inf
        assert V.roc_auc(scores, y) == pytest.approx(metrics.roc_auc_score(y, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_roc_auc_and_tar_at_far_against_sklearn_on_random_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(20, 400))
    y = rng.integers(0, 2, n)  # 0/1 labels, as sklearn takes them
    y[:2] = [1, 0]
    levels = int(rng.integers(2, 12))  # few distinct values: ties within and across classes
    scores = np.round(rng.integers(0, levels, n) / levels + 0.3 * y, 3)
    far, tar, thr = V.roc_curve(scores, y)
    fpr, tpr, sk_thr = metrics.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_array_equal(far, fpr)
    np.testing.assert_array_equal(tar, tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert len(thr) == len(np.unique(scores)) + 1
    assert V.roc_auc(scores, y) == metrics.roc_auc_score(y, scores)
    assert V.roc_auc(scores, y) == pytest.approx(metrics.auc(fpr, tpr), abs=1e-12)
    for level in (0.05, 0.2, 0.5):
        if (y == 0).sum() < 1 / level:
            continue
        got, threshold = V.tar_at_far(scores, y, level, return_threshold=True)
        ok = fpr <= level + 1e-12
        assert got == tpr[ok].max()
        accepted = scores >= threshold
        assert accepted[y == 0].mean() <= level + 1e-12 and accepted[y == 1].mean() == got


def test_metric_input_errors():
    with pytest.raises(ValueError, match="both same and different"):
        V.roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="finite"):
        V.roc_auc([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="same length"):
        V.best_threshold([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="0/1"):
        V.best_threshold([0.1, 0.2], [2, 0])


def _tar_at_far_oracle(scores, is_same, far):
    best = 0.0
    for t in np.r_[np.inf, scores]:
        accepted = scores >= t
        if np.mean(accepted[~is_same]) <= far:
            best = max(best, np.mean(accepted[is_same]))
    return best


def test_tar_at_far():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(300, bool), np.zeros(1000, bool)]
    scores = np.round(np.where(y, rng.normal(1.0, 0.5, y.size), rng.normal(0, 0.5, y.size)), 2)
    for far in (1e-3, 1e-2, 0.1, 0.5):
        tar, thr = V.tar_at_far(scores, y, far, return_threshold=True)
        assert tar == pytest.approx(_tar_at_far_oracle(scores, y, far))
        assert np.mean(scores[~y] >= thr) <= far
        assert np.mean(scores[y] >= thr) == pytest.approx(tar)
    assert V.tar_at_far(SCORES, IS_SAME, 1.0 / 6.0) == pytest.approx(3 / 6)
    # A tie group comes in whole: at 0.6 there are one same and two different pairs, so
    # allowing 2 false accepts stops above it (TAR 3/6, not 4/6); 3 let it in and 0.4 too.
    scores, y = np.r_[SCORES, np.full(100, -1.0)], np.r_[IS_SAME, np.zeros(100, bool)]
    assert V.tar_at_far(scores, y, 2 / 106) == pytest.approx(3 / 6)
    assert V.tar_at_far(scores, y, 3 / 106) == pytest.approx(5 / 6)


def test_tar_at_far_too_few_negatives_is_nan():
    with pytest.warns(UserWarning, match="at least 100 different-person pairs"):
        assert math.isnan(V.tar_at_far(SCORES, IS_SAME, 1e-2))
    with pytest.raises(ValueError, match="far"):
        V.tar_at_far(SCORES, IS_SAME, 0.0)


def test_best_threshold():
    rng = np.random.default_rng(2)
    for _ in range(20):
        scores = rng.integers(0, 6, 30) / 5.0
        y = rng.integers(0, 2, 30).astype(bool)
        threshold, acc = V.best_threshold(scores, y)
        brute = max(np.mean((scores >= t) == y) for t in np.r_[scores, np.inf])
        assert acc == pytest.approx(brute)
        assert V.accuracy_at(scores, y, threshold) == pytest.approx(acc)
    # Separable: the threshold sits halfway in the gap.
    threshold, acc = V.best_threshold([0.9, 0.7, 0.3, 0.1], [1, 1, 0, 0])
    assert acc == 1.0 and threshold == pytest.approx(0.5)
    # One class only: accept all / reject all.
    assert V.best_threshold([0.2, 0.4], [True, True]) == (0.2, 1.0)
    threshold, acc = V.best_threshold([0.2, 0.4], [False, False])
    assert acc == 1.0 and threshold > 0.4


def test_kfold_accuracy():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 2000).astype(bool)
    separable = np.where(y, rng.uniform(0.5, 1.0, y.size), rng.uniform(-1.0, 0.4, y.size))
    result = V.kfold_accuracy(separable, y, folds=10)
    assert result.mean == 1.0 and result.std == 0.0
    assert len(result.fold_accuracies) == 10
    assert np.all((result.fold_thresholds > 0.4) & (result.fold_thresholds < 0.5))
    random = V.kfold_accuracy(rng.normal(size=y.size), y, folds=10)
    assert abs(random.mean - 0.5) < 0.05
    fold_ids = np.arange(y.size) % 4
    assert len(V.kfold_accuracy(separable, y, fold_ids=fold_ids).fold_accuracies) == 4
    with pytest.raises(ValueError, match="folds"):
        V.kfold_accuracy(separable, y, folds=1)


def test_kfold_accuracy_is_sklearn_stratified_kfold():
    rng = np.random.default_rng(4)
    y = rng.random(600) < 0.3
    scores = np.round(np.where(y, rng.normal(0.6, 0.3, y.size), rng.normal(0.1, 0.3, y.size)), 1)
    result = V.kfold_accuracy(scores, y, folds=10, seed=7)
    expected_acc, expected_thr = [], []
    for train, test in StratifiedKFold(10, shuffle=True, random_state=7).split(scores, y):
        threshold, _ = V.best_threshold(scores[train], y[train])
        expected_thr.append(threshold)
        expected_acc.append(np.mean((scores[test] >= threshold) == y[test]))
    np.testing.assert_array_equal(result.fold_thresholds, expected_thr)
    np.testing.assert_allclose(result.fold_accuracies, expected_acc)
    assert result.mean == pytest.approx(np.mean(expected_acc))
    assert result.std == pytest.approx(np.std(expected_acc))  # population std, as LFW reports
    again = V.kfold_accuracy(scores, y, folds=10, seed=7)
    np.testing.assert_array_equal(again.fold_accuracies, result.fold_accuracies)
    # Official folds given as ids (any labels, -1 included) are used as they are.
    fold_ids = np.repeat([-1, 3, 8], 200)
    by_ids = V.kfold_accuracy(scores, y, fold_ids=fold_ids)
    for k, fold in enumerate((-1, 3, 8)):
        test = fold_ids == fold
        threshold, _ = V.best_threshold(scores[~test], y[~test])
        assert by_ids.fold_thresholds[k] == threshold
        assert by_ids.fold_accuracies[k] == V.accuracy_at(scores[test], y[test], threshold)


def test_kfold_accuracy_with_fewer_pairs_of_each_kind_than_folds():
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0], bool)  # 6 and 6, 10 folds
    scores = np.linspace(0.0, 1.0, y.size)
    result = V.kfold_accuracy(scores, y, folds=10)
    assert len(result.fold_accuracies) == 10 and np.isfinite(result.mean)
    one_kind = V.kfold_accuracy(scores, np.ones(12, bool), folds=4)
    assert len(one_kind.fold_accuracies) == 4 and one_kind.mean > 0.5


def _clustered_embeddings(num_ids=6, per_id=8, dim=16, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:num_ids]  # orthogonal identities: cleanly separable
    labels = np.repeat(np.arange(num_ids), per_id)
    return centres[labels] + noise * rng.normal(size=(labels.size, dim)), labels


def test_verification_report():
    emb, labels = _clustered_embeddings()
    report = V.verification_report(emb, labels, folds=5, fars=(0.1,))
    assert report["accuracy"] == 1.0 and report["auc"] == 1.0
    assert report["num_pairs"] == report["num_same"] + report["num_different"]
    assert report["num_same"] == report["num_different"] == 6 * 28
    assert report["tar@far=0.1"] == 1.0
    assert -1.0 <= report["threshold"] <= 1.0
    json.dumps(report)
    # Explicit pairs, and NaN (with a warning) where FAR cannot be resolved.
    pairs = make_pairs(labels, 20, seed=1)
    with pytest.warns(UserWarning):
        report = V.verification_report(emb, pairs=pairs, folds=5)
    assert report["num_pairs"] == 20 and math.isnan(report["tar@far=0.001"])
    with pytest.raises(ValueError, match="labels"):
        V.verification_report(emb)


def test_nearest_neighbour_accuracy():
    emb, labels = _clustered_embeddings()
    probe, gallery = np.arange(0, 48, 2), np.arange(1, 48, 2)
    assert V.nearest_neighbour_accuracy(emb[probe], labels[probe], emb[gallery],
                                        labels[gallery]) == 1.0
    assert V.nearest_neighbour_accuracy(emb, labels) == 1.0  # leave-one-out, not self-matches
    shuffled = np.random.default_rng(0).permutation(labels[gallery])
    assert V.nearest_neighbour_accuracy(emb[probe], labels[probe], emb[gallery], shuffled) < 0.5
    with pytest.raises(ValueError, match="gallery label"):
        V.nearest_neighbour_accuracy(emb[probe], labels[probe], emb[gallery], labels[:3])


def test_threshold_json_round_trip(tmp_path):
    path = V.save_threshold(tmp_path, np.float32(0.3125), accuracy=np.float64(0.99),
                            far_levels=np.array([0.01, 0.001]), preset="facenet-mscele1m-128")
    assert path == tmp_path / "threshold.json"
    data = json.loads(path.read_text())
    assert data["cosine_threshold"] == 0.3125 and data["preset"] == "facenet-mscele1m-128"
    assert V.load_threshold(tmp_path) == 0.3125
    threshold, extra = V.load_threshold(path, with_extra=True)
    assert threshold == 0.3125 and extra["far_levels"] == [0.01, 0.001]
    V.save_threshold(tmp_path / "sub" / "t.json", -0.25)
    assert V.load_threshold(tmp_path / "sub" / "t.json") == -0.25
    with pytest.raises(ValueError, match="finite"):
        V.save_threshold(tmp_path / "x.json", float("nan"))
    (tmp_path / "bad.json").write_text('{"threshold": 0.3}')
    with pytest.raises(ValueError, match="cosine_threshold"):
        V.load_threshold(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        V.load_threshold(tmp_path / "none.json")


@pytest.mark.parametrize("bad", [1.5, -1.01, float("inf"), float("nan"), "x", None, True, [0.5]])
def test_check_threshold_is_the_cosine_range(bad):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        V.check_threshold(bad)


def test_check_threshold_accepts_the_range_and_numeric_text():
    assert V.check_threshold(-1) == -1.0 and V.check_threshold(1.0) == 1.0
    assert V.check_threshold("0.25") == 0.25 and V.check_threshold(np.float32(0.5)) == 0.5


@pytest.mark.parametrize("raw", ["1.5", "-2", "NaN", "Infinity", "true", '"high"'])
def test_threshold_reader_rejects_values_outside_the_cosine_range(tmp_path, raw):
    (tmp_path / "threshold.json").write_text('{"cosine_threshold": %s}' % raw)
    with pytest.raises(ValueError, match=r"cosine_threshold.*\[-1, 1\]"):
        V.load_threshold(tmp_path)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        V.save_threshold(tmp_path / "other.json", 1.5)


def test_threshold_reader_finds_the_file_next_to_a_model(tmp_path):
    V.save_threshold(tmp_path, 0.4)
    (tmp_path / "embedder.keras").write_bytes(b"")
    assert V.load_threshold(tmp_path / "embedder.keras") == 0.4
    assert V.threshold_file(tmp_path / "embedder.keras") == tmp_path / "threshold.json"
    assert V.threshold_file(tmp_path) == tmp_path / "threshold.json"
    assert V.threshold_file(tmp_path / "t.json") == tmp_path / "t.json"


def test_threshold_readers_agree(tmp_path):
    # The export reader and the evaluation reader take and refuse the same files.
    from tfadv.export import read_threshold

    for raw, ok in (("0.3", True), ("-1", True), ("1.0001", False), ("5", False)):
        (tmp_path / "threshold.json").write_text('{"cosine_threshold": %s}' % raw)
        for reader in (V.load_threshold, read_threshold):
            if ok:
                assert reader(str(tmp_path)) == float(raw)
            else:
                with pytest.raises(ValueError, match=r"\[-1, 1\]"):
                    reader(str(tmp_path))


def test_threshold_options_use_the_one_rule():
    import argparse

    from tfadv import argtypes
    from tfadv.cli import build_parser
    from tfadv.recipes import facenet_generate as G

    assert argtypes.cosine_threshold("-0.5") == -0.5
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[-1, 1\]"):
        argtypes.cosine_threshold("1.2")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "m.keras", "--out", "o", "--threshold", "2"])
    assert build_parser().parse_args(
        ["export", "m.keras", "--out", "o", "--threshold", "0.7"]).threshold == 0.7
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["facenet", "generate", "--preset", "p", "--out", "o", "--threshold", "-3"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        G.generate("no-such-model", "faces", "out", threshold=1.5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        G.make_attack("cw", "dodging", None, threshold=-1.5)


def test_numpy_cosine_is_the_one_cosine():
    """verification.cosine_similarity is the TF cosine run in float64 (NumPy closed form)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    want = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    got = V.cosine_similarity(a, b)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(V.cosine_similarity(a, b[0]), V.cosine_similarity(a, np.tile(b[0], (50, 1))))
    assert V.cosine_similarity(np.zeros((1, 8)), b[:1])[0] == 0.0
    assert V.cosine_similarity(np.zeros((0, 8)), np.zeros((0, 8))).shape == (0,)
