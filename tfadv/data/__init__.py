"""Datasets as tf.data pipelines."""

from tfadv.data.mnist import SOURCES, load_mnist, mnist_datasets, subset, to_dataset

__all__ = ["SOURCES", "load_mnist", "mnist_datasets", "subset", "to_dataset"]
