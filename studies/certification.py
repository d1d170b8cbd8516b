"""Certified robustness on MNIST (embedded split): the study behind reports/certification.

Trains three base models for randomized smoothing (Gaussian augmentation at
sigma 0.25 and 0.5, SmoothAdv at sigma 0.5), certifies a random sample of test digits
with CERTIFY (Cohen et al. 2019), and checks every certificate against two
attacks:

- the smoothed classifier itself attacked: PGD on its soft version (Salman
  et al.'s SmoothAdv attack, m fixed noise draws), judged by PREDICT. A
  digit certified at radius r cannot be broken within r, so the certified
  accuracy must not exceed this empirical accuracy (up to alpha);
- the Linf-PGD-trained model's AutoAttack L2 accuracy at the same radii (the
  issue's reference point: another model, so no inequality is implied).

Every step keeps its result in `--state` and is skipped when rerun, so a
killed study resumes. Writes `--report`/results.json, report.md and curves.png.

Usage:
    python studies/certification.py [--n 10000] [--n-test 500] [--attack-n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "gaussian-025": dict(method="gaussian", noise_sigma=0.25),
    "gaussian-050": dict(method="gaussian", noise_sigma=0.5),
    "smoothadv-050": dict(method="smoothadv", noise_sigma=0.5, noise_samples=2, step_size=0.5,
                          steps=4),
}
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
ATTACK_RADII = (0.25, 0.5, 1.0, 1.5, 2.0)


def cached(path, compute):
    """compute() once: its JSON result is kept at path (a rerun reads it)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    from tfadv.files import write_json

    write_json(path, result)
    return result


def train(state, name, settings):
    from tfadv.config.mnist import MnistTrainConfig
    from tfadv.recipes.mnist import train_mnist

    out = os.path.join(state, name)
    if not os.path.exists(os.path.join(out, "metrics.json")):
        train_mnist(MnistTrainConfig(out=out, epochs=20, val_limit=500, norm="2", eps=1.0,
                                     verbose=2, **settings))
    return os.path.join(out, "model.keras")


def certify(path, sigma, x, y, args):
    from tfadv.certification import RandomizedSmoothing, certified_accuracy
    from tfadv.models.saved import load_saved

    model = load_saved(path)
    smoothed = RandomizedSmoothing(model, sigma, 10, batch_size=1000, seed=0)
    start = time.perf_counter()
    labels, radii = smoothed.certify(x, n0=100, n=args.n, alpha=args.alpha, progress=True)
    return {"seconds": time.perf_counter() - start, "labels": labels.tolist(),
            "radii": radii.tolist(),
            "certified_accuracy": {f"{r:g}": a for r, a in
                                   certified_accuracy(labels, radii, y, RADII).items()}}


def attack_smoothed(path, sigma, x, y, args):
    """Empirical accuracy of the smoothed classifier under SmoothAdv's attack, per radius."""
    import tensorflow as tf

    from tfadv.attacks import PGD
    from tfadv.certification import RandomizedSmoothing
    from tfadv.models.saved import load_saved
    from tfadv.trainers import noise

    model = load_saved(path)
    smoothed = RandomizedSmoothing(model, sigma, 10, batch_size=1000, seed=1)
    out = {}
    for r in ATTACK_RADII:
        attack = PGD(eps=r, steps=20, step_size=2.5 * r / 20, norm="2", random_start=False)
        adv = []
        for i in range(0, len(x), 50):
            xb = tf.constant(x[i:i + 50])
            draws = noise.gaussian_noise(xb, sigma, args.draws)
            adv.append(noise.smoothed_pgd(attack, model, xb, y[i:i + 50], draws,
                                          args.draws).numpy())
        pred = smoothed.predict(np.concatenate(adv), n=args.predict_n, alpha=args.alpha)
        out[f"{r:g}"] = float(np.mean(pred == y))
        print(f"  smoothed attack r={r:g}: accuracy {out[f'{r:g}']:.3f}", flush=True)
    return out


def autoattack_l2(path, x, y):
    from tfadv.evaluation.autoattack import autoattack
    from tfadv.models.saved import load_saved

    model = load_saved(path)
    out = {}
    for r in ATTACK_RADII:
        result = autoattack(model, x, y, norm="2", eps=r, batch_size=500)
        out[f"{r:g}"] = {"robust_accuracy": result.robust_accuracy,
                         "clean_accuracy": result.clean_accuracy,
                         "flags": [str(f) for f in result.flags]}
        print(f"  AutoAttack L2 r={r:g}: {result.robust_accuracy:.3f}", flush=True)
    return out


def report(results, args) -> str:
    names = list(MODELS)
    head = "| L2 radius | " + " | ".join(f"{m} certified" for m in names) + \
        " | PGD-trained (Linf 0.3) AutoAttack L2 |"
    rows = []
    for r in RADII:
        k = f"{r:g}"
        cells = [f"{results[m]['certify']['certified_accuracy'][k]:.3f}"
                 for m in names]
        aa = results["pgd_autoattack_l2"].get(k)
        rows.append(f"| {k} | " + " | ".join(cells) + f" | "
                    f"{'' if aa is None else format(aa['robust_accuracy'], '.3f')} |")
    checks = []
    for m in names:
        for k, emp in results[m]["attack"].items():
            cert = results[m]["certify_attack_n"][k]
            verdict = "holds" if cert <= emp else "VIOLATED"
            checks.append(f"| {m} | {k} | {cert:.3f} | {emp:.3f} | {verdict} |")
    return "\n".join([
        "# Certified robustness on MNIST (embedded split)",
        "",
        f"Randomized smoothing (Cohen et al. 2019), CERTIFY with n0 = 100, n = {args.n:,}, "
        f"alpha = {args.alpha:g}, on {args.n_test} test digits drawn at random (seed 0); "
        "base models: "
        "the reference CNN trained 20 epochs on the 4,000 embedded training digits.",
        "",
        head, "|" + "---|" * (len(names) + 2), *rows, "",
        f"With n = {args.n:,} the largest radius CERTIFY can give is sigma * "
        "Phi^-1(alpha^(1/n)): "
        + ", ".join(f"{s:g} -> {s * _max_z(args):.2f}" for s in (0.25, 0.5)) + ".",
        "",
        "## Every certificate against an attack on the smoothed classifier",
        "",
        f"The sample's first {args.attack_n} digits: PGD-20 on the smoothed soft classifier "
        f"({args.draws} fixed noise draws, Salman et al.'s attack), judged by PREDICT "
        f"(n = {args.predict_n:,}, abstentions count as errors). A certified digit cannot "
        "be broken inside its radius: certified <= empirical must hold.",
        "",
        "| model | L2 radius | certified | empirical (attacked) | check |", "|---|---|---|---|---|",
        *checks, "",
        "Seconds per model (CERTIFY): " + ", ".join(
            f"{m} {results[m]['certify']['seconds']:.0f} s" for m in names) + ".",
    ])


def _max_z(args):
    from scipy.stats import norm

    return float(norm.ppf(args.alpha ** (1.0 / args.n)))


def plot(results, path):
    from tfadv.certification import certified_accuracy
    from tfadv.evaluation.robustness import plot_curve

    grid = np.linspace(0, 2.0, 41)
    curves = []
    for m in MODELS:
        c = results[m]["certify"]
        acc = certified_accuracy(c["labels"], c["radii"], results["y"], grid)
        curves.append((m, {"eps": list(grid), "accuracy": list(acc.values())}))
    aa = results["pgd_autoattack_l2"]
    curves.append(("PGD-trained, AutoAttack L2",
                   {"eps": [float(k) for k in aa], "accuracy": [v["robust_accuracy"]
                                                               for v in aa.values()]}))
    plot_curve(curves, path, title="MNIST: certified accuracy", xlabel="L2 radius", marker=None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", default="runs/smoothing")
    p.add_argument("--report", default="reports/certification")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=250)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--attack-n", type=int, default=100)
    p.add_argument("--draws", type=int, default=16, help="noise draws of the smoothed attack")
    p.add_argument("--predict-n", type=int, default=1000)
    p.add_argument("--pgd-model", default="runs/mnist-pgd/model.keras",
                   help="the Linf-PGD-trained model (tfadv train mnist --method pgd)")
    args = p.parse_args(argv)

    from tfadv.certification import certified_accuracy
    from tfadv.data import load_mnist, subset

    # A random sample (the split is sorted by label: its first digits are zeros and ones);
    # the attacks take the sample's first digits.
    x, y = subset(*load_mnist("embedded", "test"), args.n_test, seed=0)
    results = {"y": y.tolist()}
    for name, settings in MODELS.items():
        print(f"{name}: training", flush=True)
        path = train(args.state, name, settings)
        sigma = settings["noise_sigma"]
        print(f"{name}: certifying", flush=True)
        state = os.path.join(args.state, name)
        cert = cached(os.path.join(state, f"certify-n{args.n}-r{args.n_test}-a{args.alpha:g}.json"),
                      lambda: certify(path, sigma, x, y, args))
        print(f"{name}: attacking the smoothed classifier", flush=True)
        attacked = cached(os.path.join(
            state, f"attack-r{args.attack_n}-m{args.draws}-p{args.predict_n}.json"),
                          lambda: attack_smoothed(path, sigma, x[:args.attack_n],
                                                  y[:args.attack_n], args))
        k = args.attack_n
        on_attacked = certified_accuracy(cert["labels"][:k], cert["radii"][:k], y[:k],
                                         ATTACK_RADII)
        results[name] = {"certify": cert, "attack": attacked,
                         "certify_attack_n": {f"{r:g}": a for r, a in on_attacked.items()},
                         "train": json.load(open(os.path.join(args.state, name,
                                                              "metrics.json")))["test"]}
    print("PGD-trained model: AutoAttack L2", flush=True)
    results["pgd_autoattack_l2"] = cached(
        os.path.join(args.state, f"pgd-autoattack-l2-r{args.attack_n}.json"),
        lambda: autoattack_l2(args.pgd_model, x[:args.attack_n], y[:args.attack_n]))
    os.makedirs(args.report, exist_ok=True)
    from tfadv.files import write_json, write_text

    summary = {k: v for k, v in results.items() if k != "y"}
    for m in MODELS:
        summary[m] = {**summary[m], "certify": {k: v for k, v in summary[m]["certify"].items()
                                                if k not in ("labels", "radii")}}
    summary["settings"] = vars(args)
    write_json(os.path.join(args.report, "results.json"), summary)
    write_text(os.path.join(args.report, "report.md"), report(results, args) + "\n")
    plot(results, os.path.join(args.report, "curves.png"))
    print(report(results, args))


if __name__ == "__main__":
    main()
