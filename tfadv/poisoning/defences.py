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
epsilon of the scores, ART's default), so a clean class loses examples too.
Here each class is split in two (spectral: a two-component Gaussian mixture
of the projections; clustering: k-means) and a group is flagged when:

- another class claims it (the question of Chen et al.'s exclusionary
  reclassification, answered without retraining): more than `min_claimed` of
  its members are nearer, in cosine, to another class's centre than to their
  own label's, a centre being the coordinate-wise median of a class's unit
  features (robust while the poison is a minority of its target class). A
  dirty-label poison is other classes' content carrying a trigger; a clean
  sub-mode (slanted ones) stays nearest its own class. Of a claimed group,
  the members nearer another class than to the rest of their own class are
  flagged (clean examples the split put with the poison stay). Measured on
  MNIST backdoored at 5% and 10% (the poison then 33% and 50% of its target
  class; studies/poisoning.py); or
- it is a separated minority (its class's smaller group holds at most
  `max_fraction` of a class of `min_class_size` or more, and the split is
  real: spectral: two Gaussian components fit better than one by
  `min_bic_gain` per example; clustering: k-means' silhouette is at least
  `min_silhouette`): poison whose content no class claims (an attacker who is
  not enrolled). In few dimensions (D <= 16) two clean Gaussian classes are
  "split" this way often enough to flag clean examples; a network's
  features have hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DetectionResult", "activation_clustering", "class_claims", "spectral_signature"]


@dataclass
class DetectionResult:
    """Per-example suspicion from a poisoning defence.

    Attributes:
        scores: float [N], higher = more suspect (comparable across classes).
        flags: bool [N], the examples judged poisoned.
        method: the defence's name.
        per_class: {label: {"size", "flagged", "suspect", "reason",
            "claimed_by", "groups"}} (suspect: a group of the class was flagged;
            reason: "claimed by class K" or "separated minority"; claimed_by:
            K or None; groups: the class's two groups,
            [{"size", "claimed" (share nearer another class's centre),
            "flagged" (how many)}]).
        centre_accuracy: the share of examples strictly nearer their own class's
            centre (`class_claims`); below `min_centre_accuracy` the features
            do not separate the classes and no group is flagged as claimed.
        centre_accuracy_needed: the centre accuracy claims need
            (`min_centre_accuracy`); `claims_used` says whether it was met.
        nearest_class: int [N], each example's nearest other class
            (`class_claims`); nearest_cosine: float [N], its cosine to that
            class's centre; claim_margin: float [N], that cosine minus the
            cosine to the example's own class's centre (> 0: claimed).
    """

    scores: np.ndarray
    flags: np.ndarray
    method: str
    per_class: dict = field(default_factory=dict)
    centre_accuracy: float | None = None
    centre_accuracy_needed: float | None = None
    nearest_class: np.ndarray | None = None
    nearest_cosine: np.ndarray | None = None
    claim_margin: np.ndarray | None = None

    @property
    def claims_used(self) -> bool:
        """Whether groups were judged by which class claims them."""
        return (self.centre_accuracy is not None
                and self.centre_accuracy >= self.centre_accuracy_needed)

    def summary(self) -> dict:
        """JSON-ready counts: examples, flagged, and the classes with a suspect group."""
        return {"method": self.method, "examples": int(len(self.flags)),
                "flagged": int(self.flags.sum()),
                "suspect_classes": [c for c, v in self.per_class.items() if v["suspect"]],
                "centre_accuracy": self.centre_accuracy, "per_class": self.per_class}


def _check(features, labels, min_claimed=0.5):
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"Expected features [N, D] and int labels [N] (one-hot: take the "
                         f"argmax). Received {features.shape} and {labels.shape}.")
    if not len(features):
        raise ValueError("Expected examples to judge. Received none.")
    if not np.isfinite(features).all():
        raise ValueError("The features hold NaN or inf (check the inputs and the model).")
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind != "f" or not np.all(labels == np.round(labels)):
            raise ValueError(f"Expected int labels. Received dtype {labels.dtype}.")
        labels = labels.astype(np.int64)
    if not 0.0 <= float(min_claimed) < 1.0:
        raise ValueError(f"Expected 0 <= min_claimed < 1. Received: {min_claimed}")
    return features, labels


# Classes with fewer examples are not split (a split of fewer says nothing).
MIN_SPLIT = 4


def _classes(labels):
    """(class, its row indices) for every class with at least MIN_SPLIT examples."""
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= MIN_SPLIT:
            yield int(c), idx


def _finish(scores, flags, method, labels, judged, prepared):
    per_class = {}
    for c in np.unique(labels):
        reason, groups, claimed_by = judged.get(int(c), (None, [], None))
        per_class[int(c)] = {"size": int(np.sum(labels == c)),
                             "flagged": int(np.sum(flags[labels == c])),
                             "suspect": reason is not None, "reason": reason,
                             "claimed_by": claimed_by, "groups": groups}
    _, nearest, other_cosine, _ = prepared.claims
    return DetectionResult(scores, flags, method, per_class, prepared.accuracy,
                           prepared.needed, nearest, other_cosine, prepared.margin)


MIN_CLASS_SIZE = 20
MIN_CLAIMED = 0.5


def _accuracy_needed(min_centre_accuracy, labels):
    """The centre accuracy below which claims mean nothing: by default halfway from chance
    (1 / classes) to 1. Measured: 0.77-0.81 on the last feature map of backdoored MNIST
    CNNs (needed 0.55), 0.95-1.0 for FaceNet on the demo gallery (0.6); two classes of the
    same standard-normal features: 0.5 (0.75)."""
    if min_centre_accuracy is not None:
        return min_centre_accuracy
    return (1.0 + 1.0 / max(len(np.unique(labels)), 1)) / 2.0


def _centre(unit):
    """The normalised coordinate-wise median of unit feature rows."""
    centre = np.median(unit, axis=0)
    return centre / max(float(np.linalg.norm(centre)), 1e-12)


def _claims(features, labels):
    """(unit features, nearest other class, its cosine, cosine to the own class's centre)."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    classes = np.unique(labels)
    if len(classes) < 2:
        return unit, labels.copy(), np.full(len(labels), -1.0), np.ones(len(labels))
    cosine = unit @ np.stack([_centre(unit[labels == c]) for c in classes]).T
    rows, own = np.arange(len(labels)), np.searchsorted(classes, labels)
    own_cosine = cosine[rows, own]
    cosine[rows, own] = -np.inf
    other = np.argmax(cosine, axis=1)
    return unit, classes[other], cosine[rows, other], own_cosine


def class_claims(features, labels):
    """Which class each example's features are nearest to, among the class centres.

    A class's centre is the coordinate-wise median of its examples' unit
    features (robust to a minority of foreign examples), normalised. Cosine
    needs classes that have a direction: ReLU activations, embeddings. A
    class of features centred on zero has none (its centre is noise), and
    its examples may be "claimed" by another class.

    Args:
        features: float [N, D]; labels: int [N].

    Raises:
        ValueError: features not [N, D], labels not int [N], NaN or inf.

    Returns:
        (nearest, margin): nearest int [N], the label of the nearest other
        class's centre; margin float [N] in [-2, 2], its cosine minus the
        cosine to the example's own class's centre (> 0: another class is
        nearer).
    """
    _, nearest, other_cosine, own_cosine = _claims(*_check(features, labels))
    return nearest, other_cosine - own_cosine


def _judge(idx, member, small, separated, claims, min_claimed, flags, refine=True):
    """Flags the groups of a class (`member` in {0, 1} over its rows `idx`): in a group
    another class claims (`min_claimed` None: claims are not used), the members nearer
    another class's centre than to the centre of the rest of their class (the class
    without the claimed group; `refine` False: all of them); the smaller group `small`
    whole when `separated`.
    Returns (reason or None, [{"size", "claimed", "flagged"}] per group, the claiming
    class or None)."""
    unit, nearest, other_cosine, own_cosine = claims
    reason, groups, claimed_by = None, [], None
    for k in (0, 1):
        rows, rest = idx[member == k], idx[member != k]
        claimed = other_cosine[rows] > own_cosine[rows]
        share = float(claimed.mean()) if len(rows) else 0.0
        hit = np.zeros(len(rows), bool)
        if min_claimed is not None and share > min_claimed:
            hit = (other_cosine[rows] > unit[rows] @ _centre(unit[rest])
                   if refine and len(rest) else np.ones(len(rows), bool))
            votes, counts = np.unique(nearest[rows][claimed], return_counts=True)
            claimed_by = int(votes[np.argmax(counts)])
            reason = f"claimed by class {claimed_by}"
        elif k == small and separated and len(rows):
            hit[:] = True
            reason = reason or "separated minority"
        flags[rows[hit]] = True
        groups.append({"size": int(len(rows)), "claimed": share, "flagged": int(hit.sum())})
    return reason, groups, claimed_by


@dataclass
class _Prepared:
    """What both defences start from: checked inputs and the class claims."""

    features: np.ndarray
    labels: np.ndarray
    claims: tuple  # `_claims`
    margin: np.ndarray  # nearest other cosine - own cosine
    accuracy: float  # centre accuracy
    needed: float  # the centre accuracy claims need
    min_claimed: float | None  # None: the centres do not separate the classes


def _prepare(features, labels, min_claimed, min_centre_accuracy) -> _Prepared:
    features, labels = _check(features, labels, min_claimed)
    claims = _claims(features, labels)
    margin = claims[2] - claims[3]
    accuracy = float(np.mean(margin < 0))
    needed = _accuracy_needed(min_centre_accuracy, labels)
    return _Prepared(features, labels, claims, margin, accuracy, needed,
                     min_claimed if accuracy >= needed else None)


def spectral_signature(features, labels, *, min_claimed: float = MIN_CLAIMED,
                       min_centre_accuracy: float | None = None,
                       max_fraction: float = 0.35, min_bic_gain: float = 0.05,
                       min_class_size: int = MIN_CLASS_SIZE, refine: bool = True,
                       seed: int = 0) -> DetectionResult:
    """Spectral-signature scores and flags (Tran et al. 2018).

    Args:
        features: float [N, D] (a layer's activations or embeddings).
        labels: int [N] training labels (as given, poisoned or not).
        min_claimed: a group is flagged when more than this share of it is
            nearer another class's centre (`class_claims`).
        min_centre_accuracy: claims are used only when at least this share of
            all examples is nearest its own class's centre (None: halfway from
            chance, 1 / classes, to 1).
        max_fraction: largest share of a class a separated minority may hold.
        min_bic_gain: how much better (BIC per example) two Gaussian
            components must fit the class's projections than one.
        min_class_size: smaller classes are never flagged as a separated
            minority (a mixture fitted to a handful of points splits them by
            chance: 4 noise vectors were "split" in 16 of 20 classes).
        refine: of a claimed group, flag only the members nearer another
            class than to the rest of their own class (precision); False: the
            whole group (recall: what to remove before retraining; measured on
            MNIST at 10%: 0 to 1 of 400 poisoned digits left instead of 8 to
            10, which kept a 0.14-0.17 backdoor after retraining).
        seed: GaussianMixture's seed.

    Returns:
        A `DetectionResult`: scores are the squared projections on the class's
        top singular vector over their class median.

    Raises:
        ValueError: features not [N, D] or empty, labels not int [N], NaN or inf,
            min_claimed outside [0, 1).
    """
    from sklearn.mixture import GaussianMixture

    prep = _prepare(features, labels, min_claimed, min_centre_accuracy)
    features, labels = prep.features, prep.labels
    scores, flags, judged = np.zeros(len(labels)), np.zeros(len(labels), bool), {}
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
        separated = (gain >= min_bic_gain and np.mean(member == small) <= max_fraction
                     and len(idx) >= min_class_size)
        judged[c] = _judge(idx, member, small, separated, prep.claims, prep.min_claimed,
                           flags, refine)
    return _finish(scores, flags, "spectral", labels, judged, prep)


def activation_clustering(features, labels, *, dims: int = 10,
                          min_claimed: float = MIN_CLAIMED,
                          min_centre_accuracy: float | None = None,
                          max_fraction: float = 0.35,
                          min_silhouette: float = 0.25, min_class_size: int = MIN_CLASS_SIZE,
                          refine: bool = True, seed: int = 0) -> DetectionResult:
    """Activation-clustering scores and flags (Chen et al. 2018).

    Per class: PCA to `dims` dimensions, k-means with two clusters; a
    cluster is flagged when another class claims more than `min_claimed` of
    it (`class_claims`; used when at least `min_centre_accuracy` of all
    examples are nearest their own class's centre), or when it is the
    smaller cluster, holds at most `max_fraction` of a class of at least
    `min_class_size`, and the split's silhouette is at least
    `min_silhouette` (scikit-learn). `refine`: as `spectral_signature`'s.

    Returns:
        A `DetectionResult`: an example's score is the larger of its claim
        margin (`class_claims`: cosine to the nearest other class's centre
        minus cosine to its own) and its margin towards its class's smaller
        cluster, `(d_large - d_small) / max(d_large, d_small)`, times the
        split's silhouette.

    Raises:
        ValueError: features not [N, D] or empty, labels not int [N], NaN or inf,
            min_claimed outside [0, 1).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    prep = _prepare(features, labels, min_claimed, min_centre_accuracy)
    features, labels = prep.features, prep.labels
    scores, flags, judged = prep.margin.copy(), np.zeros(len(labels), bool), {}
    for c, idx in _classes(labels):
        reduced = PCA(min(dims, len(idx) - 1, features.shape[1]),
                      random_state=seed).fit_transform(features[idx])
        km = KMeans(2, n_init=10, random_state=seed).fit(reduced)
        if len(np.unique(km.labels_)) < 2:
            continue
        small = int(np.argmin(np.bincount(km.labels_, minlength=2)))
        quality = float(silhouette_score(reduced, km.labels_, random_state=seed))
        dist = np.linalg.norm(reduced[:, None, :] - km.cluster_centers_[None], axis=-1)
        towards = (dist[:, 1 - small] - dist[:, small]) / np.maximum(dist.max(1), 1e-12)
        scores[idx] = np.maximum(prep.margin[idx], towards * max(quality, 0.0))
        separated = (np.mean(km.labels_ == small) <= max_fraction and quality >= min_silhouette
                     and len(idx) >= min_class_size)
        judged[c] = _judge(idx, km.labels_, small, separated, prep.claims, prep.min_claimed,
                           flags, refine)
    return _finish(scores, flags, "activation_clustering", labels, judged, prep)
