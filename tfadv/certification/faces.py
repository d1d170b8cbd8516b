"""`tfadv facenet certify`: certified verification decisions of a face embedder.

Each val face (probe) is compared with its own identity's reference (the
normalised mean embedding of its gallery photos, as in the attack
evaluation) at the model's cosine threshold. Center smoothing
(`tfadv.certification.center`) gives the smoothed embedding of the probe and,
for each input radius in pixels, how far it can move; the match is certified
at that radius when no embedding that far away could cross the threshold.
"""

from __future__ import annotations

import os
import time

import numpy as np

from tfadv.certification.center import CenterSmoothing, certified_decisions
from tfadv.config.certification import FaceCertifyConfig
from tfadv.evaluation import faces as face_eval
from tfadv.files import output_dir, write_json, write_text

__all__ = ["certify_faces", "markdown"]


def certify_faces(model, splits, threshold: float, cfg: FaceCertifyConfig, *,
                  progress=False) -> dict:
    """Center-smoothing certificates of the val faces' matches (JSON-ready).

    Args:
        model: the embedder (pixels 0-255 -> embeddings).
        splits: `tfadv.recipes.facenet.FaceSplits` (gallery `train`, probes `val`).
        threshold: the cosine threshold of a match.
        cfg: the settings (sigma and radii in pixels, sample counts, alpha).

    Returns:
        A dict: the settings, "faces" (probes certified), "clean_match" (the
        unsmoothed model's match rate), "smoothed_match", "valid_centers",
        per radius "certified_match" (fraction of probes whose match is
        certified) and "median_eps_out" (embedding-space bound), "seconds",
        "samples_per_face", "samples_per_second", and per face the rows.

    Raises:
        ValueError: no val faces; a threshold outside [-1, 1].
    """
    x, y = splits.val.images, splits.val.labels
    if cfg.limit:
        x, y = x[:cfg.limit], y[:cfg.limit]
    if len(x) == 0:
        raise ValueError("No val faces to certify: put photos in faces/val/<person>/.")
    gallery = face_eval.embed(model, splits.train.images)
    refs = face_eval.identity_references(gallery, splits.train.labels,
                                         len(splits.train.class_names))[y]
    clean = face_eval.embed(model, x)
    clean_match = face_eval.succeeded(clean, refs, threshold, "impersonation")
    smoothing = CenterSmoothing(model, cfg.sigma, batch_size=cfg.batch_size, delta=cfg.delta,
                                seed=cfg.seed)
    start = time.perf_counter()
    cert = smoothing.certify(x, cfg.radii, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha,
                             progress=progress)
    seconds = time.perf_counter() - start
    match, certified = certified_decisions(cert, refs, threshold)
    names = splits.val.class_names
    per_radius = {}
    for j, r in enumerate(cert.radii):
        finite = cert.eps_out[:, j][np.isfinite(cert.eps_out[:, j])]
        per_radius[f"{r:g}"] = {
            "certified_match": float(np.mean(certified[:, j] == 1)),
            "certified_non_match": float(np.mean(certified[:, j] == 0)),
            "median_eps_out": float(np.median(finite)) if len(finite) else None}
    return {
        "largest_certifiable_radius": smoothing.largest_radius(cfg.n, cfg.alpha),
        "sigma": cfg.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "delta": cfg.delta,
        "threshold": float(threshold), "faces": int(len(x)),
        "clean_match": float(np.mean(clean_match)), "smoothed_match": float(np.mean(match)),
        "valid_centers": float(np.mean(cert.valid)), "radii": per_radius,
        "median_smoothing_error": float(np.median(cert.smoothing_error)),
        "seconds": seconds, "samples_per_face": cert.samples,
        "samples_per_second": cert.samples * len(x) / seconds,
        "per_face": [{"identity": names[int(c)], "match": bool(m), "valid": bool(v),
                      "eps_out": [None if not np.isfinite(e) else float(e) for e in row]}
                     for c, m, v, row in zip(y, match, cert.valid, cert.eps_out)],
    }


def markdown(result) -> str:
    rows = "\n".join(
        f"| {r} | {v['certified_match']:.3f} | "
        f"{'n/a' if v['median_eps_out'] is None else format(v['median_eps_out'], '.3f')} |"
        for r, v in result["radii"].items())
    return (f"Center smoothing, sigma {result['sigma']:g} pixels, n0 {result['n0']:,} x 2, "
            f"n {result['n']:,}, alpha {result['alpha']:g}, delta {result['delta']:g}; "
            f"{result['faces']} val faces against their identity at cosine-similarity "
            f"threshold {result['threshold']:.3f}.\n"
            f"Unsmoothed match rate {result['clean_match']:.3f}, smoothed "
            f"{result['smoothed_match']:.3f}; valid centres {result['valid_centers']:.3f}; "
            f"{result['samples_per_face']:,} noisy faces per face (30 candidate centres, "
            f"n0 x 2, n), {result['seconds']:.0f} s "
            f"({result['samples_per_second']:.1f} noisy faces/s).\n\n"
            "| input L2 radius (pixels) | match certified | median embedding bound |\n"
            f"|---|---|---|\n{rows}\n\nNo radius above "
            f"{result['largest_certifiable_radius']:.1f} pixels can be certified with these "
            "n, alpha and delta.\n")


def run(args, cfg: FaceCertifyConfig, load_model_or_preset, load_splits, operating_threshold):
    """The command: the CLI's loaders in, the table out (and certify.json / certify.md)."""
    if cfg.out:  # before the sampling: a bad --out must not cost the run
        output_dir(cfg.out)
    model = load_model_or_preset(args.preset, args.model)
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3 or len(model.output_shape) != 2:
        raise ValueError(f"{args.model or args.preset} is not a face embedder: expected RGB "
                         f"photos [N, H, W, 3] in and embeddings [N, D] out; it takes {shape}.")
    splits = load_splits(args.faces, size=int(model.input_shape[1]), progress=not args.json)
    threshold, _ = operating_threshold(model, args.model, splits)
    result = certify_faces(model, splits, threshold, cfg, progress=not args.json)
    result["model"] = args.model or args.preset
    if cfg.out:
        write_json(os.path.join(cfg.out, "certify.json"), result)
        write_text(os.path.join(cfg.out, "certify.md"), markdown(result))
    return result
