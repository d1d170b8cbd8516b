"""AutoAttack: tfadv's standard cascade against ART's `AutoAttack`, on one model, in one run.

On a saved MNIST classifier (input (28, 28, 1) float32 in [0, 1], 10 logits;
the PGD-trained reference CNN of the README) and the first N digits of the
embedded test split (1,000 by default), Linf eps 0.3:

- tfadv: `tfadv.evaluation.autoattack` (APGD-CE, APGD-T x 9, FAB-T x 9,
  Square 5,000 queries; each on the examples still standing);
- ART: `art.attacks.evasion.AutoAttack` with its default ensemble (APGD-CE and
  APGD-DLR with 5 random starts each, DeepFool, Square 5,000 x 5 restarts) on a
  `TensorFlowV2Classifier` of the same model.

Targets (the project's): tfadv's robust accuracy <= ART's + 0.005 (at least
as strong), and tfadv's wall time <= 1/3 of ART's. Both are printed as
ratios against the target; `--strict` makes a miss exit with status 1.

Usage:
    python bench/autoattack.py runs/mnist-pgd/model.keras
    python bench/autoattack.py MODEL --n 200 --json runs/bench-autoattack.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

EPS = 0.3
STRENGTH_SLACK = 0.005
SPEED_TARGET = 1 / 3


def art_autoattack(model, x, y, eps, batch_size):
    """Robust accuracy of ART's default AutoAttack, and its wall time."""
    import tensorflow as tf
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=model, nb_classes=10, input_shape=x.shape[1:], clip_values=(0.0, 1.0),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    attack = AutoAttack(classifier, norm=np.inf, eps=eps, eps_step=eps / 4,
                        batch_size=batch_size)
    x_adv = attack.generate(x=x, y=y)
    seconds = time.perf_counter() - start
    assert np.abs(x_adv - x).max() <= eps + 1e-5
    pred = np.argmax(classifier.predict(x_adv, batch_size=batch_size), axis=1)
    return float(np.mean(pred == y)), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .keras MNIST classifier (inputs in [0, 1], logits out)")
    p.add_argument("--n", type=int, default=1000, help="first N embedded test digits")
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--skip-art", action="store_true", help="run tfadv only")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)

    import keras

    import tfadv  # noqa: F401  (registers tfadv's serializable objects)
    from tfadv.data import load_mnist
    from tfadv.evaluation.autoattack import autoattack, summary_lines

    model = keras.saving.load_model(args.model, safe_mode=True)
    x, y = load_mnist("embedded", "test")
    x, y = x[: args.n], y[: args.n]
    start = time.perf_counter()
    ours = autoattack(model, x, y, norm="inf", eps=args.eps, batch_size=args.batch_size,
                      progress=True)
    ours_s = time.perf_counter() - start
    print("\n".join(summary_lines(ours)))
    out = {"n": len(y), "eps": args.eps, "tfadv": {**ours.to_dict(), "wall_s": ours_s}}
    out["tfadv"].pop("broken_by")
    missed = []
    if not args.skip_art:
        art_acc, art_s = art_autoattack(model, x, y, args.eps, args.batch_size)
        out["art"] = {"robust_accuracy": art_acc, "wall_s": art_s}
        strength = ours.robust_accuracy - art_acc
        speed = ours_s / art_s
        out["strength_difference"] = strength
        out["time_ratio"] = speed
        print(f"\nrobust accuracy: tfadv {ours.robust_accuracy:.4f}  ART {art_acc:.4f}  "
              f"difference {strength:+.4f} (target <= +{STRENGTH_SLACK})")
        print(f"wall time: tfadv {ours_s:.1f} s  ART {art_s:.1f} s  ratio {speed:.3f} "
              f"(target <= {SPEED_TARGET:.3f}; {speed / SPEED_TARGET:.2f}x the limit)")
        if strength > STRENGTH_SLACK:
            missed.append("strength")
        if speed > SPEED_TARGET:
            missed.append("speed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if missed:
        print("MISSED:", ", ".join(missed))
        if args.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
