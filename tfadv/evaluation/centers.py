"""Class centres from features, inverse adversaries and classifier weights, and their comparison.

The question behind it: can inverse adversaries (Dong et al., CVPR 2023) stand
in for the learned centres of center loss (Wen et al., ECCV 2016)? The kinds of
per-class vectors compared are:

- inverse-adversary centres: mean feature of each class's inverse adversaries
  (`extract_centers(..., attack=InversePGD())`), or of its universal
  class-wise inverse perturbation (UIAT: `universal_inverse_perturbations`);
- clean centres: mean feature of each class's clean images;
- center-loss centres: the `ClassCenters` variables of a center-loss model;
- classifier weights: the columns of the last Dense kernel.

`CentersModelResult` and `CentersStudyResult` are the typed results of the
study that compares them (`tfadv.recipes.centers`), read by its report
writer (`tfadv.reports.centers`).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import tensorflow as tf

from tfadv.attacks import objectives
from tfadv.attacks.base import Attack, input_gradient
from tfadv.config.centers import CentersStudyConfig
from tfadv.evaluation.compiled import compiled, in_batches
from tfadv.evaluation.verification import cosine_similarity
from tfadv.models.features import CLASSIFIER_LAYER, FEATURE_LAYER, feature_model
from tfadv.ops import norms
from tfadv.ops.classwise import class_sums
from tfadv.ops.labels import sparse_labels, sparse_labels_np


def _as_dataset(data, batch_size):
    if isinstance(data, tf.data.Dataset):
        return data
    x, y = data
    return tf.data.Dataset.from_tensor_slices((np.asarray(x, np.float32),
                                               sparse_labels_np(y))).batch(batch_size)


def extract_centers(model, data, *, num_classes=10, attack: Attack | None = None,
                    deltas=None, feature_layer=FEATURE_LAYER, batch_size=500):
    """Per-class mean features over a dataset, in one compiled pass.

    Args:
        model: classifier (logits) with a feature layer.
        data: a `tf.data.Dataset` of (x, y) batches, or a pair of arrays.
        attack: if given (e.g. `InversePGD()`), features are taken at
            `attack(model, x, y)`: inverse-adversary centres.
        deltas: alternatively, class-wise perturbations [K, ...] added to each
            image of the class (UIAT centres).
        feature_layer: name of the feature layer.

    Returns:
        (centers [K, D] float32 NumPy, counts [K]); a class with no example has
        a zero centre and count 0.
    """
    ds = _as_dataset(data, batch_size)
    run = _extraction_fn(model, feature_layer, int(num_classes), attack, deltas is not None)
    delta_t = (tf.zeros([0]) if deltas is None
               else tf.constant(np.asarray(deltas, np.float32)))
    centers, counts = run(ds, delta_t)
    return centers.numpy(), counts.numpy().astype(np.int64)


def _extraction_fn(model, feature_layer, num_classes, attack, with_deltas):
    """One compiled extraction pass per (model, feature layer, classes, attack, deltas).

    Repeated extractions (every epoch, every bench repeat, a new but equal
    attack object) reuse one trace; the cache holds the model weakly.
    """
    def make(model_ref):
        feats = feature_model(model_ref(), feature_layer)
        dim = int(feats.outputs[0].shape[-1])

        @tf.function
        def run(ds, delta_t):
            sums = tf.zeros([num_classes, dim], tf.float32)
            counts = tf.zeros([num_classes], tf.float32)
            for xb, yb in ds:
                xb = tf.cast(xb, tf.float32)
                yb = sparse_labels(yb, num_classes)
                if attack is not None:
                    xb = attack(model_ref(), xb, yb)
                if with_deltas:
                    xb = tf.clip_by_value(xb + tf.gather(delta_t, tf.cast(yb, tf.int32)),
                                          0.0, 1.0)
                f = tf.cast(feats(xb, training=False), tf.float32)
                batch_sums, batch_counts = class_sums(f, yb, num_classes)
                sums += batch_sums
                counts += batch_counts
            return sums / tf.maximum(counts, 1.0)[:, None], counts

        return run

    return compiled(model, ("extract_centers", feature_layer, num_classes, attack, with_deltas),
                    make)


def universal_inverse_perturbations(model, data, *, num_classes=10, eps=4 / 255,
                                    step_size=2 / 255, epochs=5, norm="inf", bounds=(0.0, 1.0),
                                    batch_size=500):
    """UIAT's class-wise universal inverse perturbations (Dong et al., 2023).

    One perturbation per class, shared by all its images, descending the
    class's summed loss: each epoch, for every batch,
    `delta_k <- Proj_eps(delta_k - step * dir(sum_{i: y_i = k} grad L(x_i + delta_k, k)))`.

    Returns:
        deltas [K, H, W, C] float32 NumPy.
    """
    ds = _as_dataset(data, batch_size)
    shape = tuple(int(d) for d in ds.element_spec[0].shape[1:])
    deltas = tf.Variable(tf.zeros((num_classes,) + shape, tf.float32), trainable=False)
    obj = objectives.cross_entropy

    @tf.function
    def epoch(ds):
        for xb, yb in ds:
            yb = sparse_labels(yb, num_classes)
            labels = tf.cast(yb, tf.int32)
            xb = tf.cast(xb, tf.float32)
            x_in = norms.clip_to_bounds(xb + tf.gather(deltas, labels), bounds)
            _, _, grad = input_gradient(model, x_in, yb, obj)
            class_grad = tf.math.unsorted_segment_sum(grad, labels, num_classes)
            step = norms.normalize_gradient(class_grad, norm)
            deltas.assign(norms.project(deltas - step_size * step, eps, norm))

    for _ in range(int(epochs)):
        epoch(ds)
    return deltas.numpy()


def classifier_weights(model, layer=CLASSIFIER_LAYER):
    """Rows = classes: the transposed kernel [K, D] of the final Dense layer."""
    return np.asarray(model.get_layer(layer).kernel).T


def features_of(model, x, feature_layer=FEATURE_LAYER, batch_size=500):
    feats = feature_model(model, feature_layer)
    return in_batches(lambda xb: feats(xb, training=False), x, batch_size)


# -- comparisons ---------------------------------------------------------------


def _pair(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"Expected two [K, D] arrays of one shape. Received {a.shape}, {b.shape}.")
    return a, b


def cosine_per_class(a, b):
    """cos(a_k, b_k) for every class k ([K]); 0 where a vector is zero."""
    a, b = _pair(a, b)
    return cosine_similarity(a, b)


def mse_per_class(a, b):
    """mean_d (a_kd - b_kd)^2 for every class k ([K])."""
    a, b = _pair(a, b)
    return np.mean((a - b) ** 2, axis=1)


def cosine_matrix(a, b):
    """cos(a_i, b_j) for all class pairs ([K, K]): `cosine_per_class` of every pairing."""
    a, b = _pair(a, b)
    k = len(a)
    return cosine_similarity(np.repeat(a, k, axis=0), np.tile(b, (k, 1))).reshape(k, k)


def intra_class_variance(features, labels, centers):
    """Mean squared distance of each feature to its own class centre."""
    features = np.asarray(features, np.float64)
    centers = np.asarray(centers, np.float64)
    return float(np.mean(np.sum((features - centers[np.asarray(labels)]) ** 2, axis=1)))


def inter_class_separation(centers):
    """Pairwise Euclidean distances between centres: {"mean": ..., "min": ...}."""
    c = np.asarray(centers, np.float64)
    d = [np.linalg.norm(c[i] - c[j]) for i, j in itertools.combinations(range(len(c)), 2)]
    return {"mean": float(np.mean(d)), "min": float(np.min(d))}


def compare_centers(kinds: dict) -> dict:
    """All pairwise comparisons of centre kinds.

    Args:
        kinds: {name: [K, D] array}.

    Returns:
        {"a vs b": {"cosine": [K], "mse": [K], "cosine_mean", "cosine_std",
        "mse_mean", "mse_std"}} for every pair of names.
    """
    out = {}
    for (na, a), (nb, b) in itertools.combinations(kinds.items(), 2):
        cos, mse = cosine_per_class(a, b), mse_per_class(a, b)
        out[f"{na} vs {nb}"] = {
            "cosine": cos.tolist(), "mse": mse.tolist(),
            "cosine_mean": float(cos.mean()), "cosine_std": float(cos.std()),
            "mse_mean": float(mse.mean()), "mse_std": float(mse.std()),
        }
    return out


# -- the centres study's results ---------------------------------------------------


@dataclasses.dataclass
class CentersModelResult:
    """Everything measured on one model of the centres study (`tfadv.recipes.centers`).

    Attributes:
        clean_accuracy: on the analysed test digits.
        robust_accuracy: correct under every robust-accuracy attack.
        robust_after: attack name -> accuracy still standing after it and
            every earlier attack (cascade order; the last is `robust_accuracy`).
        intra_class_variance: mean squared distance of a test feature to its
            class's clean test centre.
        inter_class_separation: {"mean", "min"} distance between those centres.
        variance_to_separation: intra-class variance / mean separation^2
            (scale-free compactness: center loss shrinks features, softmax
            grows them).
        comparisons: `compare_centers` of the centre kinds.
        centers: kind -> [K, D] array (training digits).
        train_seconds: training time over all epochs (also of a killed run).
        history: per-epoch training logs.
        autoattack: AutoAttack (standard) on the analysed test digits:
            `{"robust_accuracy", "per_attack", "seconds", "flags", "n", "eps"}`,
            or None when it was not run.
    """

    clean_accuracy: float
    robust_accuracy: float
    robust_after: dict
    intra_class_variance: float
    inter_class_separation: dict
    variance_to_separation: float
    comparisons: dict
    centers: dict
    train_seconds: float = 0.0
    history: dict = dataclasses.field(default_factory=dict)
    autoattack: dict | None = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["centers"] = {k: np.asarray(v).tolist() for k, v in self.centers.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CentersModelResult":
        d = dict(d)
        d["centers"] = {k: np.asarray(v, np.float32) for k, v in d["centers"].items()}
        return cls(**d)


@dataclasses.dataclass
class CentersStudyResult:
    """The centres study's results: what `results.json` holds, `tfadv.reports.centers` draws.

    Attributes:
        config: the study's settings.
        examples: {"train": digits trained on, "test": digits analysed}.
        models: model name -> `CentersModelResult`, in `config.models` order.
        figures: figure name -> PNG path.
        seconds: wall time of the run that wrote the results.
        features: model name -> test features [N, D] (figures only; not in
            `to_dict`).
        labels: the test labels [N] (figures only; not in `to_dict`).
    """

    config: CentersStudyConfig
    examples: dict
    models: dict
    figures: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    features: dict = dataclasses.field(default_factory=dict, repr=False)
    labels: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "examples": dict(self.examples),
                "models": {m: r.to_dict() for m, r in self.models.items()},
                "figures": dict(self.figures), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "CentersStudyResult":
        """The results of a `results.json` (without the features and labels)."""
        config = dict(d["config"], models=tuple(d["config"]["models"]))
        return cls(config=CentersStudyConfig(**config), examples=dict(d["examples"]),
                   models={m: CentersModelResult.from_dict(r) for m, r in d["models"].items()},
                   figures=dict(d.get("figures", {})), seconds=float(d.get("seconds", 0.0)))
