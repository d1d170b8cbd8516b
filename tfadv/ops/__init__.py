"""Pure TensorFlow operations shared by attacks and trainers."""

from tfadv.ops.classwise import class_sums
from tfadv.ops.labels import sparse_labels, sparse_labels_np
from tfadv.ops.norms import (
    NORMS,
    canonical_norm,
    clip_to_bounds,
    lp_norm,
    normalize_gradient,
    project,
    random_start,
)

__all__ = [
    "NORMS",
    "canonical_norm",
    "class_sums",
    "clip_to_bounds",
    "lp_norm",
    "normalize_gradient",
    "project",
    "random_start",
    "sparse_labels",
    "sparse_labels_np",
]
