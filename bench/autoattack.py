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

The digits are attacked in chunks (`--chunk`, 100 by default), each chunk by
tfadv and then by ART, so both see the same machine load (process CPU
seconds are recorded too: other processes disturb them less); with `--state
DIR` each finished chunk is saved there and a killed run resumes at the next
one (ART alone needs hours for 1,000 digits on 2 cores). The figures are
summed over the chunks: robust accuracy over all digits, times added up
(tfadv's include its flag checks, run on every chunk).

Usage:
    python bench/autoattack.py runs/mnist-pgd/model.keras --state runs/bench-autoattack
    python bench/autoattack.py MODEL --n 200 --json runs/bench-autoattack.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

EPS = 0.3
STRENGTH_SLACK = 0.005
SPEED_TARGET = 1 / 3


def art_autoattack(model, x, y, eps, batch_size):
    """Per-example robustness (bool [N]) under ART's default AutoAttack; wall and CPU seconds."""
    import tensorflow as tf
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=model, nb_classes=10, input_shape=x.shape[1:], clip_values=(0.0, 1.0),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start, cpu = time.perf_counter(), time.process_time()
    attack = AutoAttack(classifier, norm=np.inf, eps=eps, eps_step=eps / 4,
                        batch_size=batch_size)
    x_adv = attack.generate(x=x, y=y)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert np.abs(x_adv - x).max() <= eps + 1e-5
    pred = np.argmax(classifier.predict(x_adv, batch_size=batch_size), axis=1)
    return pred == y, seconds, cpu


def run_chunk(model, x, y, args):
    """tfadv's cascade, then ART's AutoAttack, on one chunk: a JSON-friendly dict."""
    from tfadv.evaluation.autoattack import autoattack

    start, cpu = time.perf_counter(), time.process_time()
    ours = autoattack(model, x, y, norm="inf", eps=args.eps, batch_size=args.batch_size,
                      progress=True)
    out = {"n": len(y), "tfadv": {**ours.to_dict(), "wall_s": time.perf_counter() - start,
                                  "cpu_s": time.process_time() - cpu,
                                  "robust": [bool(r) for r in ours.correct]}}
    if not args.skip_art:
        robust, seconds, cpu = art_autoattack(model, x, y, args.eps, args.batch_size)
        out["art"] = {"robust": [bool(r) for r in robust], "wall_s": seconds, "cpu_s": cpu}
    return out


def _model_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .keras MNIST classifier (inputs in [0, 1], logits out)")
    p.add_argument("--n", type=int, default=1000, help="first N embedded test digits")
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--chunk", type=int, default=100, help="digits per chunk (tfadv then ART)")
    p.add_argument("--state", default=None,
                   help="directory for finished chunks: a killed run resumes from it")
    p.add_argument("--skip-art", action="store_true", help="run tfadv only")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.n < 1 or args.chunk < 1 or args.batch_size < 1:
        p.error("--n, --chunk and --batch-size must be >= 1")

    import keras

    import tfadv  # registers tfadv's serializable objects
    from tfadv.data import load_mnist
    from tfadv.files import read_json_or_empty, write_json

    model = keras.saving.load_model(args.model, safe_mode=True)
    x, y = load_mnist("embedded", "test")
    x, y = x[: args.n], y[: args.n]
    # A chunk is reused only for the same model file, settings and tfadv version.
    key = {"model": _model_digest(args.model), "eps": args.eps, "batch_size": args.batch_size,
           "tfadv": tfadv.__version__}
    if args.state:
        os.makedirs(args.state, exist_ok=True)
    chunks = []
    for lo in range(0, len(y), args.chunk):
        hi = min(lo + args.chunk, len(y))
        path = args.state and os.path.join(args.state, f"digits_{lo:05d}_{hi:05d}.json")
        saved = read_json_or_empty(path)
        if saved.get("key") != key or ("art" not in saved and not args.skip_art):
            print(f"\ndigits {lo}-{hi - 1} of {len(y)}", flush=True)
            saved = {"key": key, **run_chunk(model, x[lo:hi], y[lo:hi], args)}
            if path:
                write_json(path, saved)
        chunks.append(saved)
    ours_robust = np.concatenate([c["tfadv"]["robust"] for c in chunks])
    ours_s = sum(c["tfadv"]["wall_s"] for c in chunks)
    ours_cpu = sum(c["tfadv"]["cpu_s"] for c in chunks)
    clean = sum(c["tfadv"]["clean_accuracy"] * c["n"] for c in chunks) / len(y)
    out = {"n": len(y), "eps": args.eps, "chunks": len(chunks),
           "tfadv": {"clean_accuracy": float(clean),
                     "robust_accuracy": float(ours_robust.mean()), "wall_s": ours_s,
                     "cpu_s": ours_cpu,
                     "seconds": {a: sum(c["tfadv"]["seconds"].get(a, 0.0) for c in chunks)
                                 for a in chunks[0]["tfadv"]["seconds"]},
                     "flags": [f"digits {lo}-{lo + c['n'] - 1}: {f}" for lo, c in
                               zip(range(0, len(y), args.chunk), chunks)
                               for f in c["tfadv"]["flags"]]}}
    flags = "; ".join(out["tfadv"]["flags"]) or "none"
    print(f"\ntfadv AutoAttack on {len(y)} digits: clean {clean:.4f}, robust "
          f"{ours_robust.mean():.4f}, {ours_s:.0f} s; flags: {flags}")
    missed = []
    if not args.skip_art:
        art_robust = np.concatenate([c["art"]["robust"] for c in chunks])
        art_acc, art_s = float(art_robust.mean()), sum(c["art"]["wall_s"] for c in chunks)
        art_cpu = sum(c["art"]["cpu_s"] for c in chunks)
        out["art"] = {"robust_accuracy": art_acc, "wall_s": art_s, "cpu_s": art_cpu}
        strength = float(ours_robust.mean()) - art_acc
        speed = ours_s / art_s
        out["strength_difference"] = strength
        out["time_ratio"] = speed
        out["cpu_time_ratio"] = ours_cpu / art_cpu
        out["only_art_broke"] = int(np.sum(ours_robust & ~art_robust))
        out["only_tfadv_broke"] = int(np.sum(~ours_robust & art_robust))
        print(f"\nrobust accuracy: tfadv {ours_robust.mean():.4f}  ART {art_acc:.4f}  "
              f"difference {strength:+.4f} (target <= +{STRENGTH_SLACK}); digits only ART "
              f"broke: {out['only_art_broke']}, only tfadv broke: {out['only_tfadv_broke']}")
        print(f"wall time: tfadv {ours_s:.1f} s  ART {art_s:.1f} s  ratio {speed:.3f} "
              f"(target <= {SPEED_TARGET:.3f}; {speed / SPEED_TARGET:.2f}x the limit); CPU "
              f"time: tfadv {ours_cpu:.0f} s  ART {art_cpu:.0f} s  ratio "
              f"{out['cpu_time_ratio']:.3f}")
        if strength > STRENGTH_SLACK:
            missed.append("strength")
        if speed > SPEED_TARGET:
            missed.append("speed")
    if args.json:
        write_json(args.json, out)
    if missed:
        print("MISSED:", ", ".join(missed))
        if args.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
