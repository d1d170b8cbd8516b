"""The robust-FaceNet recipe on a tiny embedder and synthetic identities (fast, offline)."""

import json

import numpy as np
import pytest
from PIL import Image

import keras
from tests.conftest import tiny_embedder as make_embedder
from tfadv.recipes import facenet as R

SIZE = 32


def tiny_embedder(seed=0):
    return make_embedder(SIZE, 8, strides=2, seed=seed, input_name="image", name="tiny")


@pytest.fixture
def face_root(tmp_path):
    """4 identities, each a distinct colour pattern with noise; train/ and val/ splits."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("val", 2)):
        for person in range(4):
            d = tmp_path / "faces" / split / f"person{person}"
            d.mkdir(parents=True)
            base = np.zeros((40, 40, 3))
            base[..., person % 3] = 60 + 50 * person
            for i in range(count):
                img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
                Image.fromarray(img).save(d / f"{i}.png")
    (tmp_path / "faces" / "train" / "person0" / "broken.jpg").write_bytes(b"not an image")
    return tmp_path / "faces"


@pytest.fixture
def splits(face_root):
    return R.load_splits(face_root, holdout=1, seed=0, detector="none", size=SIZE)


@pytest.fixture
def tiny_pretrained(monkeypatch):
    monkeypatch.setattr(R, "pretrained", lambda preset: tiny_embedder())


def test_load_splits_reports_bad_images_and_holds_out_people(splits):
    assert len(splits.train.class_names) == 4 and len(splits.heldout_ids) == 1
    assert sorted(splits.train_ids + splits.heldout_ids) == [0, 1, 2, 3]
    assert splits.train.counts()["skipped_images"] == 1
    with pytest.raises(ValueError, match="no identity to fine-tune"):
        R.load_splits(splits.train.paths[0].rsplit("/", 3)[0], holdout=4, detector="none",
                      size=SIZE)


def test_missing_split_folder_is_explained(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="train/ and val/|val"):
        R.load_splits(tmp_path, detector="none")


def test_choosing_the_threshold_warns_nothing_about_tar_at_far(splits):
    """A small gallery cannot resolve TAR@FAR=1e-3, but the threshold does not need it:
    the old code warned 'Returning NaN' while the report printed a TAR@FAR from cross pairs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thr = R.choose_threshold(tiny_embedder(), splits)
    assert -1.0 <= thr <= 1.0


def test_evaluation_is_consistent(splits):
    model = tiny_embedder()
    thr = R.choose_threshold(model, splits)
    # No random start: every PGD run from the same point, so the curve point at
    # cfg.eps repeats the suite's PGD exactly and more budget cannot hurt.
    cfg = R.FaceEvalConfig(eps=24.0, pgd_steps=3, apgd_steps=3, attacks=("fgsm", "pgd", "apgd"),
                           curve_eps=(0.0, 6.0, 12.0, 24.0, 48.0), curve_steps=3,
                           min_eps_steps=3, min_eps_search=3, batch_size=4, random_start=False)
    res = R.evaluate_face_model(model, splits, thr, cfg)
    assert set(res["groups"]) == {"all", "trained", "held_out"}
    for mode in ("dodging", "impersonation"):
        all_ = res["attacks"][mode]["all"]
        per = {name: np.asarray(all_[name]["per_example"], bool) for name in cfg.attacks}
        for name, ok in per.items():
            assert len(ok) == all_["n"] and all_[name]["success"] == pytest.approx(ok.mean())
        # The worst case is the per-example OR of the Linf attacks, recomputed.
        worst = np.logical_or.reduce(list(per.values()))
        np.testing.assert_array_equal(all_["worst_case"]["per_example"], worst)
        assert all_["worst_case"]["success"] == pytest.approx(worst.mean())
        n = sum(res["attacks"][mode][g]["n"] for g in ("trained", "held_out")
                if g in res["attacks"][mode])
        assert n == all_["n"]
        curve = res["curves"][mode]
        assert curve["eps"] == [0.0, 6.0, 12.0, 24.0, 48.0]
        # eps 0: the photos attacked are those the mode had not yet won clean.
        assert curve["success"][0] == 0.0
        assert curve["success"][3] == pytest.approx(all_["pgd"]["success"])
        assert all(a <= b for a, b in zip(curve["success"], curve["success"][1:])), curve
    # This model matches every val photo clean, so dodging attacks all of them in
    # order and the per-group rates are the per-example results split by identity.
    assert res["matched_clean"] == 1.0
    dodging = res["attacks"]["dodging"]
    held = np.isin(splits.val.labels, splits.heldout_ids)
    for name in (*cfg.attacks, "worst_case"):
        ok = np.asarray(dodging["all"][name]["per_example"], bool)
        assert dodging["held_out"][name]["success"] == pytest.approx(ok[held].mean())
        assert dodging["trained"][name]["success"] == pytest.approx(ok[~held].mean())
    assert 0.0 < dodging["all"]["worst_case"]["success"]  # the attacks do bite
    # Minimal eps: bisection of [0, 16] in 3 steps gives multiples of 2, or inf.
    values = np.asarray(res["min_eps_dodging"]["values"])
    finite = values[np.isfinite(values)]
    assert len(values) == dodging["all"]["n"]
    np.testing.assert_array_equal(finite % 2.0, 0.0)
    assert ((finite > 0) & (finite <= cfg.min_eps_max)).all()
    assert res["min_eps_dodging"]["median"] == np.median(values)


def test_repeated_evaluation_reuses_every_trace(splits):
    from tfadv.evaluation import compiled as C

    model = tiny_embedder()
    thr = R.choose_threshold(model, splits)
    cfg = R.FaceEvalConfig.quick()
    first = R.evaluate_face_model(model, splits, thr, cfg)
    keys, traces = set(C.cached_keys(model)), C.tracing_count(model)
    # fgsm and pgd per mode, one scaled PGD per mode for all curve points, the search.
    assert len(keys) == 2 * 2 + 2 + 1
    second = R.evaluate_face_model(model, splits, thr, cfg)
    assert set(C.cached_keys(model)) == keys and C.tracing_count(model) == traces
    assert second["groups"] == first["groups"]


def test_evaluation_rejects_a_threshold_outside_the_cosine_range(splits):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        R.evaluate_face_model(tiny_embedder(), splits, 1.5, R.FaceEvalConfig.quick())


def test_chosen_threshold_stays_in_the_cosine_range(splits, tmp_path):
    from tfadv.evaluation import verification as V

    def constant(x, training=False):  # every photo embeds alike: all pair cosines are 1
        return np.tile(np.float32([[1.0, 0.0]]), (len(x), 1))

    # More different-person pairs than same-person ones: "accept none" wins, which
    # sits one ulp above 1 unless kept inside the range.
    thr = R.choose_threshold(constant, splits)
    assert thr == 1.0
    assert V.load_threshold(V.save_threshold(tmp_path, thr)) == 1.0


def test_finetune_writes_the_contract_files(splits, tiny_pretrained, tmp_path, monkeypatch):
    cfg = R.FaceFinetuneConfig(out=str(tmp_path / "run"), epochs=1, batch_size=4, holdout=1,
                               train_steps=1, freeze_until="Conv2d_1a_3x3",
                               evaluation=R.FaceEvalConfig.quick())
    # A tiny model has no InceptionResNetV1 stages to freeze.
    monkeypatch.setattr(R, "freeze_backbone", lambda model, until, **kw: 0)
    m = R.finetune(cfg, splits=splits, progress=False)
    out = tmp_path / "run"
    for f in ("embedder.keras", "threshold.json", "metrics.json", "report.md", "history.json"):
        assert (out / f).is_file(), f
    loaded = keras.saving.load_model(out / "embedder.keras", safe_mode=True)
    e = np.asarray(loaded(splits.val.images[:2]))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    thr = json.loads((out / "threshold.json").read_text())["cosine_threshold"]
    assert -1.0 <= thr <= 1.0 and m["finetuned"]["threshold"] == pytest.approx(thr)
    report = (out / "report.md").read_text()
    assert "| metric | pretrained | fine-tuned |" in report and "dodging" in report


def test_embed_files_reports_errors_per_file(face_root, tmp_path):
    model = tiny_embedder()
    path = tmp_path / "tiny.keras"
    model.save(path)
    good = sorted((face_root / "val" / "person1").glob("*.png"))[0]
    bad = face_root / "train" / "person0" / "broken.jpg"
    res = R.embed_files([good, bad, tmp_path / "missing.png"], model=path, detector="none")
    assert len(res[0]["embedding"]) == 8 and "error" not in res[0]
    assert "error" in res[1] and "error" in res[2]


@pytest.mark.slow
def test_cli_embed_json_real_face_and_bad_file(tmp_path):
    # The interface outside checks call: per image, the embedding of its largest face or an error.
    import subprocess
    import sys

    from tfadv import assets

    got = assets.fetch(quiet=True)
    photo = sorted((got.demo_faces / "val" / "madonna").glob("*.jpg"))[0]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 10)
    out = subprocess.run([sys.executable, "-m", "tfadv.cli", "facenet", "embed", "--json",
                          str(photo), str(bad)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res[0]["path"] == str(photo) and len(res[0]["embedding"]) == 128
    assert np.linalg.norm(res[0]["embedding"]) == pytest.approx(1.0, abs=1e-4)
    assert res[1]["path"] == str(bad) and "error" in res[1]


@pytest.mark.parametrize("method", ["fgsm_rs", "n_fgsm", "free"])
def test_finetune_with_a_fast_method(method, splits, tiny_pretrained, tmp_path, monkeypatch):
    """The fast methods reach the face recipe: the trainer runs them, the report names them."""
    monkeypatch.setattr(R, "freeze_backbone", lambda model, until, **kw: 0)
    cfg = R.FaceFinetuneConfig(out=str(tmp_path / "run"), epochs=1, batch_size=4, holdout=1,
                               method=method, free_replays=2, freeze_until="Conv2d_1a_3x3",
                               evaluation=R.FaceEvalConfig.quick())
    trainer = R.build_trainer(cfg, 3, 0.5)
    assert trainer.method == method and trainer.attack.eps == cfg.train_eps
    assert trainer.free_replays == 2
    R.finetune(cfg, splits=splits, progress=False)
    names = {"fgsm_rs": "FGSM-RS (step 1.25 eps, noise 1 eps)",
             "n_fgsm": "N-FGSM (step 1 eps, noise 2 eps)",
             "free": "free (step 1 eps, noise 0 eps, 2 replays)"}
    assert names[method] in (tmp_path / "run" / "report.md").read_text()


def test_fast_method_needs_a_budget():
    with pytest.raises(ValueError, match="--train-eps > 0"):
        R.FaceFinetuneConfig(out="x", method="n_fgsm", train_eps=0.0)


def test_evaluate_saved_uses_the_models_threshold_or_chooses_one(splits, tmp_path):
    """`tfadv facenet evaluate`: a saved embedder under the recipe's protocol; its
    threshold.json when there is one, else the threshold `finetune` would choose."""
    from tfadv.evaluation import verification as V

    model = tiny_embedder()
    path = tmp_path / "m" / "embedder.keras"
    path.parent.mkdir()
    model.save(path)
    cfg = R.FaceEvalConfig.quick()
    chosen = R.evaluate_saved(tmp_path / "a", model=str(path), splits=splits, evaluation=cfg,
                              progress=False)
    assert chosen["threshold_from"].startswith("gallery pairs")
    assert chosen["evaluation"]["threshold"] == pytest.approx(R.choose_threshold(model, splits))
    want = R.evaluate_face_model(model, splits, R.choose_threshold(model, splits), cfg)
    assert chosen["evaluation"]["attacks"]["dodging"]["all"]["worst_case"] == \
        want["attacks"]["dodging"]["all"]["worst_case"]
    V.save_threshold(path.parent, 0.5)
    given = R.evaluate_saved(tmp_path / "b", model=str(path), splits=splits, evaluation=cfg,
                             progress=False)
    assert given["evaluation"]["threshold"] == 0.5
    assert given["threshold_from"].endswith("threshold.json")
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["evaluation"]["threshold"] == 0.5 and saved["model"] == str(path)


def test_cli_facenet_evaluate_options():
    from tfadv.cli import build_parser

    args = build_parser().parse_args(["facenet", "evaluate", "--model", "m.keras", "--out", "o",
                                      "--eps", "8", "--attacks", "pgd"])
    assert (args.model, args.out, args.eps, args.holdout) == ("m.keras", "o", 8.0, 0)


def test_a_missing_face_folder_leaves_no_output_folder(tmp_path):
    cfg = R.FaceFinetuneConfig(out=str(tmp_path / "run"), faces=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="one folder per person"):
        R.finetune(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_facenet_certify_counts_the_certificates_of_every_val_face(splits, tmp_path, capsys,
                                                                   monkeypatch):
    """`tfadv facenet certify` on a saved embedder: its fractions are the decisions' counts,
    the smoothed decisions are recomputed from the written centres, and the JSON holds
    every face."""
    from tfadv.certification.center import CenterSmoothing, certified_decisions
    from tfadv.certification.faces import certify_faces
    from tfadv.cli import main
    from tfadv.config.certification import FaceCertifyConfig
    from tfadv.evaluation import faces as face_eval
    from tfadv.evaluation import verification as V

    model = tiny_embedder()
    thr = R.choose_threshold(model, splits)
    cfg = FaceCertifyConfig(sigma=4.0, radii=(0.0, 4.0, 1000.0), n0=400, n=500, limit=5)
    result = certify_faces(model, splits, thr, cfg)
    assert result["faces"] == 5 and len(result["per_face"]) == 5
    # The same certificates again (same seed) give the same fractions.
    refs = face_eval.identity_references(face_eval.embed(model, splits.train.images),
                                         splits.train.labels, 4)[splits.val.labels[:5]]
    cert = CenterSmoothing(model, 4.0, batch_size=32, delta=0.1, seed=0).certify(
        splits.val.images[:5], cfg.radii, n0=400, n=500, alpha=0.01)
    match, certified = certified_decisions(cert, refs, thr)
    assert result["smoothed_match"] == pytest.approx(match.mean())
    for j, r in enumerate(("0", "4", "1000")):
        assert result["radii"][r]["certified_match"] == pytest.approx(np.mean(certified[:, j] == 1))
    assert result["radii"]["1000"]["certified_match"] == 0.0  # past what n samples can show
    from scipy.stats import norm

    # The quantile Phi(Phi^-1(1/2 + delta) + r / sigma) + sqrt(ln(2 / alpha) / 2n) reaches 1.
    largest = 4.0 * (norm.ppf(1 - np.sqrt(np.log(200) / 1000)) - norm.ppf(0.6))
    assert result["largest_certifiable_radius"] == pytest.approx(largest)
    # The command line: a saved model with its threshold, --json and --out.
    path = tmp_path / "m" / "embedder.keras"
    path.parent.mkdir()
    model.save(path)
    V.save_threshold(path.parent, thr)
    out = tmp_path / "cert"
    asked = {}
    monkeypatch.setattr(R, "load_splits", lambda faces, **kw: asked.update(kw) or splits)
    main(["facenet", "certify", "--model", str(path), "--faces", "f", "--sigma", "4",
          "--radius", "0,4,1000", "--n0", "400", "--n", "500", "--limit", "5", "--json",
          "--out", str(out)])
    assert asked["size"] == SIZE  # the faces are cropped to the model's input size
    printed = json.loads(capsys.readouterr().out)
    assert printed["threshold"] == pytest.approx(thr)
    assert json.loads((out / "certify.json").read_text())["faces"] == 5
    assert "match certified" in (out / "certify.md").read_text()
