"""The accuracy bar: clean and PGD-40 accuracy of a saved MNIST classifier.

Measures a saved `.keras` classifier (input (28, 28, 1) float32 in [0, 1],
output 10 logits) on the embedded MNIST test split (1,000 images) with
attacks that do not come from `tfadv`, so that a bug shared by the project's
training attack and its own evaluation attack cannot hide in the number:

- clean accuracy;
- PGD-40 from ART (`art.attacks.evasion.ProjectedGradientDescent` on a
  `TensorFlowV2Classifier`): Linf eps 0.3, step 0.01, 40 steps, one random
  start, true labels;
- PGD-40 from cleverhans (`cleverhans.tf2.attacks.projected_gradient_descent`)
  with the same budget and `rand_init=True`;
- the worst case per example: an example counts only if it is classified
  correctly clean *and* under both attacks.

The bar (from the project's targets) is clean >= 0.97 and worst-case PGD-40
>= 0.80; `--strict` turns a miss into exit status 1.

Usage:
    python bench/accuracy_bar.py runs/pgd/model.keras
    python bench/accuracy_bar.py runs/pgd/model.keras --limit 200 --json runs/pgd/bar.json

Requires `adversarial-robustness-toolbox` (the project's `dev` extra) and
`cleverhans` (a core dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

EPS = 0.3
STEP = 0.01
STEPS = 40
NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)
BAR_CLEAN = 0.97
BAR_ROBUST = 0.80


def load_classifier(path):
    """Loads a saved tfadv/Keras classifier with safe_mode on.

    Args:
        path: path of a `.keras` file.

    Returns:
        The Keras model.
    """
    import keras

    import tfadv  # noqa: F401  (registers tfadv's serializable objects)

    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}.")
    return keras.saving.load_model(path, safe_mode=True)


def predict_labels(model, x, batch_size):
    """Arg-max predictions of `model` on `x`, in batches, inference mode."""
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size], training=False)
        out.append(np.argmax(np.asarray(logits), axis=1))
    return np.concatenate(out)


def art_pgd(model, x, y, batch_size):
    """Untargeted Linf PGD-40 with ART.

    The loss is summed (not averaged) over the batch so that each example's
    input gradient is its own loss gradient, unscaled by the batch size.

    Returns:
        Adversarial images, same shape as `x`.
    """
    import keras

    warnings.filterwarnings("ignore", message="PyTorch not found")  # ART's import-time notice
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=model,
        nb_classes=NUM_CLASSES,
        input_shape=INPUT_SHAPE,
        clip_values=(0.0, 1.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
    )
    attack = ProjectedGradientDescent(
        classifier, norm=np.inf, eps=EPS, eps_step=STEP, max_iter=STEPS,
        num_random_init=1, targeted=False, batch_size=batch_size, verbose=False,
    )
    return attack.generate(x=x, y=y)


def cleverhans_pgd(model, x, y, batch_size):
    """Untargeted Linf PGD-40 with cleverhans' TF2 implementation, true labels.

    Returns:
        Adversarial images, same shape as `x`.
    """
    import tensorflow as tf
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    def model_fn(t):
        return model(t, training=False)

    out = []
    for i in range(0, len(x), batch_size):
        xb = tf.constant(x[i:i + batch_size])
        yb = tf.constant(y[i:i + batch_size])
        adv = projected_gradient_descent(
            model_fn, xb, eps=EPS, eps_iter=STEP, nb_iter=STEPS, norm=np.inf,
            clip_min=0.0, clip_max=1.0, y=yb, targeted=False, rand_init=True,
            sanity_checks=False,
        )
        out.append(adv.numpy())
    return np.concatenate(out)


def _perturbation_report(x, x_adv):
    """Largest Linf distance and the value range of the adversarial images."""
    return {
        "max_linf": float(np.max(np.abs(x_adv - x))),
        "min_value": float(np.min(x_adv)),
        "max_value": float(np.max(x_adv)),
    }


def measure(model, x, y, batch_size=250):
    """Runs the clean evaluation and both attacks.

    Args:
        model: Keras classifier, images in [0, 1] -> logits.
        x: float32 images [N, 28, 28, 1].
        y: int labels [N].
        batch_size: batch size for prediction and the attacks.

    Returns:
        A JSON-ready dict with accuracies, per-attack seconds and perturbation
        sanity numbers.
    """
    correct_clean = predict_labels(model, x, batch_size) == y
    result = {
        "n": int(len(x)),
        "budget": {"norm": "inf", "eps": EPS, "step": STEP, "steps": STEPS, "random_starts": 1},
        "clean_accuracy": float(correct_clean.mean()),
        "attacks": {},
    }
    worst = correct_clean.copy()
    for name, fn in (("art_pgd40", art_pgd), ("cleverhans_pgd40", cleverhans_pgd)):
        t0 = time.perf_counter()
        x_adv = np.asarray(fn(model, x, y, batch_size), dtype=np.float32)
        seconds = time.perf_counter() - t0
        correct_adv = predict_labels(model, x_adv, batch_size) == y
        worst &= correct_adv
        result["attacks"][name] = {
            "accuracy": float(correct_adv.mean()),
            "seconds": seconds,
            **_perturbation_report(x, x_adv),
        }
    result["worst_case_accuracy"] = float(worst.mean())
    result["bar"] = {
        "clean_min": BAR_CLEAN,
        "robust_min": BAR_ROBUST,
        "passed": bool(result["clean_accuracy"] >= BAR_CLEAN
                       and result["worst_case_accuracy"] >= BAR_ROBUST),
    }
    return result


def format_table(result):
    """A small plain-text table of `measure`'s result."""
    rows = [("clean", result["clean_accuracy"], "")]
    for name, r in result["attacks"].items():
        rows.append((name, r["accuracy"], f"{r['seconds']:.1f}s, max |d| {r['max_linf']:.4f}"))
    rows.append(("worst case", result["worst_case_accuracy"], "clean and both attacks"))
    lines = [f"examples: {result['n']}   budget: Linf eps {EPS}, step {STEP}, {STEPS} steps, "
             "1 random start",
             f"{'metric':<18} {'accuracy':>8}  notes",
             "-" * 60]
    lines += [f"{n:<18} {a:>8.4f}  {note}" for n, a, note in rows]
    bar = result["bar"]
    lines.append("-" * 60)
    lines.append(f"bar (clean >= {bar['clean_min']}, worst case >= {bar['robust_min']}): "
                 + ("PASS" if bar["passed"] else "MISS"))
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        description="Clean and independent PGD-40 (ART, cleverhans) accuracy of a saved "
                    "MNIST classifier on the embedded test split.")
    p.add_argument("model", help="a .keras classifier ((28, 28, 1) in [0, 1] -> 10 logits)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")
    p.add_argument("--limit", type=int, default=None,
                   help="use a random sample of N test images, as `tfadv eval --limit` does "
                        "(default: all 1,000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    p.add_argument("--strict", action="store_true", help="exit 1 if the bar is missed")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import keras

    from tfadv.data import load_mnist, subset

    keras.utils.set_random_seed(args.seed)  # Python, NumPy (ART) and TF (cleverhans)
    model = load_classifier(args.model)
    x, y = load_mnist("embedded", "test")
    x, y = subset(x, y, args.limit, seed=0)  # the split is sorted by class: sample, never slice
    result = measure(model, x, y, batch_size=args.batch_size)
    result["model"] = os.path.abspath(args.model)
    result["seed"] = args.seed
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if result["bar"]["passed"] or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
