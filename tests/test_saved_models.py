"""`tfadv.models.saved.load_saved`: a user's model file, or an error naming the file and cause."""

import zipfile

import keras
import numpy as np
import pytest

from tfadv.models.facenet import load_embedder
from tfadv.models.saved import load_saved


def test_loads_a_keras_file(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.ones((1, 3), "float32")
    np.testing.assert_allclose(load_saved(path).predict(x, verbose=0), model.predict(x, verbose=0))


def test_missing_file_and_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No model at .*missing.keras.*\. Train one"):
        load_saved(tmp_path / "missing.keras", hint="Train one.")
    with pytest.raises(FileNotFoundError, match="No model at.*tfadv facenet finetune"):
        load_embedder(tmp_path / "missing.keras")


def test_a_folder_is_named_with_the_models_in_it(tmp_path):
    """A run folder given for its model: the error points at the .keras file inside."""
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(tmp_path / "model.keras")
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a \.keras.*model\.keras"):
        load_saved(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder.*holds no .keras file"):
        load_saved(empty)


def test_a_file_that_is_not_a_model_says_so(tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not a Keras model file"):
        load_saved(text)
    archive = tmp_path / "other.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "a zip, but no model in it")
    with pytest.raises(ValueError, match="could not be loaded as a Keras model"):
        load_saved(archive)
