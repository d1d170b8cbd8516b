"""The embedding-model protocol (tfadv.evaluation.faces) on a tiny embedder."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import tiny_embedder
from tfadv.attacks.embedding import attack_success, embedding_attack
from tfadv.config.faces import FaceEvalConfig
from tfadv.evaluation import compiled as C
from tfadv.evaluation import faces as F

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def _photos(n_ids, per_id, seed):
    """Identities as distinct colour patterns with noise: float32 [N, 16, 16, 3] in [0, 255]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_ids):
        base = np.zeros((SIZE, SIZE, 3))
        base[..., c % 3] = 70 + 50 * c
        base[: SIZE // 2, :, (c + 1) % 3] = 40 * c
        for _ in range(per_id):
            images.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255))
            labels.append(c)
    return np.float32(images), np.int64(labels)


@pytest.fixture(scope="module")
def model():
    # tanh, seed 1: the four identities embed apart (own cosine ~1, other ones < 0.85).
    return tiny_embedder(SIZE, 6, activation="tanh", seed=1)


@pytest.fixture(scope="module")
def faces():
    gx, gl = _photos(4, 4, 0)
    px, pl = _photos(4, 3, 1)
    names = ["a", "b", "c", "d"]
    return (SimpleNamespace(images=gx, labels=gl, class_names=names),
            SimpleNamespace(images=px, labels=pl, class_names=names))


THRESHOLD = 0.95  # every probe matches its own identity clean and no other one


def _setup(model, faces):
    """Probes and their references per mode: {mode: (x, ref)}."""
    gallery, probes = faces
    refs = F.identity_references(F.embed(model, gallery.images), gallery.labels, 4)
    x, labels = probes.images, probes.labels
    return {"dodging": (x, refs[labels]), "impersonation": (x, refs[(labels + 1) % 4])}


def _cfg(**kw):
    # At eps 32 the attacks win some photos and lose others (and not the same ones).
    base = dict(eps=32.0, pgd_steps=3, apgd_steps=3, cw_iterations=3, cw_search_steps=1,
                curve_steps=3, min_eps_steps=3, min_eps_search=2, batch_size=4)
    return FaceEvalConfig(**{**base, **kw})


def test_suite_success_is_attack_success_on_the_returned_images(model, faces):
    cfg = _cfg(restarts=2)
    for mode, (x, ref) in _setup(model, faces).items():
        res = F.attack_suite(model, x, ref, THRESHOLD, mode, cfg)
        assert list(res.attacks) == list(cfg.attacks) and res.n == len(x)
        for name, r in res.attacks.items():
            assert r.x_adv.shape == x.shape
            judged = attack_success(model(r.x_adv), ref, THRESHOLD, mode).numpy()
            np.testing.assert_array_equal(r.per_example, judged, err_msg=f"{mode} {name}")
            assert r.success == pytest.approx(judged.mean())
            if name != "cw":
                assert np.abs(r.x_adv - x).max() <= cfg.eps + 1e-3
        assert res.attacks["pgd"].runs == 2 and res.attacks["fgsm"].runs == 1
        assert res.attacks["cw"].median_l2 is not None


def test_worst_case_is_the_or_over_attacks_and_restarts(model, faces, monkeypatch):
    x, ref = _setup(model, faces)["dodging"]
    runs = []
    real = F.attack_images

    def recording(model_, attack, x_, ref_, **kw):
        # Each run's success, over all photos (a restart attacks those not won yet).
        out = real(model_, attack, x_, ref_, **kw)
        ok = np.zeros(len(x), bool)
        which = [int(np.flatnonzero((x == row).all(axis=(1, 2, 3)))[0]) for row in x_]
        ok[which] = attack_success(model_(out), ref_, THRESHOLD, "dodging").numpy()
        runs.append((type(attack).__name__, ok, which))
        return out

    monkeypatch.setattr(F, "attack_images", recording)
    cfg = _cfg(restarts=3, attacks=("fgsm", "pgd", "apgd", "cw"))
    res = F.attack_suite(model, x, ref, THRESHOLD, "dodging", cfg, keep_images=False)
    by_attack = {}
    for kind, ok, which in runs:
        won_before = np.logical_or.reduce([np.zeros(len(x), bool)] + by_attack.get(kind, []))
        assert sorted(which) == list(np.flatnonzero(~won_before))  # the photos not won yet
        by_attack.setdefault(kind, []).append(ok)
    # FGSM and C&W once, PGD and APGD up to 3 times (a restart did run).
    assert list(by_attack) == ["FGSM", "PGD", "EmbeddingAPGD", "EmbeddingCW"]
    assert len(by_attack["FGSM"]) == len(by_attack["EmbeddingCW"]) == 1
    assert 1 < len(by_attack["PGD"]) <= 3 and 1 <= len(by_attack["EmbeddingAPGD"]) <= 3
    names = dict(zip(by_attack, cfg.attacks))
    for kind, oks in by_attack.items():
        np.testing.assert_array_equal(res.attacks[names[kind]].per_example,
                                      np.logical_or.reduce(oks))
    linf = [ok for kind, oks in by_attack.items() if names[kind] != "cw" for ok in oks]
    np.testing.assert_array_equal(res.worst_case, np.logical_or.reduce(linf))
    assert 0 < res.worst_case.sum() < len(x)  # some photos won, some not: the OR is tested
    assert res.suite_dict()["worst_case"]["success"] == pytest.approx(res.worst_case.mean())
    assert all(r.x_adv is None for r in res.attacks.values())


def test_no_restarts_without_a_random_start(model, faces):
    x, ref = _setup(model, faces)["dodging"]
    res = F.attack_suite(model, x, ref, THRESHOLD, "dodging",
                         _cfg(restarts=3, attacks=("pgd",), random_start=False))
    assert res.attacks["pgd"].runs == 1


def test_curve_is_one_compiled_function_per_mode_and_matches_fixed_budgets(model, faces):
    setup = {mode: (x[4:8], ref[4:8]) for mode, (x, ref) in _setup(model, faces).items()}
    budgets = (0.0, 16.0, 32.0, 64.0)
    # No random start: deterministic, so the budgets can be compared run for run. The
    # step keeps the suite's step_size / eps ratio (1/2) at every budget.
    cfg = _cfg(step_size=16.0, random_start=False, batch_size=16)
    C.clear(model)
    curves = {}
    for i, (mode, (x, ref)) in enumerate(setup.items()):
        curves[mode] = F.success_curve(model, x, ref, THRESHOLD, mode, budgets, cfg)
        assert len(C.cached_keys(model)) == i + 1 and C.tracing_count(model) == i + 1
    for mode, curve in curves.items():
        x, ref = setup[mode]
        assert curve.eps == list(budgets) and curve.per_example.shape == (len(budgets), len(x))
        for b, ok in zip(budgets, curve.per_example):
            if b == 0:
                expected = F.succeeded(F.embed(model, x), ref, THRESHOLD, mode)
            else:
                attack = embedding_attack("pgd", mode, eps=b, steps=cfg.curve_steps,
                                          step_size=b / 2, random_start=False, unroll=False)
                x_adv = F.attack_images(model, attack, x, ref, batch_size=4)
                expected = F.succeeded(F.embed(model, x_adv), ref, THRESHOLD, mode)
            np.testing.assert_array_equal(ok, expected, err_msg=f"{mode} eps {b}")
        assert curve.to_dict() == {"eps": list(budgets),
                                   "success": [float(r.mean()) for r in curve.per_example]}
    assert curves["dodging"].per_example.any() and not curves["dodging"].per_example.all()


def _key_paths(d, prefix=()):
    """Every key path of nested dicts (lists are leaves)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + (k,))
        if isinstance(v, dict):
            out |= _key_paths(v, prefix + (k,))
    return out


@pytest.mark.parametrize("report, groups", [
    ("facenet", {"trained": [0, 1, 2, 3], "held_out": []}),
    ("facenet-demo", {"trained": [0, 1, 2, 3], "held_out": []}),
])
def test_to_dict_has_the_keys_of_the_committed_metrics(model, faces, report, groups):
    metrics = json.loads((ROOT / "reports" / report / "metrics.json").read_text())
    committed = metrics["pretrained"]
    committed.pop("seconds", None)
    attacks = tuple(metrics["config"]["evaluation"]["attacks"])
    gallery, probes = faces
    res = F.evaluate_faces(model, gallery, probes, THRESHOLD, _cfg(attacks=attacks),
                           groups=groups)
    d = res.to_dict()
    assert _key_paths(d) == _key_paths(committed)
    assert list(d) == list(committed)
    json.dumps(d)  # JSON-ready
    for mode, r in res.attacks.items():
        assert d["attacks"][mode]["all"]["n"] == r.n
        for name in attacks:
            assert isinstance(d["attacks"][mode]["all"][name]["per_example"][0], bool)


def test_matched_photos_are_those_dodging_has_not_won(model, faces):
    gallery, probes = faces
    x, own = _setup(model, faces)["dodging"]
    cos = np.sort(np.sum(F.embed(model, x) * own, axis=1))
    thr = float(cos[len(cos) // 2 - 1:len(cos) // 2 + 1].mean())  # half the photos match
    res = F.evaluate_faces(model, gallery, probes, thr, _cfg(attacks=("fgsm",)))
    matched = ~attack_success(model(x), own, thr, "dodging").numpy()
    assert res.matched_clean == pytest.approx(matched.mean()) == pytest.approx(0.5)
    assert res.attacks["dodging"].n == matched.sum() == len(res.min_eps_dodging.values)
    assert set(res.groups) == {"all"} and res.groups["all"].probes == len(probes.labels)


def test_empty_inputs_and_bad_threshold(model, faces):
    x, ref = _setup(model, faces)["dodging"]
    res = F.attack_suite(model, x[:0], ref[:0], THRESHOLD, "dodging", _cfg(attacks=("pgd",)))
    assert res.n == 0 and np.isnan(res.attacks["pgd"].success)
    curve = F.success_curve(model, x[:0], ref[:0], THRESHOLD, "dodging", (1.0, 2.0), _cfg())
    assert np.isnan(curve.success).all()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        F.attack_suite(model, x, ref, 1.5, "dodging", _cfg())
    with pytest.raises(ValueError, match="mode"):
        F.attack_suite(model, x, ref, THRESHOLD, "sideways", _cfg(attacks=("fgsm",)))


def test_square_is_in_the_suite_and_its_worst_case_catches_masked_gradients(model, faces):
    """A black-box member of the face suite: Square (`EmbeddingSquare`, queries only) with
    the config's budget and seed, counted in the Linf worst case. On an embedder whose
    gradients are zero (inputs rounded to a 64-pixel grid) the gradient attacks cannot move
    and Square still wins photos: the worst case reports them."""
    import tensorflow as tf

    from tfadv.attacks.square import EmbeddingSquare

    def masked(x, training=False):
        x = tf.convert_to_tensor(x)
        # Connected to x with a zero gradient: what a shattered-gradient defence looks like.
        return model(tf.round(x / 64.0) * 64.0 + 0.0 * x, training=training)

    x, ref = _setup(model, faces)["dodging"]
    cfg = _cfg(eps=48.0, attacks=("fgsm", "pgd", "square"), random_start=False,
               square_queries=200)
    res = F.attack_suite(masked, x, ref, THRESHOLD, "dodging", cfg)
    assert res.attacks["fgsm"].success == res.attacks["pgd"].success == 0.0
    square = res.attacks["square"]
    assert square.success > 0
    np.testing.assert_array_equal(res.worst_case, square.per_example)
    assert np.abs(square.x_adv - x).max() <= cfg.eps + 1e-3
    direct = EmbeddingSquare(eps=48.0, threshold=THRESHOLD, mode="dodging", queries=200,
                             seed=cfg.seed, batch_size=cfg.batch_size).run(masked, x, ref)
    np.testing.assert_array_equal(square.per_example, direct.success)
