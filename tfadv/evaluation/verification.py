"""Face verification metrics: ROC, AUC, TAR@FAR, k-fold accuracy, thresholds.

Conventions used throughout: a pair is accepted as "same person" when its
score is `>= threshold`; scores are similarities (higher = more alike), such
as `cosine_similarity` of two embeddings. FAR (false accept rate) is the
fraction of different-person pairs accepted, TAR (true accept rate) the
fraction of same-person pairs accepted.

All functions take NumPy arrays (or anything `np.asarray` accepts, such as
tensors) and run on the host: the pair counts of a verification protocol are
small. The ROC curve, the AUC and the k-fold split are scikit-learn's.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from sklearn import metrics as _metrics
from sklearn.model_selection import KFold, PredefinedSplit, StratifiedKFold

from tfadv.attacks.embedding import cosine_similarity as embedding_cosine
from tfadv.config import check_threshold  # noqa: F401 (re-exported: the one rule)
from tfadv.data.pairs import make_pairs
from tfadv.export.contract import THRESHOLD_FILE, THRESHOLD_KEY
from tfadv.files import write_text


def _scores_and_labels(scores, is_same):
    scores = np.asarray(scores, np.float64)
    is_same = np.asarray(is_same)
    if scores.ndim != 1 or is_same.shape != scores.shape:
        raise ValueError(
            "Expected 1-D scores and is_same of the same length (one entry per pair). "
            f"Received: scores.shape={scores.shape}, is_same.shape={is_same.shape}"
        )
    if scores.size == 0:
        raise ValueError("Expected at least one pair. Received empty scores.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"Expected finite scores. Received {int(np.sum(~np.isfinite(scores)))} NaN/inf "
            "value(s): check the embeddings (a zero or NaN embedding has no cosine similarity)."
        )
    if is_same.dtype != bool:
        values = np.unique(is_same)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"Expected is_same to be boolean or 0/1. Received values {values[:5]}")
        is_same = is_same.astype(bool)
    return scores, is_same


def _cumulative_counts(scores, is_same):
    """Distinct thresholds (descending) and the accepted same/different counts at each.

    Unlike `sklearn.metrics.roc_curve`, this also works when only one kind of
    pair is present, which `best_threshold` needs (a fold may hold one kind).
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], is_same[order]
    # The last index of each run of equal scores: a threshold accepts a whole tie group.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return s[last], tps, fps


def _check_both_kinds(is_same):
    pos = int(is_same.sum())
    neg = is_same.size - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"A ROC curve needs both same and different pairs. Received {pos} same "
                         f"and {neg} different pairs.")


def cosine_similarity(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two embedding matrices, in float64 NumPy.

    The NumPy face of `tfadv.attacks.embedding.cosine_similarity` (the one
    cosine): shapes checked, computed in float64, clipped to [-1, 1].

    Args:
        a: `(N, D)` embeddings.
        b: `(N, D)` embeddings (or `(D,)`, compared with every row of `a`).

    Returns:
        float64 `(N,)` in [-1, 1]; 0 for all-zero rows.

    Raises:
        ValueError: shapes that are not (N, D) and (N, D) or (D,).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 1:
        a = a[None]
    if b.ndim == 1:
        b = np.broadcast_to(b, a.shape)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"Expected a and b of the same shape (N, D). Received: a.shape={a.shape}, "
                         f"b.shape={b.shape}")
    if len(a) == 0:
        return np.zeros(0, np.float64)
    return np.clip(np.asarray(embedding_cosine(a, np.ascontiguousarray(b))), -1.0, 1.0)


def similarity_matrix(a, b) -> np.ndarray:
    """Cosine similarity of every row of `a` `(N, D)` with every row of `b` `(M, D)`: `(N, M)`."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected (N, D) and (M, D) embeddings. Received: a.shape={a.shape}, "
                         f"b.shape={b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip(a @ b.T, -1.0, 1.0)


def roc_curve(scores, is_same):
    """The ROC curve at every distinct score.

    `sklearn.metrics.roc_curve(is_same, scores, drop_intermediate=False)`: the
    first point is `(0, 0)` at threshold `+inf`, then one point per distinct
    score, in decreasing order. Tied scores move together (one point per tie
    group).

    Args:
        scores: similarity of each pair, shape `(P,)`.
        is_same: whether each pair is the same person, shape `(P,)`.

    Returns:
        `(far, tar, thresholds)`, each of shape `(K + 1,)` for K distinct scores.

    Raises:
        ValueError: only one kind of pair is present (the curve needs both).
    """
    scores, is_same = _scores_and_labels(scores, is_same)
    _check_both_kinds(is_same)
    far, tar, thresholds = _metrics.roc_curve(is_same, scores, drop_intermediate=False)
    thresholds = thresholds.astype(np.float64)
    thresholds[0] = np.inf  # scikit-learn < 1.3 put max(scores) + 1 there
    return far, tar, thresholds


def roc_auc(scores, is_same) -> float:
    """Area under the ROC curve, by `sklearn.metrics.roc_auc_score`.

    A tie between a same and a different pair counts 1/2.
    """
    scores, is_same = _scores_and_labels(scores, is_same)
    _check_both_kinds(is_same)
    return float(_metrics.roc_auc_score(is_same, scores))


def tar_at_far(scores, is_same, far=1e-2, *, return_threshold=False):
    """True accept rate at a false accept rate.

    Convention: no interpolation between ROC points. The threshold is the
    lowest one whose measured FAR is `<= far`, and the TAR is measured at that
    threshold, i.e. the largest TAR over the ROC points with FAR `<= far`.
    This is conservative: the reported operating point is one a threshold
    really achieves on these pairs.

    With fewer than `ceil(1 / far)` different pairs, FAR cannot be measured at
    that resolution (a single false accept already exceeds it); the result is
    then NaN with a warning, rather than a TAR at FAR = 0 passed off as TAR at
    `far`.

    Args:
        scores: similarity of each pair, shape `(P,)`.
        is_same: whether each pair is the same person, shape `(P,)`.
        far: target false accept rate, in (0, 1].
        return_threshold: also return the threshold.

    Returns:
        The TAR (float), or `(tar, threshold)` with `return_threshold=True`
        (NaN, NaN when there are too few different pairs).
    """
    if not 0.0 < float(far) <= 1.0:
        raise ValueError(f"Expected 0 < far <= 1. Received: far={far}")
    scores, is_same = _scores_and_labels(scores, is_same)
    neg = int((~is_same).sum())
    needed = math.ceil(1.0 / float(far) - 1e-9)
    if neg < needed:
        warnings.warn(
            f"TAR@FAR={far:g} needs at least {needed} different-person pairs to resolve that FAR; "
            f"got {neg}. Returning NaN: use more pairs (e.g. make_pairs(num_pairs=...) or "
            "cross_pairs) or a larger far.",
            stacklevel=2,
        )
        return (math.nan, math.nan) if return_threshold else math.nan
    fars, tars, thresholds = roc_curve(scores, is_same)
    ok = np.flatnonzero(fars <= float(far) + 1e-12)
    k = ok[np.argmax(tars[ok])]
    tar = float(tars[k])
    return (tar, float(thresholds[k])) if return_threshold else tar


def best_threshold(scores, is_same, *, max_threshold=None):
    """The threshold with the highest accuracy on these pairs.

    Every split of the sorted scores is tried (including "accept none" and
    "accept all"). The returned threshold lies halfway between the lowest
    accepted score and the highest rejected one, so that it generalises to
    new pairs rather than sitting on a training score. Among equally accurate
    splits, the highest threshold (fewest false accepts) wins.

    Args:
        scores: similarity of each pair, shape `(P,)`.
        is_same: whether each pair is the same person, shape `(P,)`.
        max_threshold: the largest threshold allowed (1.0 for cosine
            similarities: "accept none" sits one ulp above the top score, past
            1 when two photos embed identically). Where "accept none" would
            exceed it, the candidate is `max_threshold` itself, with the
            accuracy it really has.

    Returns:
        `(threshold, accuracy)`; `accuracy_at(scores, is_same, threshold)`
        equals the returned accuracy.
    """
    scores, is_same = _scores_and_labels(scores, is_same)
    thresholds, tps, fps = _cumulative_counts(scores, is_same)
    neg = is_same.size - int(is_same.sum())
    # correct = accepted same + rejected different; index 0 = accept none.
    correct = np.r_[neg, tps + (neg - fps)]
    top = float(np.nextafter(thresholds[0], np.inf))
    if max_threshold is not None and top > max_threshold:
        top = float(max_threshold)
        accepted = scores >= top
        correct[0] = int(np.sum(accepted & is_same) + np.sum(~accepted & ~is_same))
    k = int(np.argmax(correct))
    if k == 0:
        threshold = top
    elif k == len(thresholds):
        threshold = float(thresholds[-1])
    else:
        threshold = float((thresholds[k - 1] + thresholds[k]) / 2.0)
    return threshold, float(correct[k] / is_same.size)


def accuracy_at(scores, is_same, threshold) -> float:
    """Fraction of pairs classified correctly by `score >= threshold`."""
    scores, is_same = _scores_and_labels(scores, is_same)
    return float(np.mean((scores >= float(threshold)) == is_same))


class KFoldAccuracy(NamedTuple):
    """Result of `kfold_accuracy`."""

    mean: float
    std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray


def kfold_accuracy(scores, is_same, folds=10, *, seed=0, fold_ids=None) -> KFoldAccuracy:
    """Verification accuracy by the LFW protocol.

    The pairs are split into `folds` parts; for each, the threshold is
    chosen by `best_threshold` on the other parts and the accuracy measured on
    it. The mean is an unbiased estimate of the accuracy of a threshold set on
    other data. As in LFW's View 2 (each of its 10 folds holds 300 same and
    300 different pairs), the random split is stratified: every fold keeps the
    proportion of same pairs (`sklearn.model_selection.StratifiedKFold`).

    Args:
        scores: similarity of each pair, shape `(P,)`.
        is_same: whether each pair is the same person, shape `(P,)`.
        folds: number of folds (>= 2), ignored when `fold_ids` is given.
        seed: seed of the random assignment of pairs to folds.
        fold_ids: optional fold index per pair (e.g. `LfwPairs.fold`, for
            LFW's official View 2 folds); folds are taken in ascending id order.

    Returns:
        `KFoldAccuracy(mean, std, fold_accuracies, fold_thresholds)`; `std` is
        the population standard deviation over folds, as LFW results report.
    """
    scores, is_same = _scores_and_labels(scores, is_same)
    if fold_ids is None:
        if not 2 <= int(folds) <= scores.size:
            raise ValueError(f"Expected 2 <= folds <= number of pairs ({scores.size}). "
                             f"Received: folds={folds}")
        if max(int(is_same.sum()), int((~is_same).sum())) >= int(folds):
            splitter = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
        else:  # too few pairs of either kind to stratify (StratifiedKFold refuses)
            splitter = KFold(n_splits=int(folds), shuffle=True, random_state=seed)
    else:
        fold_ids = np.asarray(fold_ids)
        if fold_ids.shape != scores.shape:
            raise ValueError(f"Expected one fold id per pair. Received: fold_ids.shape="
                             f"{fold_ids.shape}, scores.shape={scores.shape}")
        if len(np.unique(fold_ids)) < 2:
            raise ValueError("Expected at least 2 distinct fold ids.")
        # Renumbered 0..K-1: PredefinedSplit reads -1 as "never tested", not as a fold.
        splitter = PredefinedSplit(np.unique(fold_ids, return_inverse=True)[1].reshape(-1))
    with warnings.catch_warnings():
        # Fewer same (or different) pairs than folds: some folds hold none, as with any split.
        warnings.filterwarnings("ignore", message="The least populated class",
                                category=UserWarning)
        splits = list(splitter.split(scores, is_same))
    accuracies, thresholds = [], []
    for train, test in splits:
        threshold, _ = best_threshold(scores[train], is_same[train])
        accuracies.append(accuracy_at(scores[test], is_same[test], threshold))
        thresholds.append(threshold)
    accuracies = np.asarray(accuracies)
    return KFoldAccuracy(float(accuracies.mean()), float(accuracies.std()), accuracies,
                         np.asarray(thresholds))


def verification_report(embeddings, labels=None, pairs=None, *, num_pairs=None,
                        same_fraction=0.5, folds=10, seed=0, fars: Sequence[float] = (1e-2, 1e-3)) -> dict:
    """The verification numbers of an embedding model on a labelled set.

    Args:
        embeddings: `(N, D)` embeddings (normalised or not: cosine is used).
        labels: `(N,)` identity labels; needed when `pairs` is None.
        pairs: `(idx_a, idx_b, is_same)` into `embeddings`; by default
            `make_pairs(labels, num_pairs, seed=seed)`.
        num_pairs, same_fraction: passed to `make_pairs`. TAR@FAR needs many
            different pairs (at least `1 / far`); small sets can use
            `pairs=cross_pairs(...)` or a lower `same_fraction`.
        folds: folds of `kfold_accuracy`.
        seed: seed of the pairs and of the folds.
        fars: FAR levels of the TAR@FAR entries.

    Returns:
        A JSON-serialisable dict: "accuracy" and "accuracy_std" (k-fold, LFW
        protocol), "threshold" (best-accuracy cosine threshold over all pairs:
        the operating threshold to save with the model, see `save_threshold`),
        "threshold_accuracy" (its accuracy on these pairs, optimistic),
        "auc", "tar@far=<far>" per level (NaN when there are too few
        different pairs), "num_pairs", "num_same", "num_different".

    Example:
        >>> report = verification_report(model.predict(faces.images), faces.labels)
        >>> save_threshold(out_dir, report["threshold"], accuracy=report["accuracy"])
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"Expected (N, D) embeddings. Received: shape={embeddings.shape}")
    if pairs is None:
        if labels is None:
            raise ValueError("Pass labels (to make pairs) or pairs=(idx_a, idx_b, is_same).")

        labels = np.asarray(labels)
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"Expected one label per embedding. Received: labels.shape="
                             f"{labels.shape}, embeddings.shape={embeddings.shape}")
        pairs = make_pairs(labels, num_pairs, seed=seed, same_fraction=same_fraction)
    idx_a, idx_b, is_same = (np.asarray(p) for p in pairs)
    scores = cosine_similarity(embeddings[idx_a], embeddings[idx_b])
    _, is_same = _scores_and_labels(scores, is_same)
    kfold = kfold_accuracy(scores, is_same, folds=min(int(folds), scores.size), seed=seed)
    threshold, threshold_accuracy = best_threshold(scores, is_same, max_threshold=1.0)
    report = {
        "accuracy": kfold.mean,
        "accuracy_std": kfold.std,
        "threshold": threshold,
        "threshold_accuracy": threshold_accuracy,
        "auc": roc_auc(scores, is_same),
    }
    for far in fars:
        report[f"tar@far={far:g}"] = tar_at_far(scores, is_same, far)
    report.update(num_pairs=int(scores.size), num_same=int(is_same.sum()),
                  num_different=int((~is_same).sum()))
    return report


def nearest_neighbour_accuracy(probe_emb, probe_labels, gallery_emb=None,
                               gallery_labels=None) -> float:
    """Identification accuracy: each probe takes the label of its most similar gallery image.

    Args:
        probe_emb: `(N, D)` embeddings of the probes.
        probe_labels: `(N,)` labels of the probes.
        gallery_emb: `(M, D)` embeddings of the gallery. `None`: leave-one-out
            within the probes (each probe against all the others).
        gallery_labels: `(M,)` labels of the gallery, same label space.

    Returns:
        Fraction of probes whose nearest gallery image (cosine) has their label.
    """
    probe_emb = np.asarray(probe_emb)
    probe_labels = np.asarray(probe_labels)
    if probe_labels.shape != (probe_emb.shape[0],):
        raise ValueError(f"Expected one probe label per probe embedding. Received: "
                         f"probe_labels.shape={probe_labels.shape}, "
                         f"probe_emb.shape={probe_emb.shape}")
    if gallery_emb is None:
        if len(probe_labels) < 2:
            raise ValueError("Leave-one-out identification needs at least 2 probes.")
        sims = similarity_matrix(probe_emb, probe_emb)
        np.fill_diagonal(sims, -np.inf)
        gallery_labels = probe_labels
    else:
        if gallery_labels is None:
            raise ValueError("Pass gallery_labels together with gallery_emb.")
        gallery_labels = np.asarray(gallery_labels)
        if len(gallery_labels) != len(gallery_emb) or len(gallery_labels) == 0:
            raise ValueError(f"Expected one gallery label per gallery embedding (and at least "
                             f"one). Received: {len(gallery_labels)} labels, "
                             f"{len(gallery_emb)} embeddings.")
        sims = similarity_matrix(probe_emb, gallery_emb)
    return float(np.mean(gallery_labels[np.argmax(sims, axis=1)] == probe_labels))


def _threshold_path(path) -> Path:
    path = Path(path)
    return path / THRESHOLD_FILE if path.is_dir() else path


def save_threshold(path, threshold, **extra) -> Path:
    """Writes the operating threshold as JSON: `{"cosine_threshold": t, **extra}`.

    Args:
        path: a file path, or an existing directory (then `threshold.json` in it).
        threshold: cosine-similarity threshold in [-1, 1]; a pair is "same"
            when its similarity is `>= threshold`.
        **extra: more JSON-serialisable fields (e.g. accuracy, preset name).

    Returns:
        The path written.

    Raises:
        ValueError: the threshold is not a finite number in [-1, 1], or
            `extra` holds the key `cosine_threshold`.
    """
    threshold = check_threshold(threshold)
    if THRESHOLD_KEY in extra:
        raise ValueError(f"Pass the threshold as the threshold argument, not as {THRESHOLD_KEY}=.")
    path = _threshold_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def to_builtin(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    write_text(path, json.dumps({THRESHOLD_KEY: threshold, **extra}, indent=2,
                                default=to_builtin) + "\n")
    return path


def threshold_file(path) -> Path:
    """Where the threshold of `path` lives.

    A directory: its `threshold.json`; a `.json` file: itself; any other
    path (a model file such as `embedder.keras`): the `threshold.json` next
    to it.
    """
    path = Path(path)
    if path.is_dir():
        return path / THRESHOLD_FILE
    if path.suffix.lower() == ".json":
        return path
    return path.parent / THRESHOLD_FILE


def load_threshold(path, *, with_extra=False):
    """Reads a file written by `save_threshold`: the one threshold reader.

    Args:
        path: the file, a directory containing `threshold.json`, or a model
            file (e.g. `embedder.keras`) with `threshold.json` next to it.
        with_extra: also return the whole JSON object.

    Returns:
        The threshold (float in [-1, 1]), or `(threshold, dict)` with
        `with_extra=True`.

    Raises:
        FileNotFoundError: there is no threshold file.
        ValueError: the file is not a JSON object with a numeric
            `cosine_threshold`, or the value is not a finite number in [-1, 1].
    """
    path = threshold_file(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Threshold file not found: {str(path)!r}. Write {{\"{THRESHOLD_KEY}\": <cosine "
            "threshold>}} there (save_threshold() and `tfadv facenet finetune` do) or pass "
            "the threshold explicitly.")
    try:
        data = json.loads(path.read_text())
        raw = data[THRESHOLD_KEY]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Expected {str(path)!r} to hold a JSON object with a numeric "
                         f"{THRESHOLD_KEY!r}. ({type(e).__name__}: {e})") from e
    try:
        threshold = check_threshold(raw, name=THRESHOLD_KEY)
    except ValueError as e:
        raise ValueError(f"{e} (in {str(path)!r})") from None
    return (threshold, data) if with_extra else threshold
