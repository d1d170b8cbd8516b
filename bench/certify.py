"""Randomized smoothing: tfadv's CERTIFY against ART's, and its sampling against plain predict.

On the reference MNIST CNN (a saved classifier, or an untrained one: the
arithmetic is the same) and the first digits of the embedded test split:

1. Certified images per second at n = 10,000 noise samples (n0 = 100,
   alpha = 0.001): `tfadv.certification.RandomizedSmoothing.certify` versus
   ART's `TensorFlowV2RandomizedSmoothing.certify` on the same model, digits,
   sigma and n. Target: >= 3x ART.
2. Noise samples per second of tfadv's sampling loop versus the limit: a
   compiled plain forward pass over the same number of images (already in
   memory, no noise drawn). Target: >= 0.8 of it.

The two implementations alternate, `--repeats` times each, and the median of
each is used, so both see the same machine load. Prints the ratios against
their targets; `--json` also writes them.

Usage:
    python bench/certify.py [--model runs/smoothing/gaussian-025/model.keras] [--images 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPEED_TARGET = 3.0   # certified images/s, tfadv / ART
LIMIT_TARGET = 0.8   # noise samples/s, tfadv / plain predict


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a saved MNIST classifier (default: an "
                                                 "untrained reference CNN)")
    p.add_argument("--images", type=int, default=5, help="digits certified per repeat")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import tensorflow as tf
    from art.estimators.certification.randomized_smoothing import (
        TensorFlowV2RandomizedSmoothing)

    import tfadv
    from tfadv.certification import RandomizedSmoothing
    from tfadv.data import load_mnist
    from tfadv.models.saved import load_saved

    model = load_saved(args.model) if args.model else tfadv.models.mnist_cnn()
    x, _ = load_mnist("embedded", "test")
    x = x[:args.images]
    ours = RandomizedSmoothing(model, args.sigma, 10, batch_size=args.batch_size, seed=0)
    art = TensorFlowV2RandomizedSmoothing(
        model=model, nb_classes=10, input_shape=(28, 28, 1), sample_size=100,
        scale=args.sigma, alpha=0.001, clip_values=None)

    @tf.function(reduce_retracing=True)
    def forward(batch):
        return tf.argmax(model(batch, training=False), axis=-1)

    plain = np.repeat(x[:1], args.batch_size, axis=0)
    calls = -(-args.n // args.batch_size)

    def predict_plain():
        for _ in range(calls):
            forward(plain).numpy()

    # Warm-up: traces and first calls outside the timing.
    ours.certify(x[:1], n0=100, n=args.batch_size, alpha=0.001)
    art.certify(x[:1], n=args.batch_size, batch_size=args.batch_size)
    predict_plain()
    ours.sample_counts(x[:1], args.n)

    times = {"tfadv": [], "art": [], "sampling": [], "plain": []}
    for _ in range(args.repeats):
        times["tfadv"].append(timed(lambda: ours.certify(x, n0=100, n=args.n, alpha=0.001))[0])
        times["art"].append(timed(lambda: art.certify(x, n=args.n,
                                                      batch_size=args.batch_size))[0])
        times["sampling"].append(timed(lambda: ours.sample_counts(x[:1], args.n))[0])
        times["plain"].append(timed(predict_plain)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    per_s = {"tfadv_images_per_s": len(x) / med["tfadv"],
             "art_images_per_s": len(x) / med["art"],
             "sampling_samples_per_s": args.n / med["sampling"],
             "plain_images_per_s": calls * args.batch_size / med["plain"]}
    speed = per_s["tfadv_images_per_s"] / per_s["art_images_per_s"]
    limit = per_s["sampling_samples_per_s"] / per_s["plain_images_per_s"]
    result = {**per_s, "speedup_vs_art": speed, "speedup_target": SPEED_TARGET,
              "fraction_of_plain_predict": limit, "limit_target": LIMIT_TARGET,
              "settings": vars(args), "seconds": times}
    print(f"CERTIFY at n = {args.n:,}: tfadv {per_s['tfadv_images_per_s']:.2f} images/s, "
          f"ART {per_s['art_images_per_s']:.2f} images/s: {speed:.2f}x "
          f"(target {SPEED_TARGET:g}x: {speed / SPEED_TARGET:.2f} of it)")
    print(f"noise samples: {per_s['sampling_samples_per_s']:,.0f}/s vs plain predict "
          f"{per_s['plain_images_per_s']:,.0f} images/s: {limit:.2f} (target "
          f"{LIMIT_TARGET:g}: {limit / LIMIT_TARGET:.2f} of it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
