"""Scanning a face folder (or a fine-tuning set) for poisoned photos with an embedder.

The embeddings of each identity's photos are checked by a poisoning defence
(`tfadv.poisoning.defences`): photos an attacker planted under a victim's name
form a group of the victim's photos that looks like another enrolled person
(or, for an attacker not enrolled, a separated minority). Only reads: files are
never moved, changed or deleted; excluding suspects is the caller's choice
(`tfadv facenet finetune --scan-poison exclude` leaves them out of training).
"""

from __future__ import annotations

import numpy as np

from tfadv.evaluation import faces as face_eval
from tfadv.poisoning.defences import MIN_SPLIT
from tfadv.poisoning.detect import METHODS

__all__ = ["scan_faceset", "scan_folder"]


def scan_faceset(model, faceset, method: str = "activations", *, keep=None) -> dict:
    """Suspect photos of a `FaceSet` (JSON-ready).

    Args:
        model: the embedder (pixels 0-255 -> embeddings).
        faceset: `tfadv.data.faces.FaceSet`.
        method: "activations" (activation clustering) or "spectral" (any name of
            `tfadv.poisoning.METHODS`).
        keep: optional bool [N]: scan only these photos (the rest is not flagged).

    Returns:
        {"method", "images", "flagged", "suspect_identities", "reasons": {identity:
        why}, "suspects": [{"path", "identity", "looks_like", "looks_like_cosine",
        "score"}] most suspect first ("looks_like": the enrolled identity whose
        centre is nearer than the photo's own, or None; "looks_like_cosine": the
        photo's cosine to that centre), "centre_accuracy" (`DetectionResult`),
        "unchecked": identities with fewer than MIN_SPLIT (4) photos (too few
        to split),
        "warnings": list of str, "flags": bool list [N]}.

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"Expected method to be one of {sorted(METHODS)}. "
                         f"Received: {method!r}")
    rows = np.arange(len(faceset.labels)) if keep is None else np.flatnonzero(keep)
    flags = np.zeros(len(faceset.labels), bool)
    suspects, reasons, accuracy, unchecked, warnings = [], {}, None, [], []
    names = faceset.class_names
    if len(rows):
        emb = face_eval.embed(model, faceset.images[rows])
        labels = faceset.labels[rows]
        result = METHODS[method](emb, labels)
        flags[rows[result.flags]] = True
        picked = np.flatnonzero(result.flags)
        for j in picked[np.argsort(-result.scores[picked], kind="stable")]:
            claimed = result.claim_margin[j] > 0
            suspects.append({
                "path": faceset.paths[rows[j]], "identity": names[int(labels[j])],
                "looks_like": names[int(result.nearest_class[j])] if claimed else None,
                "looks_like_cosine": float(result.nearest_cosine[j]) if claimed else None,
                "score": float(result.scores[j])})
        for c, v in result.per_class.items():
            if v["suspect"]:
                reasons[names[c]] = (v["reason"] if v["claimed_by"] is None else
                                     f"photos that look like {names[v['claimed_by']]}")
        accuracy = result.centre_accuracy
        if not result.claims_used:
            warnings.append(
                f"the embedder does not separate these identities (only {accuracy:.2f} of the "
                f"photos are nearest their own identity's centre; "
                f"{result.centre_accuracy_needed:.2f} needed): no group was judged by which "
                "identity it looks like. Is the model a face embedder for these photos?")
        unchecked = [names[c] for c, v in result.per_class.items() if v["size"] < MIN_SPLIT]
    return {"method": method, "images": int(len(rows)), "flagged": int(flags.sum()),
            "suspect_identities": list(reasons), "reasons": reasons, "suspects": suspects,
            "centre_accuracy": accuracy, "unchecked": unchecked, "warnings": warnings,
            "flags": flags.tolist()}


def scan_folder(root, *, model, method: str = "activations", detector=None, size: int = 160,
                progress: bool = False) -> dict:
    """`scan_faceset` of a folder of identity sub-folders (crops cached outside it), with
    "skipped": [{"path", "reason"}] for every file that was not scanned.

    Raises:
        FileNotFoundError: root is not a folder.
    """
    import warnings
    from pathlib import Path

    from tfadv.data import faces as faces_lib

    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root} is not a folder. Expected a folder with one "
                                "sub-folder of photos per identity.")
    with warnings.catch_warnings():
        # The skipped files are reported in the result instead.
        warnings.simplefilter("ignore", UserWarning)
        faceset = faces_lib.load_face_folder(root, detector=detector, size=size,
                                             progress=progress)
    return {"folder": str(root), **scan_faceset(model, faceset, method),
            "skipped": [{"path": p, "reason": r} for p, r in
                        [*faceset.skipped, *faceset.skipped_identities]]}
