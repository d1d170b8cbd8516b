"""The MNIST demo: adversarial training on real MNIST digits, end to end, in a few minutes.

Trains the reference CNN twice on the embedded MNIST split (4,000 training
digits): once cleanly and once with PGD min-max training, through plain
`model.fit`. Then measures both under strong attacks (PGD-40 and APGD-CE at
eps = 0.3, worst case per example), runs the gradient-masking checks, and
draws their robustness curves into one PNG.

    python -m tfadv.demo mnist [--out runs/demo-mnist] [--epochs 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import keras

from tfadv import attacks, files
from tfadv.data import load_mnist, subset
from tfadv.evaluation import (evaluate_robustness, gradient_masking_checks, plot_curve,
                              robustness_curve)
from tfadv.recipes.mnist import MnistTrainConfig, train_mnist

# Not the face demo's runs/demo: each demo keeps its own summary.json.
DEFAULT_OUT = "runs/demo-mnist"


def run(out=DEFAULT_OUT, epochs=5, quick=False) -> dict:
    """Runs the demo; returns the summary it also writes to `out/summary.json`."""
    limit = 400 if quick else None
    eval_limit = 100 if quick else 1000
    curve_limit = 100 if quick else 500
    steps = 2 if quick else 10
    os.makedirs(out, exist_ok=True)
    summary = {"epochs": epochs, "quick": quick, "models": {}}
    curves = []
    x_te, y_te = subset(*load_mnist("embedded", "test"), eval_limit)
    for method in ("standard", "pgd"):
        t0 = time.perf_counter()
        print(f"\n== training the reference CNN: method={method}, {epochs} epochs ==", flush=True)
        cfg = MnistTrainConfig(out=os.path.join(out, method), method=method, epochs=epochs,
                               eps=0.3, steps=steps, step_size=0.04, eval_steps=steps,
                               limit=limit, overwrite=True)
        train_mnist(cfg)
        model = keras.saving.load_model(os.path.join(cfg.out, "model.keras"), safe_mode=True)
        print(f"== evaluating {method}: PGD-40 and APGD-CE at eps=0.3 ==", flush=True)
        strong = [attacks.PGD(eps=0.3, step_size=0.01, steps=8 if quick else 40),
                  attacks.APGD(eps=0.3, steps=8 if quick else 40)]
        res = evaluate_robustness(model, x_te, y_te, strong, progress=True)
        checks = gradient_masking_checks(model, x_te[:200], y_te[:200], eps=0.3, steps=steps)
        curve = robustness_curve(model, *subset(x_te, y_te, curve_limit),
                                 [0.0, 0.1, 0.2, 0.3, 0.4], progress=True)
        curves.append((method, curve))
        summary["models"][method] = {
            **res.to_dict(), "checks_ok": checks.ok, "check_problems": checks.problems,
            "curve": curve, "seconds": round(time.perf_counter() - t0, 1),
        }
    png = plot_curve(curves, os.path.join(out, "robustness_curve.png"),
                     title="MNIST: clean vs PGD adversarial training")
    summary["curve_png"] = png
    files.write_json(os.path.join(out, "summary.json"), summary)

    print("\n== results on the embedded MNIST test split "
          f"({len(y_te)} digits; robust = worst case of PGD-40 and APGD-CE, eps=0.3) ==")
    print(f"{'training':<10} {'clean':>7} {'PGD-40':>7} {'APGD':>7} {'robust':>7} {'checks':>7} {'time':>7}")
    for method, m in summary["models"].items():
        pa = list(m["per_attack"].values())
        print(f"{method:<10} {m['clean_accuracy']:>7.3f} {pa[0]:>7.3f} {pa[1]:>7.3f} "
              f"{m['robust_accuracy']:>7.3f} {'ok' if m['checks_ok'] else 'WARN':>7} "
              f"{m['seconds']:>6.0f}s")
    print(f"\nrobustness curves: {png}\nsummary: {os.path.join(out, 'summary.json')}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(args.out, args.epochs, args.quick)


if __name__ == "__main__":
    main()
