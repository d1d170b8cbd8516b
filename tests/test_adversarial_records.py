"""Adversarial examples on disk (TFRecord shards + metadata) and their offline generation."""

import dataclasses
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfadv.data import adversarial_records as R
from tfadv.recipes import facenet_generate as G

SIZE = 32


def _example(i, image, **overrides):
    fields = dict(
        image=image, label=i % 3, identity=f"person_{i % 3}", source_path=f"/faces/{i}.jpg",
        attack="pgd" if i % 2 else "cw", attack_config={"eps": 4.0, "steps": 20, "i": i},
        eps=4.0 if i % 2 else R.NO_EPS, norm="inf" if i % 2 else "2",
        mode="dodging" if i % 3 else "impersonation",
        target_label=-1 if i % 3 else (i + 1) % 3,
        target_identity="" if i % 3 else f"person_{(i + 1) % 3}",
        threshold=0.41, success=bool(i % 2), clean_similarity=0.9 - i / 100,
        adversarial_similarity=0.1 + i / 100, perturbation_linf=4.0, perturbation_l2=120.5 + i,
        source_index=i,
    )
    fields.update(overrides)
    return R.AdversarialExample(**fields)


def _examples(n, shape=(6, 5, 3), seed=0, integer=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.uniform(0, 255, shape).astype(np.float32)
        out.append(_example(i, np.rint(img) if integer else img))
    return out


def _visible(path):
    return sorted(p for p in os.listdir(path) if not p.startswith("."))


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact_with_all_fields(tmp_path):
    examples = _examples(7)
    meta = R.write_records(tmp_path, examples, shard_size=3, metadata={"model": "tiny"})
    assert meta["count"] == 7 and meta["model"] == "tiny"
    assert meta["image_shape"] == [6, 5, 3] and meta["image_format"] == "raw"
    got = list(R.read_records(tmp_path).as_numpy_iterator())
    assert len(got) == 7
    for ex, rec in zip(examples, got):
        assert rec["image"].dtype == np.float32 and rec["image"].shape == (6, 5, 3)
        # Bit-exact: the stored pixels are the measured ones.
        np.testing.assert_array_equal(rec["image"].view(np.uint32), ex.image.view(np.uint32))
        assert rec["label"] == ex.label and rec["source_index"] == ex.source_index
        assert rec["target_label"] == ex.target_label
        for name in ("identity", "source_path", "attack", "norm", "mode", "target_identity"):
            assert rec[name].decode() == getattr(ex, name)
        assert json.loads(rec["attack_config"]) == ex.attack_config
        for name in ("eps", "threshold", "clean_similarity", "adversarial_similarity",
                     "perturbation_linf", "perturbation_l2"):
            assert rec[name] == pytest.approx(getattr(ex, name), rel=1e-6)
        assert rec["success"] == ex.success and rec["success"].dtype == np.bool_
    assert json.loads((tmp_path / "metadata.json").read_text()) == meta


def test_static_shape_from_metadata_and_explicit(tmp_path):
    R.write_records(tmp_path, _examples(2))
    assert R.read_records(tmp_path).element_spec["image"].shape == (6, 5, 3)
    one = str(tmp_path / "shard-00000-of-00001.tfrecord")
    assert R.read_records(one).element_spec["image"].shape.as_list() == [None, None, None]
    assert R.read_records(one, image_shape=(6, 5, 3)).element_spec["image"].shape == (6, 5, 3)


def test_png_stores_rounded_uint8_and_is_exact_for_integer_images(tmp_path):
    examples = _examples(3, integer=True)
    R.write_records(tmp_path / "png", examples, image_format="png")
    R.write_records(tmp_path / "raw", examples)
    got = [r["image"] for r in R.read_records(tmp_path / "png").as_numpy_iterator()]
    for ex, img in zip(examples, got):
        np.testing.assert_array_equal(img, ex.image)
    png_bytes = sum(f.stat().st_size for f in (tmp_path / "png").glob("shard-*"))
    raw_bytes = sum(f.stat().st_size for f in (tmp_path / "raw").glob("shard-*"))
    assert png_bytes < raw_bytes
    # Non-integer pixels are rounded (documented: PNG is lossy for float images).
    R.write_records(tmp_path / "round", [_example(0, np.full((2, 2, 3), 10.4, np.float32))],
                    image_format="png")
    (img,) = [r["image"] for r in R.read_records(tmp_path / "round").as_numpy_iterator()]
    np.testing.assert_array_equal(img, 10.0)


def test_gzip_compression_round_trip(tmp_path):
    examples = _examples(4)
    R.write_records(tmp_path, examples, compression="GZIP", shard_size=2)
    got = [r["image"] for r in R.read_records(tmp_path).as_numpy_iterator()]
    np.testing.assert_array_equal(np.stack(got), np.stack([e.image for e in examples]))


def test_metadata_groups_and_counts(tmp_path):
    meta = R.write_records(tmp_path, _examples(6))
    assert meta["counts"]["by_attack"] == {"cw": 3, "pgd": 3}
    assert meta["eps"] == [4.0]  # C&W's NO_EPS is not a budget
    groups = {(g["attack"], g["mode"]): g for g in meta["groups"]}
    cw = groups[("cw", "impersonation")]
    assert cw["eps"] is None and cw["count"] == 1 and cw["success_rate"] == 0.0
    pgd = groups[("pgd", "dodging")]
    assert pgd["count"] == 2 and pgd["success_rate"] == 1.0
    assert pgd["median_perturbation_l2"] == pytest.approx(np.median([121.5, 125.5]))


# --------------------------------------------------------------------------- shards


def test_shards_split_by_size_and_are_named_of_n(tmp_path):
    meta = R.write_records(tmp_path, _examples(7), shard_size=3)
    names = [f"shard-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert _visible(tmp_path) == sorted(names + ["metadata.json"])
    assert [s["count"] for s in meta["shards"]] == [3, 3, 1]
    assert [s["file"] for s in meta["shards"]] == names
    counts = [sum(1 for _ in tf.data.TFRecordDataset(str(tmp_path / n))) for n in names]
    assert counts == [3, 3, 1]
    # A single shard and a glob pattern are readable too.
    assert len(list(R.read_records(str(tmp_path / names[1])))) == 3
    assert len(list(R.read_records(str(tmp_path / "shard-0000[01]-*")))) == 6
    # Shard order is kept: source_index comes back in write order.
    assert [int(r["source_index"]) for r in R.read_records(tmp_path)] == list(range(7))


def test_exact_multiple_of_shard_size_and_empty_run(tmp_path):
    meta = R.write_records(tmp_path / "a", _examples(4), shard_size=2)
    assert [s["count"] for s in meta["shards"]] == [2, 2]
    meta = R.write_records(tmp_path / "b", [])
    assert meta["count"] == 0 and meta["shards"] == []
    assert len(list(R.read_records(tmp_path / "b"))) == 0


def test_existing_run_needs_overwrite(tmp_path):
    R.write_records(tmp_path, _examples(5), shard_size=2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        R.write_records(tmp_path, _examples(1))
    R.write_records(tmp_path, _examples(1, seed=3), overwrite=True)
    assert _visible(tmp_path) == ["metadata.json", "shard-00000-of-00001.tfrecord"]
    assert len(list(R.read_records(tmp_path))) == 1


# --------------------------------------------------------------------------- atomicity


def test_killed_run_leaves_no_visible_shard(tmp_path):
    seen_during_run = []

    def crashing():
        for i, ex in enumerate(_examples(6)):
            if i == 5:
                # Mid-run (two shards written, a third open): nothing a reader matches.
                seen_during_run.append(_visible(tmp_path))
                assert R.shard_files(tmp_path) == []
                assert any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
                raise KeyboardInterrupt("killed")
            yield ex

    with pytest.raises(KeyboardInterrupt):
        R.write_records(tmp_path, crashing(), shard_size=2)
    assert seen_during_run == [[]]
    assert os.listdir(tmp_path) == []  # temporary files cleaned up
    with pytest.raises(FileNotFoundError):
        R.read_records(tmp_path)
    # The directory is free for a new run.
    assert R.write_records(tmp_path, _examples(2))["count"] == 2


def test_bad_example_aborts_without_output(tmp_path):
    bad = _examples(3)
    bad[2].image[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        R.write_records(tmp_path, bad, shard_size=1)
    assert os.listdir(tmp_path) == []


def test_incomplete_shard_set_is_detected(tmp_path):
    R.write_records(tmp_path, _examples(4), shard_size=2)
    os.remove(tmp_path / "shard-00001-of-00002.tfrecord")
    with pytest.raises(ValueError, match="Incomplete set of shards"):
        R.read_records(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    ({"shard_size": 0}, "shard_size"),
    ({"image_format": "jpeg"}, "image_format"),
    ({"compression": "LZ4"}, "compression"),
    ({"metadata": {"count": 3}}, "must not redefine"),
])
def test_write_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.write_records(tmp_path, _examples(2), **kwargs)
    assert R.shard_files(tmp_path) == []


# --------------------------------------------------------------------------- training input


def _labelled_records(tmp_path, n, label):
    examples = [_example(i, np.full((4, 4, 3), 200.0, np.float32), label=label) for i in range(n)]
    R.write_records(tmp_path, examples)
    return R.read_records(tmp_path)


def test_training_pairs_and_filters(tmp_path):
    ds = _labelled_records(tmp_path, 6, label=2)
    x, y = next(iter(R.to_training_pairs(ds)))
    assert x.shape == (4, 4, 3) and x.dtype == tf.float32 and y.dtype == tf.int64 and y == 2
    assert len(list(R.to_training_pairs(ds, success_only=True))) == 3
    assert len(list(R.filter_records(ds, attack="pgd"))) == 3
    assert len(list(R.filter_records(ds, eps=R.NO_EPS))) == 3
    assert len(list(R.filter_records(ds, mode=["impersonation"]))) == 2
    assert len(list(R.filter_records(ds, attack="pgd", mode="dodging", eps=4))) == 2
    assert len(list(R.filter_records(ds, success_only=True, eps=[1, 2]))) == 0


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_mix_with_draws_the_requested_fraction(tmp_path, fraction):
    adv = _labelled_records(tmp_path, 20, label=1)  # small: repeated to fill the stream
    n_clean = 1500
    clean = tf.data.Dataset.from_tensor_slices(
        (np.zeros((n_clean, 4, 4, 3), np.float32), np.zeros(n_clean, np.int64)))
    labels = np.array([int(y) for _, y in R.mix_with(clean, adv, fraction, seed=1)])
    observed = labels.mean()
    # Binomial noise of ~2000 draws: +-0.03 is about three standard deviations.
    assert abs(observed - fraction) < 0.03
    # The stream ends with the clean data: one pass over it.
    assert (labels == 0).sum() == n_clean


def test_mixed_stream_trains_a_model(tmp_path):
    adv = R.to_training_pairs(_labelled_records(tmp_path, 8, label=1))
    clean = tf.data.Dataset.from_tensor_slices(
        (np.zeros((32, 4, 4, 3), np.float32), np.zeros(32, np.int64)))
    train = R.mix_with(clean.shuffle(32, seed=0), adv.shuffle(8, seed=0), 0.5, seed=0).batch(8)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(train, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))


def test_mix_with_edges_and_errors(tmp_path):
    adv = _labelled_records(tmp_path, 3, label=1)
    clean = tf.data.Dataset.from_tensor_slices(
        (np.zeros((5, 4, 4, 3), np.float32), np.zeros(5, np.int64)))
    assert [int(y) for _, y in R.mix_with(clean, adv, 0.0)] == [0] * 5
    assert [int(y) for _, y in R.mix_with(clean, adv, 1.0)] == [1] * 3
    with pytest.raises(ValueError, match="adv_fraction"):
        R.mix_with(clean, adv, 1.5)
    with pytest.raises(ValueError, match="unbatch"):
        R.mix_with(clean.batch(2), adv, 0.5)
    # int32 labels in the clean stream: the adversarial labels follow.
    clean32 = clean.map(lambda x, y: (x, tf.cast(y, tf.int32)))
    assert R.mix_with(clean32, adv, 0.5).element_spec[1].dtype == tf.int32


# --------------------------------------------------------------------------- generation


def _tiny_embedder(seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    h = keras.layers.Conv2D(8, 3, strides=2, activation="tanh")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(8)(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


@pytest.fixture
def tiny_embedder():
    return _tiny_embedder()


@pytest.fixture
def faces_dir(tmp_path):
    """Three synthetic identities (a base pattern plus noise), three photos each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for person in ("ann", "bob", "cid"):
        base = rng.uniform(0, 255, (SIZE, SIZE, 3))
        (root / person).mkdir(parents=True)
        for k in range(3):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / person / f"{k}.png")
    return root


def _check_records_against_model(out, model, threshold, image_format="raw"):
    """Flags agree with the stored similarities; images in bounds and in the eps ball."""
    recs = list(R.read_records(out).as_numpy_iterator())
    images = np.stack([r["image"] for r in recs])
    emb = model(images).numpy()
    for r, e in zip(recs, emb):
        assert r["threshold"] == pytest.approx(threshold)
        ok = r["adversarial_similarity"] < threshold if r["mode"] == b"dodging" else \
            r["adversarial_similarity"] >= threshold
        assert ok == r["success"]
        assert 0.0 <= r["image"].min() and r["image"].max() <= 255.0
        if r["eps"] != R.NO_EPS:
            slack = 0.5 if image_format == "png" else 1e-3
            assert r["perturbation_linf"] <= r["eps"] + slack
    return recs, emb


def test_generate_end_to_end_with_cleverhans(tiny_embedder, faces_dir, tmp_path):
    out = tmp_path / "adv"
    attacks = ("fgsm", "pgd", "cw", "cleverhans_fgsm", "cleverhans_pgd")
    meta = G.generate(tiny_embedder, faces_dir, out, attacks=attacks, eps_list=(2, 8),
                      modes=("dodging", "impersonation"), steps=5, batch_size=4, limit=5,
                      cw_iterations=10, cw_search_steps=2, detector="none", shard_size=25,
                      compiled=False)  # eager: tracing costs more than it saves here
    # 4 budgeted attacks x 2 eps x 2 modes x 5 faces + C&W x 2 modes x 5 faces.
    assert meta["count"] == 4 * 2 * 2 * 5 + 2 * 5 == 90
    assert [s["count"] for s in meta["shards"]] == [25, 25, 25, 15]
    assert meta["attacks"] == list(attacks) and meta["eps"] == [2.0, 8.0]
    assert meta["threshold_source"].startswith("best-accuracy")
    assert meta["faces"]["attacked"] == 5 and meta["faces"]["images"] == 9
    assert meta["impersonation_targets"] == {"ann": "bob", "bob": "cid", "cid": "ann"}
    assert "cw" in meta["notes"] and meta["success_rates"]["cw"]["dodging"].keys() == {"-"}
    assert set(meta["success_rates"]["cleverhans_pgd"]["impersonation"]) == {"2", "8"}
    for g in meta["groups"]:
        key = "-" if g["eps"] is None else f"{g['eps']:g}"
        assert meta["success_rates"][g["attack"]][g["mode"]][key] == g["success_rate"]
    # The attacks work: larger budgets fool the random model more often.
    rates = meta["success_rates"]
    for name in ("pgd", "cleverhans_pgd"):
        assert rates[name]["dodging"]["8"] >= rates[name]["dodging"]["2"]
        assert rates[name]["dodging"]["8"] > 0.5
    assert json.loads((out / "metadata.json").read_text())["count"] == 90

    recs, emb = _check_records_against_model(out, tiny_embedder, meta["threshold"])
    # The limit takes one identity at a time: 5 faces cover all three people.
    assert {r["identity"] for r in recs} == {b"ann", b"bob", b"cid"}
    ref_for = {}
    for r, e in zip(recs, emb):
        sim_check = r["adversarial_similarity"]
        if r["mode"] == b"impersonation":
            assert r["target_label"] == (r["label"] + 1) % 3
            assert r["target_identity"] != r["identity"]
        else:
            assert r["target_label"] == -1 and r["target_identity"] == b""
        # Stored similarity = cosine of the stored image's embedding to one fixed
        # reference per (identity, mode): consistent across attacks.
        key = (r["label"], r["mode"])
        ref_for.setdefault(key, []).append((e, sim_check))
    for pairs in ref_for.values():
        # All images of one (identity, mode) share their reference: solve for it
        # by least squares and check it reproduces every stored similarity.
        e = np.stack([p[0] for p in pairs])
        s = np.array([p[1] for p in pairs])
        ref, *_ = np.linalg.lstsq(e, s, rcond=None)
        np.testing.assert_allclose(e @ ref, s, atol=1e-3)
    cw = [r for r in recs if r["attack"] == b"cw"]
    assert all(r["eps"] == R.NO_EPS and r["norm"] == b"2" for r in cw)
    assert json.loads(cw[0]["attack_config"])["class"] == "EmbeddingCW"
    ch = json.loads(next(r for r in recs if r["attack"] == b"cleverhans_pgd")["attack_config"])
    assert ch["library"] == "cleverhans" and ch["function"] == "projected_gradient_descent"


def test_generate_png_measures_the_rounded_image(tiny_embedder, faces_dir, tmp_path):
    meta = G.generate(tiny_embedder, faces_dir, tmp_path / "adv", attacks=("pgd",),
                      eps_list=(3,), modes=("dodging",), steps=3, limit=4, detector="none",
                      image_format="png", threshold=0.9)
    recs, emb = _check_records_against_model(tmp_path / "adv", tiny_embedder, 0.9, "png")
    for r in recs:
        np.testing.assert_array_equal(r["image"], np.rint(r["image"]))
    assert meta["image_format"] == "png" and meta["threshold_source"] == "argument"


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("mode", ["dodging", "impersonation"])
def test_cleverhans_pgd_matches_ours(tiny_embedder, mode, norm):
    """The independent implementation takes the same steps (no random start)."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.uniform(0, 255, (6, SIZE, SIZE, 3)).astype(np.float32))
    ref = tiny_embedder(tf.constant(rng.uniform(0, 255, (6, SIZE, SIZE, 3)), tf.float32))
    eps = 4.0 if norm == "inf" else 300.0
    kwargs = dict(threshold=0.5, steps=8, norm=norm, random_start=False)
    ours, _ = G.make_attack("pgd", mode, eps, **kwargs)
    theirs, _ = G.make_attack("cleverhans_pgd", mode, eps, **kwargs)
    a, b = ours(tiny_embedder, x, ref).numpy(), theirs(tiny_embedder, x, ref).numpy()
    delta = (a - x.numpy()).reshape(len(a), -1)
    size = np.abs(delta).max(1) if norm == "inf" else np.linalg.norm(delta, axis=1)
    assert size.max() > 0.5 * G.default_step_size(eps, norm)  # it moved
    np.testing.assert_allclose(a, b, atol=1e-3)  # Linf: identical; L2: ~6e-5
    fgsm_ours, _ = G.make_attack("fgsm", mode, eps, **kwargs)
    fgsm_theirs, _ = G.make_attack("cleverhans_fgsm", mode, eps, **kwargs)
    np.testing.assert_allclose(fgsm_ours(tiny_embedder, x, ref).numpy(),
                               fgsm_theirs(tiny_embedder, x, ref).numpy(), atol=2e-3)


def _images_by_key(out, attack):
    return {(int(r["source_index"]), r["mode"], float(r["eps"])): r["image"]
            for r in R.read_records(out).as_numpy_iterator() if r["attack"] == attack}


def test_generate_pipeline_agrees_with_cleverhans(tiny_embedder, faces_dir, tmp_path):
    """Through generate() (our attacks compiled, one trace for all budgets), our
    PGD/FGSM records equal cleverhans' records with the same settings."""
    kwargs = dict(eps_list=(2, 8), steps=4, random_start=False, limit=4, detector="none",
                  threshold=0.9)
    G.generate(tiny_embedder, faces_dir, tmp_path / "a", **kwargs,
               attacks=("pgd", "cleverhans_pgd", "fgsm", "cleverhans_fgsm"))
    G.generate(tiny_embedder, faces_dir, tmp_path / "b", **kwargs, attacks=("pgd",),
               compiled=False)
    for ours, theirs in (("pgd", "cleverhans_pgd"), ("fgsm", "cleverhans_fgsm")):
        a, b = _images_by_key(tmp_path / "a", ours.encode()), _images_by_key(
            tmp_path / "a", theirs.encode())
        assert len(a) == 4 * 2 * 2 and a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-3, err_msg=str((ours, key)))
    eager = _images_by_key(tmp_path / "b", b"pgd")
    for key, img in _images_by_key(tmp_path / "a", b"pgd").items():
        np.testing.assert_allclose(img, eager[key], atol=1e-3)


def test_generate_validation(tiny_embedder, faces_dir, tmp_path):
    kwargs = dict(detector="none", steps=1, limit=1)
    with pytest.raises(ValueError, match="attacks"):
        G.generate(tiny_embedder, faces_dir, tmp_path / "a", attacks=("bim",), **kwargs)
    with pytest.raises(ValueError, match="modes"):
        G.generate(tiny_embedder, faces_dir, tmp_path / "a", modes=("evade",), **kwargs)
    with pytest.raises(ValueError, match="eps"):
        G.generate(tiny_embedder, faces_dir, tmp_path / "a", eps_list=(-1,), **kwargs)
    with pytest.raises(ValueError, match="step_size <= eps"):
        G.generate(tiny_embedder, faces_dir, tmp_path / "a", attacks=("cleverhans_pgd",),
                   eps_list=(1,), step_size=2.0, **kwargs)
    with pytest.raises(FileNotFoundError):
        G.generate(tiny_embedder, tmp_path / "missing", tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="preset"):
        G.generate("no-such-model", faces_dir, tmp_path / "a", **kwargs)
    one = tmp_path / "one"
    (one / "solo").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(one / "solo" / "0.png")
    with pytest.raises(ValueError, match="two identities"):
        G.generate(tiny_embedder, one, tmp_path / "a", modes=("impersonation",),
                   threshold=0.5, **kwargs)
    assert not (tmp_path / "a").exists() or R.shard_files(tmp_path / "a") == []


def test_generate_from_config_uses_threshold_json(tiny_embedder, faces_dir, tmp_path):
    from tfadv.config.faces import GenerateConfig
    from tfadv.evaluation.verification import save_threshold

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_embedder.save(model_dir / "embedder.keras")
    save_threshold(model_dir, 0.77)
    out = tmp_path / "adv"
    cfg = GenerateConfig(out=str(out), faces=str(faces_dir), attacks=("pgd", "cleverhans_fgsm"),
                         eps=(2.0, 4.0), modes=("dodging",), limit=3, steps=2, detector="none",
                         progress=False)
    summary = G.generate_from_config(str(model_dir), cfg)
    meta = R.load_metadata(out)
    assert meta == summary
    assert meta["count"] == 2 * 2 * 3 and meta["threshold"] == pytest.approx(0.77)
    assert meta["threshold_source"].endswith("threshold.json")
    assert meta["model"]["source"] == "file"
    assert meta["settings"]["steps"] == 2 and meta["eps_list"] == [2.0, 4.0]
    lines = G.summary_lines(summary, out)
    assert str(out) in lines[0] and "0.770" in lines[0]
    assert len(lines) == 1 + len(meta["groups"]) and any("pgd" in line for line in lines[1:])
    # A second run into the same directory is refused unless the config says overwrite.
    with pytest.raises(FileExistsError, match="overwrite"):
        G.generate_from_config(str(model_dir), cfg)
    with pytest.raises(FileNotFoundError):
        G.generate_from_config(str(model_dir), dataclasses.replace(
            cfg, faces=str(tmp_path / "nope"), out=str(tmp_path / "x")))
    assert math.isclose(meta["success_rates"]["pgd"]["dodging"]["4"],
                        next(g["success_rate"] for g in meta["groups"]
                             if g["attack"] == "pgd" and g["eps"] == 4.0))


def test_norm_spellings_are_stored_under_the_standard_name():
    import math as _math

    from tfadv.data.adversarial_records import AdversarialExample

    img = np.zeros((2, 2, 3), np.uint8)
    assert AdversarialExample(image=img, label=0, norm="Linf").norm == "inf"
    assert AdversarialExample(image=img, label=0, norm=_math.inf).norm == "inf"
    assert AdversarialExample(image=img, label=0, norm="L2").norm == "2"
    with pytest.raises(ValueError, match="norm"):
        AdversarialExample(image=img, label=0, norm="l1")
