"""Detecting poisoned training examples from a model's features.

- Spectral signatures (Tran, Li & Madry, "Spectral Signatures in Backdoor
  Attacks", NeurIPS 2018): within a class, the poisoned examples' features
  differ from the clean ones along one direction, which then dominates the
  class's centred feature matrix; each example's score is its squared
  projection on the top singular vector.
- Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep
  Neural Networks by Activation Clustering", 2018): within a class, the
  features reduced to 10 dimensions split into two clusters; poison forms
  the smaller one.

Both papers remove a fixed share of every class (Tran et al. the top 1.5
epsilon of the scores, ART's default). A clean class then loses examples
too, so here a class is flagged only when its split is real: the smaller
group holds at most `max_fraction` of the class and is well separated
(spectral: the 1-D projections fit two Gaussian components better than one
by `min_bic_gain` per example, scikit-learn's GaussianMixture; clustering:
k-means' silhouette is at least `min_silhouette`). Scores are comparable
across classes (higher = more suspect); `flags` are the smaller groups of
the flagged classes.

Both assume the poison is a minority of its target class (Chen et al.'s 35%):
a dirty-label rate of 1 / classes makes it half of the class, and then
neither split says which half is poison (on MNIST's 10 classes at a 10% patch
rate neither flagged it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DetectionResult", "activation_clustering", "spectral_signature"]


@dataclass
class DetectionResult:
    """Per-example suspicion from a poisoning defence.

    Attributes:
        scores: float [N], higher = more suspect (comparable across classes).
        flags: bool [N], the examples judged poisoned.
        method: the defence's name.
        per_class: {label: {"size", "flagged", "suspect"}} (suspect: the class
            held a separated minority group).
    """

    scores: np.ndarray
    flags: np.ndarray
    method: str
    per_class: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready counts: examples, flagged, and the classes with a suspect group."""
        return {"method": self.method, "examples": int(len(self.flags)),
                "flagged": int(self.flags.sum()),
                "suspect_classes": [c for c, v in self.per_class.items() if v["suspect"]],
                "per_class": self.per_class}


def _check(features, labels):
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"Expected features [N, D] and labels [N]. Received {features.shape} "
                         f"and {labels.shape}.")
    if not np.isfinite(features).all():
        raise ValueError("The features hold NaN or inf (check the inputs and the model).")
    return features, labels


def _classes(labels):
    """(class, its row indices) for every class with at least 4 examples (a split of
    fewer says nothing)."""
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 4:
            yield int(c), idx


def _finish(scores, flags, method, labels, suspect):
    per_class = {int(c): {"size": int(np.sum(labels == c)),
                          "flagged": int(np.sum(flags[labels == c])),
                          "suspect": bool(suspect.get(c, False))}
                 for c in np.unique(labels)}
    return DetectionResult(scores, flags, method, per_class)


MIN_CLASS_SIZE = 20


def spectral_signature(features, labels, *, max_fraction: float = 0.35,
                       min_bic_gain: float = 0.05, min_class_size: int = MIN_CLASS_SIZE,
                       seed: int = 0) -> DetectionResult:
    """Spectral-signature scores and flags (Tran et al. 2018).

    Args:
        features: float [N, D] (a layer's activations or embeddings).
        labels: int [N] training labels (as given, poisoned or not).
        max_fraction: largest share of a class a poisoned group may hold.
        min_bic_gain: how much better (BIC per example) two Gaussian
            components must fit the class's projections than one.
        min_class_size: smaller classes are scored but never flagged (a
            mixture fitted to a handful of points splits them by chance:
            4 noise vectors were "split" in 16 of 20 classes).
        seed: GaussianMixture's seed.

    Returns:
        A `DetectionResult`: scores are the squared projections on the class's
        top singular vector over their class median.

    Raises:
        ValueError: features not [N, D] or labels not [N].
    """
    from sklearn.mixture import GaussianMixture

    features, labels = _check(features, labels)
    scores, flags, suspect = np.zeros(len(labels)), np.zeros(len(labels), bool), {}
    for c, idx in _classes(labels):
        centred = features[idx] - features[idx].mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[0]
        scores[idx] = proj ** 2 / max(np.median(proj ** 2), 1e-12)
        column = proj[:, None]
        one = GaussianMixture(1, random_state=seed).fit(column)
        two = GaussianMixture(2, n_init=3, random_state=seed).fit(column)
        gain = (one.bic(column) - two.bic(column)) / len(idx)
        member = two.predict(column)
        small = int(np.argmin(np.bincount(member, minlength=2)))
        share = np.mean(member == small)
        if gain >= min_bic_gain and share <= max_fraction and len(idx) >= min_class_size:
            suspect[c] = True
            flags[idx[member == small]] = True
    return _finish(scores, flags, "spectral", labels, suspect)


def activation_clustering(features, labels, *, dims: int = 10, max_fraction: float = 0.35,
                          min_silhouette: float = 0.25, min_class_size: int = MIN_CLASS_SIZE,
                          seed: int = 0) -> DetectionResult:
    """Activation-clustering scores and flags (Chen et al. 2018).

    Per class: PCA to `dims` dimensions, k-means with two clusters; the class
    is suspect when the smaller cluster holds at most `max_fraction` of it and
    the split's silhouette is at least `min_silhouette` (scikit-learn), and
    it has at least `min_class_size` examples.

    Returns:
        A `DetectionResult`: an example's score is its margin towards the
        smaller cluster, `(d_large - d_small) / max(d_large, d_small)` in
        [-1, 1], times its class's silhouette.

    Raises:
        ValueError: features not [N, D] or labels not [N].
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    features, labels = _check(features, labels)
    scores, flags, suspect = np.zeros(len(labels)), np.zeros(len(labels), bool), {}
    for c, idx in _classes(labels):
        reduced = PCA(min(dims, len(idx) - 1, features.shape[1]),
                      random_state=seed).fit_transform(features[idx])
        km = KMeans(2, n_init=10, random_state=seed).fit(reduced)
        if len(np.unique(km.labels_)) < 2:
            continue
        small = int(np.argmin(np.bincount(km.labels_, minlength=2)))
        share = np.mean(km.labels_ == small)
        quality = float(silhouette_score(reduced, km.labels_, random_state=seed))
        dist = np.linalg.norm(reduced[:, None, :] - km.cluster_centers_[None], axis=-1)
        margin = (dist[:, 1 - small] - dist[:, small]) / np.maximum(dist.max(1), 1e-12)
        scores[idx] = margin * max(quality, 0.0)
        if share <= max_fraction and quality >= min_silhouette and len(idx) >= min_class_size:
            suspect[c] = True
            flags[idx[km.labels_ == small]] = True
    return _finish(scores, flags, "activation_clustering", labels, suspect)
