"""`tfadv certify` (randomized smoothing's certified accuracy of a saved classifier) and
`tfadv facenet certify` (center smoothing's certified matches of a face embedder)."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from tfadv.certification import faces as faces_certify
from tfadv.certification.smoothing import RandomizedSmoothing, certified_accuracy
from tfadv.config.certification import CertifyConfig, FaceCertifyConfig
from tfadv.config.mnist import MnistDataConfig
from tfadv.config.options import add_command, build
from tfadv.data import subset
from tfadv.files import output_dir, write_json, write_text


def add(subparsers, load_classifier, eval_data):
    """Adds `certify`; the loaders are the CLI's (one model loader, one test split)."""
    c = add_command(subparsers, "certify", lambda args: run(args, load_classifier, eval_data),
                    configs=(CertifyConfig, MnistDataConfig),
                    help="certified L2 accuracy of a classifier smoothed with Gaussian noise "
                         "(Cohen et al. 2019)")
    c.add_argument("model", help="a .keras classifier (inputs in [0, 1], logits out)")
    c.add_argument("--json", action="store_true", help="print one JSON object only")


def add_faces(facenet, loaders):
    """Adds `facenet certify` to the `facenet` group; `loaders` are the recipe's
    (load_model_or_preset, load_splits, operating_threshold)."""
    c = add_command(facenet, "certify", lambda args: run_faces(args, loaders),
                    configs=(FaceCertifyConfig,),
                    help="certified matches of the val faces under L2 perturbations (center "
                         "smoothing, Kumar & Goldstein 2021)")
    model = c.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", help="FaceNet preset, e.g. facenet-mscele1m-128")
    model.add_argument("--model", help="embedder .keras file (a threshold.json next to it is "
                                       "used; else one is chosen on gallery pairs)")
    c.add_argument("--faces", default=None, help="root with train/ and val/ (default: the "
                                                 "demo set)")
    c.add_argument("--json", action="store_true", help="print one JSON object only")


def run_faces(args, loaders):
    result = faces_certify.run(args, build(FaceCertifyConfig, args), *loaders)
    print(json.dumps(result) if args.json else faces_certify.markdown(result))


def markdown(result) -> str:
    rows = "\n".join(f"| {float(r):g} | {a:.3f} |"
                     for r, a in result["certified_accuracy"].items())
    return (f"Randomized smoothing, sigma {result['sigma']:g}, n {result['n']:,}, alpha "
            f"{result['alpha']:g}, {result['n_test']} test digits "
            f"({result['seconds']:.0f} s; abstained on {result['abstained']}):\n\n"
            f"| L2 radius | certified accuracy |\n|---|---|\n{rows}\n")


def plot(labels, radii, y, largest, path, *, title):
    """The certified-accuracy curve (a step function of the radius) as a PNG."""
    from tfadv.evaluation.robustness import plot_curve

    grid = np.linspace(0.0, max(float(largest), 1e-6), 81)
    acc = certified_accuracy(labels, radii, y, grid)
    return plot_curve({"eps": list(acc), "accuracy": list(acc.values())}, path, title=title,
                      xlabel="L2 radius", marker=None)


def run(args, load_classifier, eval_data):
    cfg = build(CertifyConfig, args)
    if cfg.out:  # before the sampling: a bad --out must not cost the run
        output_dir(cfg.out)
    model = load_classifier(args.model)
    x, y = eval_data(build(MnistDataConfig, args))
    # A random sample: the splits are sorted by label (their first digits are zeros).
    x, y = subset(x, y, cfg.n_test, seed=cfg.seed)
    num_classes = int(model.output_shape[-1])
    smoothed = RandomizedSmoothing(model, cfg.sigma, num_classes, batch_size=cfg.batch_size,
                                   seed=cfg.seed)
    start = time.perf_counter()
    labels, radii = smoothed.certify(x, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha,
                                     progress=not args.json)
    result = {"model": os.path.abspath(args.model), "sigma": cfg.sigma, "n": cfg.n,
              "n0": cfg.n0, "alpha": cfg.alpha, "n_test": int(len(y)),
              "seconds": time.perf_counter() - start,
              "abstained": int((labels < 0).sum()),
              "certified_accuracy": certified_accuracy(labels, radii, y, cfg.radii),
              "labels": labels.tolist(), "radii": radii.tolist(), "true_labels": y.tolist()}
    if cfg.out:
        write_json(os.path.join(cfg.out, "certify.json"), result)
        write_text(os.path.join(cfg.out, "certify.md"), markdown(result))
        plot(labels, radii, y, max(cfg.radii), os.path.join(cfg.out, "certify.png"),
             title=f"Certified accuracy, sigma {cfg.sigma:g}")
    if args.json:
        print(json.dumps(result))
    else:
        print(markdown(result))
