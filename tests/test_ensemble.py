"""tfadv.models.ensemble: the averaged outputs (NumPy), saving in safe mode, bad members."""

import keras
import numpy as np
import pytest

from tests.conftest import tiny_cnn
from tfadv.models import ensemble

RNG = np.random.default_rng(0)
X = RNG.uniform(0, 1, (5, 12, 12, 1)).astype("float32")


def members(n=3):
    out = []
    for i in range(n):
        keras.utils.set_random_seed(i)
        m = tiny_cnn()
        m.name = f"m{i}"
        out.append(m)
    return out


def embedder(seed, name):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 12, 1))
    h = keras.layers.Dense(4)(keras.layers.Flatten()(x))
    return keras.Model(x, keras.layers.UnitNormalization()(h), name=name)


def test_mean_logits_is_the_mean_of_the_members():
    ms = members()
    want = np.mean([m.predict(X, verbose=0) for m in ms], axis=0)
    np.testing.assert_allclose(ensemble(ms).predict(X, verbose=0), want, rtol=1e-5, atol=1e-6)


def test_mean_embedding_is_the_normalised_mean():
    ms = [embedder(1, "a"), embedder(2, "b")]
    mean = np.mean([m.predict(X, verbose=0) for m in ms], axis=0)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    got = ensemble(ms, combine="mean_embedding").predict(X, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_saves_and_loads_in_safe_mode(tmp_path):
    model = ensemble(members(2))
    path = str(tmp_path / "ensemble.keras")
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(again.predict(X, verbose=0), model.predict(X, verbose=0),
                               rtol=1e-6)


def test_members_with_one_name_are_copied_not_renamed():
    a, b = tiny_cnn(), tiny_cnn()
    a.name = b.name = "same"
    want = (a.predict(X, verbose=0) + b.predict(X, verbose=0)) / 2
    np.testing.assert_allclose(ensemble([a, b]).predict(X, verbose=0), want, rtol=1e-5,
                               atol=1e-6)
    assert a.name == b.name == "same"


def test_identical_members_are_warned_about(tmp_path):
    import warnings

    a, b = members(2)
    with pytest.warns(UserWarning, match="members 0 and 2 have identical weights"):
        ensemble([a, b, a])
    path = str(tmp_path / "a.keras")
    a.save(path)
    twice = [keras.saving.load_model(path), keras.saving.load_model(path)]
    with pytest.warns(UserWarning, match="the same model or file given twice"):
        ensemble(twice)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensemble([a, b])


@pytest.mark.parametrize("models, kwargs, match", [
    (lambda: members(1), {}, "at least two"),
    (lambda: members(2), {"combine": "vote"}, "combine"),
    (lambda: [tiny_cnn(), tiny_cnn(num_classes=3)], {},
     r"one output shape.*model 0 .* -> output \(4,\); model 1 .* -> output \(3,\)"),
    (lambda: [tiny_cnn(), tiny_cnn(input_shape=(10, 10, 1))], {},
     r"one input shape.*model 0 .*input \(12, 12, 1\).*model 1 .*input \(10, 10, 1\)"),
    (lambda: [tiny_cnn(), lambda x: x], {}, "Keras models"),
])
def test_bad_members(models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ensemble(models(), **kwargs)


def test_cli_ensemble_writes_a_model_that_loads(tmp_path):
    import subprocess
    import sys

    paths = []
    for i, m in enumerate(members(2)):
        paths.append(str(tmp_path / f"m{i}.keras"))
        m.save(paths[-1])
    out = tmp_path / "sub" / "ens.keras"
    run = subprocess.run([sys.executable, "-m", "tfadv.cli", "ensemble", *paths, "--out",
                          str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mean_logits of 2 models" in run.stdout
    before = out.read_bytes()
    again = subprocess.run([sys.executable, "-m", "tfadv.cli", "ensemble", *paths, "--out",
                            str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert out.read_bytes() == before  # the existing ensemble is kept
    loaded = keras.saving.load_model(out, safe_mode=True)
    want = np.mean([keras.saving.load_model(p).predict(X, verbose=0) for p in paths], axis=0)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), want, rtol=1e-5, atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "tfadv.cli", "ensemble", paths[0],
                          str(tmp_path / "missing.keras"), "--out", str(tmp_path / "e.keras")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "No model at" in bad.stderr
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    wrong = subprocess.run([sys.executable, "-m", "tfadv.cli", "ensemble", paths[0], str(text),
                            "--out", str(tmp_path / "e.keras")],
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "is not a Keras model file" in wrong.stderr
    assert "File not found" not in wrong.stderr and "Traceback" not in wrong.stderr
