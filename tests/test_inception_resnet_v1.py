"""The Lambda-free InceptionResNetV1 port: same network as keras-facenet's, safe-mode loadable."""

import keras
import numpy as np
import pytest

from tfadv.models.inception_resnet_v1 import inception_resnet_v1_backbone


@pytest.fixture(scope="module")
def backbone():
    keras.utils.set_random_seed(0)
    return inception_resnet_v1_backbone()


def test_matches_keras_facenet_builder_with_the_same_weights(backbone):
    pytest.importorskip("cv2")  # keras_facenet imports it
    from keras_facenet.inception_resnet_v1 import InceptionResNetV1

    ref = InceptionResNetV1(classes=128)
    assert [w.shape for w in ref.get_weights()] == [w.shape for w in backbone.get_weights()]
    # Same weights in the same order: the port and the reference compute the same function.
    rng = np.random.default_rng(1)
    weights = [rng.normal(0, 0.05, w.shape).astype("float32") if w.ndim > 1 else w
               for w in backbone.get_weights()]
    backbone.set_weights(weights)
    ref.set_weights(weights)
    x = rng.uniform(-1, 1, (2, 160, 160, 3)).astype("float32")
    ours, theirs = backbone.predict(x, verbose=0), ref.predict(x, verbose=0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_no_lambda_and_safe_mode_round_trip(backbone, tmp_path):
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in backbone.layers)
    path = str(tmp_path / "irv1.keras")
    backbone.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 160, 160, 3)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), backbone.predict(x, verbose=0),
                               atol=1e-6)
