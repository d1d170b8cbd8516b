"""Backdoors on MNIST (embedded split): the study behind reports/poisoning.

For each trigger (BadNets patch, blended pattern) and poison rate (5%, 10% of
the 4,000 training digits, target class 0):

1. a reference CNN trained on the poisoned digits (5 epochs, Adam 1e-3):
   backdoor success (triggered test digits of other classes classified 0)
   and clean accuracy;
2. detection precision and recall of tfadv's spectral signatures and
   activation clustering (`tfadv.poisoning.detect`), and of ART's
   `SpectralSignatureDefense` (told the true poison rate) and
   `ActivationDefence` (its defaults) on the same model and digits;
3. the CNN retrained without the examples tfadv flagged (activation
   clustering, whole claimed groups: `refine=False`): backdoor success and
   clean accuracy again;
4. a PGD-trained CNN (Madry et al., Linf 0.3, PGD-10, 5 epochs) on the same
   poisoned digits: does adversarial training weaken or amplify the backdoor?

Every configuration's result is kept in `--state` and skipped when rerun (a
killed study resumes). Writes `--report`/results.json and report.md.

Usage:
    python studies/poisoning.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = 0


def train(x, y, epochs, seed, method="standard"):
    import keras

    import tfadv
    from tfadv.attacks import PGD
    from tfadv.trainers import AdversarialModel, EpsilonWarmup

    keras.utils.set_random_seed(seed)
    base = tfadv.models.mnist_cnn()
    if method == "standard":
        model = base
        callbacks = []
    else:
        model = AdversarialModel(base, attack=PGD(eps=0.3, step_size=0.04, steps=10))
        callbacks = [EpsilonWarmup(1.0)]
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=50, verbose=0, callbacks=callbacks)
    return base


def backdoor(model, trigger, x_test, y_test):
    """(backdoor success on triggered non-target test digits, clean accuracy)."""
    others = y_test != TARGET
    hit = np.argmax(model.predict(trigger(x_test[others]), verbose=0, batch_size=500), 1)
    clean = np.argmax(model.predict(x_test, verbose=0, batch_size=500), 1)
    return float(np.mean(hit == TARGET)), float(np.mean(clean == y_test))


def scores(flags, truth):
    flags, truth = np.asarray(flags, bool), np.asarray(truth, bool)
    tp = int(np.sum(flags & truth))
    return {"flagged": int(flags.sum()), "true_positives": tp,
            "precision": tp / flags.sum() if flags.sum() else None,
            "recall": tp / truth.sum() if truth.sum() else None}


def groups(found):
    """The share of each group claimed by another class (`class_claims`): the target class's
    two groups, and the highest share among the groups of the other (clean) classes."""
    target = [g["claimed"] for g in found.per_class[TARGET]["groups"]]
    others = [g["claimed"] for c, v in found.per_class.items() if c != TARGET
              for g in v["groups"]]
    return {"target_groups": target, "clean_max": max(others)}


def art_defences(model, x, y, rate):
    import keras
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import TensorFlowV2Classifier

    # ART reads activations of Sequential models only: the same layers (and weights) as one.
    sequential = keras.Sequential([keras.Input((28, 28, 1)), *model.layers[1:]])
    clf = TensorFlowV2Classifier(
        sequential, nb_classes=10, input_shape=(28, 28, 1), clip_values=(0.0, 1.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    onehot = np.eye(10)[y]
    out = {}
    start = time.perf_counter()
    _, clean = SpectralSignatureDefense(clf, x, onehot, expected_pp_poison=rate).detect_poison()
    out["art_spectral"] = (np.asarray(clean) == 0, time.perf_counter() - start)
    start = time.perf_counter()
    _, clean = ActivationDefence(clf, x, onehot).detect_poison(nb_clusters=2, nb_dims=10,
                                                               reduce="PCA")
    out["art_activation_clustering"] = (np.asarray(clean) == 0, time.perf_counter() - start)
    return out


def run_config(trigger_name, rate, args):
    from tfadv.data import load_mnist
    from tfadv.poisoning import BlendTrigger, PatchTrigger, detect, poison

    trigger = {"patch": PatchTrigger(), "blend": BlendTrigger()}[trigger_name]
    x, y = load_mnist("embedded", "train")
    xt, yt = load_mnist("embedded", "test")
    ps = poison(x, y, target=TARGET, rate=rate, trigger=trigger, seed=args.seed)
    t = time.perf_counter()
    model = train(ps.x, ps.y, args.epochs, args.seed)
    result = {"trigger": trigger_name, "rate": rate, "poisoned": int(ps.poisoned.sum()),
              "train_seconds": time.perf_counter() - t}
    result["success"], result["clean_accuracy"] = backdoor(model, trigger, xt, yt)
    detections, found = {}, {}
    for method, refine in (("spectral", True), ("activation_clustering", True),
                           ("activation_clustering", False)):
        t = time.perf_counter()
        name = method if refine else f"{method}, whole groups"
        found[name] = detect(model, ps.x, ps.y, method=method, refine=refine)
        detections[name] = {**scores(found[name].flags, ps.poisoned),
                            "seconds": time.perf_counter() - t,
                            "centre_accuracy": found[name].centre_accuracy,
                            "claims": groups(found[name])}
    # Removal takes the whole claimed groups: a few poisoned digits left keep a backdoor.
    keep = ~found["activation_clustering, whole groups"].flags
    for name, (flags, seconds) in art_defences(model, ps.x, ps.y, rate).items():
        detections[name] = {**scores(flags, ps.poisoned), "seconds": seconds}
    result["detection"] = detections
    cleaned = train(ps.x[keep], ps.y[keep], args.epochs, args.seed)
    result["after_removal"] = dict(zip(("success", "clean_accuracy"),
                                       backdoor(cleaned, trigger, xt, yt)))
    robust = train(ps.x, ps.y, args.epochs, args.seed, method="pgd")
    result["pgd_trained"] = dict(zip(("success", "clean_accuracy"),
                                     backdoor(robust, trigger, xt, yt)))
    if rate == args.rates[0] and trigger_name == "patch":
        result["unpoisoned"] = dict(zip(("success", "clean_accuracy"),
                                        backdoor(train(x, y, args.epochs, args.seed), trigger,
                                                 xt, yt)))
    print(json.dumps(result), flush=True)
    return result


def pct(v):
    return "n/a" if v is None else f"{v:.3f}"


def report(results) -> str:
    rows, det = [], []
    for r in results:
        name = f"{r['trigger']} {r['rate']:.0%}"
        rows.append(f"| {name} | {r['poisoned']} | {r['success']:.3f} | "
                    f"{r['clean_accuracy']:.3f} | {r['after_removal']['success']:.3f} | "
                    f"{r['after_removal']['clean_accuracy']:.3f} | "
                    f"{r['pgd_trained']['success']:.3f} | "
                    f"{r['pgd_trained']['clean_accuracy']:.3f} |")
        for m, d in r["detection"].items():
            claims = d.get("claims")
            why = (f"{' / '.join(f'{v:.2f}' for v in claims['target_groups'])} | "
                   f"{claims['clean_max']:.2f} | {d['centre_accuracy']:.3f}" if claims
                   else "flags a share of every class | | ")
            det.append(f"| {name} | {m} | {d['flagged']} | {pct(d['precision'])} | "
                       f"{pct(d['recall'])} | {d['seconds']:.1f} | {why} |")
    clean = [r["unpoisoned"] for r in results if "unpoisoned" in r]
    return "\n".join([
        "# Backdoors on MNIST (embedded split)", "",
        "Reference CNN, 5 epochs on the 4,000 training digits, target class 0; backdoor "
        "success = triggered test digits of the other classes classified 0 (900 digits).", "",
        "| trigger, rate | poisoned | backdoor success | clean acc | success after removal "
        "| clean acc after | PGD-trained success | PGD-trained clean acc |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "Removal: the examples tfadv's activation clustering flagged with whole groups "
        "(`refine=False`), then retrained from scratch. "
        + (f"Trained on the unpoisoned digits: clean accuracy "
           f"{clean[0]['clean_accuracy']:.3f}, patch success {clean[0]['success']:.3f}."
           if clean else ""), "",
        "Claimed: the share of each group (tfadv splits each class in two) nearer another "
        "class's centre than its own; a group is claimed above 0.5. Target groups: the "
        "target class's two; clean max: the highest of the other classes' groups; centre "
        "accuracy: the share of all digits nearest their own class's centre.", "",
        "| trigger, rate | defence | flagged | precision | recall | seconds | claimed, "
        "target groups | claimed, clean max | centre accuracy |",
        "|---|---|---|---|---|---|---|---|---|", *det, ""])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", default="runs/poisoning")
    p.add_argument("--report", default="reports/poisoning")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10])
    args = p.parse_args(argv)
    os.makedirs(args.state, exist_ok=True)
    from tfadv.files import write_json, write_text

    results = []
    for trigger in ("patch", "blend"):
        for rate in args.rates:
            path = os.path.join(args.state, f"{trigger}-{rate:g}-e{args.epochs}.json")
            if not os.path.exists(path):
                write_json(path, run_config(trigger, rate, args))
            with open(path) as f:
                results.append(json.load(f))
    os.makedirs(args.report, exist_ok=True)
    write_json(os.path.join(args.report, "results.json"), results)
    write_text(os.path.join(args.report, "report.md"), report(results))
    print(report(results))


if __name__ == "__main__":
    main()
