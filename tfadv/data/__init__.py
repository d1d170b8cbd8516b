"""Datasets as tf.data pipelines."""

from tfadv.data.mnist import (SOURCES, load_mnist, load_train_test, mnist_datasets, subset,
                              to_dataset)
from tfadv.data import faces, pairs
from tfadv.data.faces import (
    BadImageError,
    Face,
    FaceDetector,
    FaceSet,
    NoFaceError,
    crop_face,
    embed_files,
    load_face,
    load_face_folder,
    load_lfw_tfds,
    read_image,
)
from tfadv.data.pairs import LfwPairs, cross_pairs, make_pairs, read_lfw_pairs

__all__ = ["SOURCES", "load_mnist", "load_train_test", "mnist_datasets", "subset",
           "to_dataset"]
# Faces and verification pairs (`faces.to_dataset` takes a FaceSet: see FaceSet.to_dataset).
__all__ += [
    "BadImageError",
    "Face",
    "FaceDetector",
    "FaceSet",
    "LfwPairs",
    "NoFaceError",
    "crop_face",
    "cross_pairs",
    "faces",
    "embed_files",
    "load_face",
    "load_face_folder",
    "load_lfw_tfds",
    "make_pairs",
    "pairs",
    "read_image",
    "read_lfw_pairs",
]
