import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def tiny_cnn(input_shape=(12, 12, 1), num_classes=4):
    """A small, fast classifier used across tests."""
    inputs = keras.Input(shape=input_shape)
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    out = keras.layers.Dense(num_classes, dtype="float32")(h)
    return keras.Model(inputs, out)


def finite_difference_grads(params, fn, step=1e-6):
    """Central-difference gradients of `fn(list of float64 arrays) -> float` at `params`."""
    grads = []
    for i, p in enumerate(params):
        g = np.zeros(p.shape)
        for idx in np.ndindex(p.shape):
            plus = [q.astype(np.float64).copy() for q in params]
            minus = [q.astype(np.float64).copy() for q in params]
            plus[i][idx] += step
            minus[i][idx] -= step
            g[idx] = (fn(plus) - fn(minus)) / (2 * step)
        grads.append(g)
    return grads


def tiny_feature_net():
    """A 6x6 classifier with a 3-D layer named "features" (center loss tests)."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(8, activation="tanh")(h)
    f = keras.layers.Dense(3, activation="tanh", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="classifier")(f))


@pytest.fixture
def tiny_model():
    return tiny_cnn()


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.05, 0.95, size=(16, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 4, size=16).astype("int64")
    return x, y


@pytest.fixture(scope="session")
def mnist_small():
    """A class-balanced 600/200 slice of the embedded MNIST split."""
    from tfadv.data import load_mnist, subset

    x_tr, y_tr = subset(*load_mnist("embedded", "train"), 600)
    x_te, y_te = subset(*load_mnist("embedded", "test"), 200)
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="session")
def trained_mnist_model(mnist_small):
    """A small CNN trained cleanly for a few epochs on 600 MNIST digits."""
    keras.utils.set_random_seed(1)
    x_tr, y_tr, _, _ = mnist_small
    inputs = keras.Input(shape=(28, 28, 1))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    out = keras.layers.Dense(10)(h)
    model = keras.Model(inputs, out)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_tr, y_tr, epochs=8, batch_size=32, verbose=0)
    return model


def tiny_embedder(size=16, dim=6, *, activation="relu", strides=1, seed=3, input_name=None,
                  name=None):
    """A small embedding model: raw pixels in [0, 255] -> L2-normalised [N, dim]."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name=input_name)
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    h = keras.layers.Conv2D(8, 3, strides=strides, activation=activation, name="conv")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(dim)(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h), name=name)


def rest_json(server, path, payload=None, method=None):
    """(HTTP status, JSON body or None) of one REST request to a running `ModelServer`.

    `payload`: a JSON-able value, raw bytes, or None (a GET, unless `method` says
    otherwise; a POST without a payload sends an empty body).
    """
    import json
    import urllib.error
    import urllib.request

    data = payload if isinstance(payload, bytes) or payload is None else (
        json.dumps(payload).encode())
    if method == "POST" and data is None:
        data = b""
    request = urllib.request.Request(server.rest_url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None
