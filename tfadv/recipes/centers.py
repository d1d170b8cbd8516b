"""The centres study: can inverse adversaries stand in for center-loss centres?

Four models of one architecture on MNIST:

- A: softmax + center loss (learned centres, Wen et al. 2016);
- B: softmax only;
- C: softmax + center loss toward inverse-adversary centres (per batch,
  the mean feature of each class's inverse adversaries: Dong et al. 2023);
- D: PGD adversarial training + center loss.

For each model it extracts the per-class vectors (inverse-adversary centres,
UIAT centres, clean centres, learned centres, classifier weights), compares
every pair by cosine similarity and MSE, measures intra-class variance and
inter-class separation, clean and robust accuracy, and writes `results.json`,
`report.md` and figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np

from tfadv.config import CENTER_TARGETS

from tfadv.config.centers import MODELS, CentersStudyConfig  # noqa: F401 (re-exported)


def _compile(model, cfg, steps_per_epoch):
    import keras

    from tfadv.trainers.schedules import CyclicLR, sgd_nesterov

    schedule = CyclicLR(cfg.max_lr, total_steps=max(1, steps_per_epoch * cfg.epochs),
                        mode=cfg.lr_mode)
    model.compile(
        optimizer=sgd_nesterov(schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def build_study_model(name, cfg):
    """The training model of study model `name` ("A".."D"), not yet compiled."""
    import tfadv
    from tfadv.attacks import PGD
    from tfadv.config import CenterLossConfig

    base = tfadv.models.mnist_feature_net(feature_dim=cfg.feature_dim, arch=cfg.arch,
                                          name=f"model_{name}")
    center = dict(weight=cfg.center_weight, alpha=cfg.center_alpha,
                  inverse_eps=cfg.inverse_eps, inverse_step_size=cfg.inverse_step_size,
                  inverse_steps=cfg.inverse_steps)
    # Robust validation each epoch (PGD-10) only for the adversarially trained
    # model: A-C are not trained for it, and their final analysis measures it.
    eval_attack = PGD(eps=cfg.robust_eps, steps=10, step_size=2.5 * cfg.robust_eps / 10)
    if name == "A":
        return tfadv.AdversarialModel(base, method="standard",
                                      center_loss=CenterLossConfig(**center))
    if name == "B":
        return tfadv.AdversarialModel(base, method="standard")
    if name == "C":
        return tfadv.AdversarialModel(
            base, method="standard",
            center_loss=CenterLossConfig(centers="inverse_batch", **center))
    attack = PGD(eps=cfg.adv_eps, steps=cfg.adv_steps, step_size=cfg.adv_step_size)
    return tfadv.AdversarialModel(base, attack=attack, method="pgd", eval_attack=eval_attack,
                                  center_loss=CenterLossConfig(on=cfg.adv_center_on, **center))


# Settings only the adversarially trained model D uses.
_D_ONLY = ("adv_eps", "adv_steps", "adv_step_size", "adv_clean_epochs", "adv_warmup_epochs",
           "adv_center_on")


def _run_key(cfg, name) -> dict:
    # Everything that changes model `name`'s results (not where they go, which
    # models run, or the settings of another model only).
    key = dataclasses.asdict(cfg)
    key.pop("out", None)
    key.pop("models", None)
    if name != "D":
        for field in _D_ONLY:
            key.pop(field, None)
    return json.loads(json.dumps(key, default=str))


def _same_run(saved_key, name, cfg) -> bool:
    if not isinstance(saved_key, dict):
        return False
    if name != "D":  # kept by a version whose keys also held D's settings
        saved_key = {k: v for k, v in saved_key.items() if k not in _D_ONLY}
    key = _run_key(cfg, name)
    # A key written before a setting existed was made with that setting's default.
    defaults = json.loads(json.dumps(
        {f.name: f.default for f in dataclasses.fields(cfg)
         if f.default is not dataclasses.MISSING}, default=str))
    saved_key = {**{k: defaults[k] for k in key if k not in saved_key and k in defaults},
                 **saved_key}
    return saved_key == key


def save_model_results(done_dir, name, cfg, results, kinds, features) -> None:
    """Keeps one finished model's results, so a killed study resumes after it."""
    os.makedirs(done_dir, exist_ok=True)
    base = os.path.join(done_dir, name)
    np.savez(base + ".tmp.npz", features=features, **{f"kind_{k}": v for k, v in kinds.items()})
    with open(base + ".tmp.json", "w") as f:
        json.dump({"key": _run_key(cfg, name), "results": results}, f, default=float)
    os.replace(base + ".tmp.npz", base + ".npz")
    os.replace(base + ".tmp.json", base + ".json")  # last: marks the model done


def load_model_results(done_dir, name, cfg):
    """(results, kinds, features) of a model finished with the same settings, else None."""
    base = os.path.join(done_dir, name)
    if not (os.path.exists(base + ".json") and os.path.exists(base + ".npz")):
        return None
    with open(base + ".json") as f:
        saved = json.load(f)
    if not _same_run(saved.get("key"), name, cfg):
        return None
    arrays = np.load(base + ".npz")
    kinds = {k[len("kind_"):]: arrays[k] for k in arrays.files if k.startswith("kind_")}
    return saved["results"], kinds, arrays["features"]


def model_backup(out, name, cfg):
    """A `BackupAndRestore` for study model `name`: a killed run resumes mid-training.

    A backup written with other settings is discarded rather than restored.
    """
    from tfadv.trainers.callbacks import backup_and_restore

    path = os.path.join(out, "backup", name)
    key_file = os.path.join(path, "run_key.json")
    key = _run_key(cfg, name)
    if os.path.isdir(path):
        try:
            with open(key_file) as f:
                same = _same_run(json.load(f), name, cfg)
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(key_file, "w") as f:
        json.dump(key, f)
    return backup_and_restore(path, delete_checkpoint=False)


# The attacks of the robust accuracy, run in this order, each on the test
# digits that every earlier one left correctly classified (as AutoAttack does).
# The PGD-40 and APGD-CE both ascend the cross-entropy, whose gradient
# vanishes in float32 once a model is very confident (measured: softmax-only
# LeNets++ kept 0.20 "robust" accuracy under both); the DLR and margin
# objectives do not saturate, so the worst case of all four is reported.
ROBUST_ATTACKS = ("pgd_ce", "apgd_ce", "apgd_dlr", "pgd_margin")


def robust_attacks(cfg) -> dict:
    from tfadv.attacks import APGD, PGD

    eps, steps = cfg.robust_eps, cfg.robust_steps
    return {
        "pgd_ce": PGD(eps=eps, step_size=2.5 * eps / steps, steps=steps),
        "apgd_ce": APGD(eps=eps, steps=steps),
        "apgd_dlr": APGD(eps=eps, steps=steps, objective="dlr"),
        "pgd_margin": PGD(eps=eps, step_size=2.5 * eps / steps, steps=steps,
                          objective="margin"),
    }


def robust_results(base, x_te, y_te, cfg) -> dict:
    """Clean accuracy and worst-case robust accuracy under `ROBUST_ATTACKS`.

    Returns a dict with "clean_accuracy", "robust_accuracy" (correct under
    every attack) and "robust_after" (attack name -> accuracy left after it
    and every earlier attack; the last equals "robust_accuracy").
    """
    from tfadv.evaluation import evaluate_robustness

    x_te, y_te = np.asarray(x_te), np.asarray(y_te)
    robust = np.asarray(evaluate_robustness(base, x_te, y_te, []).correct, bool)
    clean = float(robust.mean())
    after = {}
    for name, attack in robust_attacks(cfg).items():
        idx = np.flatnonzero(robust)
        if len(idx):
            rob = evaluate_robustness(base, x_te[idx], y_te[idx], attack)
            robust[idx] = np.asarray(rob.correct, bool)
        after[name] = float(robust.mean())
    return {"clean_accuracy": clean, "robust_accuracy": float(robust.mean()),
            "robust_after": after}


def analyse_model(model, base, x_tr, y_tr, x_te, y_te, cfg) -> tuple[dict, dict, np.ndarray]:
    """Centres of every kind, their comparison, geometry and accuracy of one model.

    Returns:
        (results dict, {kind: [K, D] centres}, test features).
    """
    from tfadv.attacks import InversePGD
    from tfadv.evaluation import centers as C

    inverse = InversePGD(eps=cfg.inverse_eps, step_size=cfg.inverse_step_size,
                         steps=cfg.inverse_steps)
    kinds = {
        "inverse": C.extract_centers(base, (x_tr, y_tr), attack=inverse)[0],
        "clean": C.extract_centers(base, (x_tr, y_tr))[0],
        "weights": C.classifier_weights(base),
    }
    if cfg.uiat:
        deltas = C.universal_inverse_perturbations(
            base, (x_tr, y_tr), eps=cfg.inverse_eps, step_size=cfg.inverse_step_size,
            epochs=cfg.uiat_epochs)
        kinds["uiat"] = C.extract_centers(base, (x_tr, y_tr), deltas=deltas)[0]
    if getattr(model, "center_cfg", None) is not None and model.center_cfg.centers == "learned":
        kinds["learned"] = model.centers.centers.numpy()

    f_te = C.features_of(base, x_te)
    test_clean = C.extract_centers(base, (x_te, y_te))[0]
    sep = C.inter_class_separation(test_clean)
    intra = C.intra_class_variance(f_te, y_te, test_clean)
    results = {
        **robust_results(base, x_te, y_te, cfg),
        "intra_class_variance": intra,
        "inter_class_separation": sep,
        # Scale-free compactness: center loss shrinks features, softmax grows them.
        "variance_to_separation": intra / max(sep["mean"] ** 2, 1e-12),
        "comparisons": C.compare_centers(kinds),
        "centers": {k: v.tolist() for k, v in kinds.items()},
    }
    return results, kinds, f_te


def _figures(out, per_model, feats, kinds_by_model, y_te):
    from matplotlib.figure import Figure

    from tfadv.evaluation import centers as C

    paths = {}
    names = list(per_model)
    fig = Figure(figsize=(4.2 * len(names), 4), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    markers = {"clean": "o", "inverse": "*", "uiat": "P", "learned": "X", "weights": "^"}
    for ax, name in zip(axes, names):
        f = feats[name]
        proj = None
        if f.shape[1] > 2:  # PCA to the plane for the drawing only
            mu = f.mean(0)
            _, _, vt = np.linalg.svd(f - mu, full_matrices=False)
            proj = lambda v, mu=mu, vt=vt: (np.asarray(v) - mu) @ vt[:2].T  # noqa: E731
        p = proj or (lambda v: np.asarray(v))
        pts = p(f)
        ax.scatter(pts[:, 0], pts[:, 1], c=y_te, cmap="tab10", s=4, alpha=0.5)
        for kind, vec in kinds_by_model[name].items():
            v = p(vec)
            if kind == "weights":  # directions: scale to the feature cloud
                scale = np.abs(pts).max() / max(np.abs(v).max(), 1e-12)
                v = v * scale
            ax.scatter(v[:, 0], v[:, 1], marker=markers.get(kind, "s"), s=90,
                       edgecolors="k", c=np.arange(len(v)), cmap="tab10", label=kind)
        ax.set_title(f"Model {name}: {MODELS[name]}", fontsize=8)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    paths["features"] = os.path.join(out, "features.png")
    fig.savefig(paths["features"])

    pairs = [("inverse", "learned"), ("inverse", "clean"), ("inverse", "weights")]
    rows = [(n, a, b) for n in names for a, b in pairs if b in kinds_by_model[n]]
    fig = Figure(figsize=(2.6 * len(rows), 2.8), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, len(rows)))
    for ax, (n, a, b) in zip(axes, rows):
        m = C.cosine_matrix(kinds_by_model[n][a], kinds_by_model[n][b])
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(f"{n}: {a} vs {b}", fontsize=7)
        ax.set_xlabel(b, fontsize=6)
        ax.set_ylabel(a, fontsize=6)
        ax.tick_params(labelsize=5)
    fig.colorbar(im, ax=list(axes), shrink=0.7)
    paths["cosine_heatmaps"] = os.path.join(out, "cosine_heatmaps.png")
    fig.savefig(paths["cosine_heatmaps"])
    return paths


def _accuracy_se(acc, n):
    """Standard error of an accuracy measured on n examples."""
    return float(np.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1)))


# Clean accuracy below which a LeNets++ on MNIST has not converged: the full
# setting's models A-C reach 0.92-0.95 (reports/centers); comparing the centres
# of models still far from that says nothing about the question.
CONVERGED = 0.9


def _verdict(per_model) -> list[str]:
    """Statements that follow from the measured numbers (nothing else)."""
    lines = []
    n_test = per_model.get("_n", {}).get("test", 0)
    failed = [m for m, r in per_model.items()
              if not m.startswith("_") and r["clean_accuracy"] < 0.2]
    for m in failed:
        lines.append(
            f"Model {m} did not learn (clean accuracy {per_model[m]['clean_accuracy']:.3f}, about "
            "chance): its centres and robust accuracy say nothing; train longer or with a "
            "smaller budget before reading them.")
    if "A" in per_model:
        comp = per_model["A"]["comparisons"]
        il = comp.get("inverse vs learned")
        ic = comp.get("inverse vs clean")
        cl = comp.get("clean vs learned")
        if il and ic and cl:
            lines.append(
                f"In Model A, inverse-adversary centres point where the learned centres do "
                f"(mean cosine {il['cosine_mean']:.3f}, MSE {il['mse_mean']:.4g}); but so do "
                f"the plain clean centres (clean vs learned: cosine {cl['cosine_mean']:.3f}, "
                f"MSE {cl['mse_mean']:.4g}), and inverse vs clean is {ic['cosine_mean']:.3f}.")
            if il["mse_mean"] < cl["mse_mean"]:
                lines.append("Inverse-adversary centres are closer to the learned centres than "
                             "the clean centres are (lower MSE).")
            else:
                lines.append("Inverse-adversary centres are no closer to the learned centres "
                             "than the clean centres are (MSE not lower).")
    if "A" in per_model and "C" in per_model:
        a, c = per_model["A"], per_model["C"]
        dacc = c["clean_accuracy"] - a["clean_accuracy"]
        dvar = c["variance_to_separation"] / max(a["variance_to_separation"], 1e-12)
        noise = 2 * np.hypot(_accuracy_se(a["clean_accuracy"], n_test),
                             _accuracy_se(c["clean_accuracy"], n_test))
        # No measurable accuracy loss: within a point, or within two standard errors.
        acc_ok = dacc >= -0.01 or abs(dacc) < noise
        can = acc_ok and dvar <= 1.25
        lines.append(
            f"Model C (inverse centres in the loss) vs Model A (learned centres): clean accuracy "
            f"{c['clean_accuracy']:.3f} vs {a['clean_accuracy']:.3f}, variance/separation "
            f"{c['variance_to_separation']:.4f} vs {a['variance_to_separation']:.4f} "
            f"({dvar:.2f}x), robust accuracy {c['robust_accuracy']:.3f} vs "
            f"{a['robust_accuracy']:.3f}.")
        if abs(dacc) < noise:
            lines.append(f"The accuracy difference ({dacc:+.3f}) is within noise: two standard "
                         f"errors on {n_test} test digits are {noise:.3f}.")
        undertrained = [m for m in ("A", "C") if per_model[m]["clean_accuracy"] < CONVERGED]
        if "A" in failed or "C" in failed:
            lines.append("Answer: none: Model A or C did not learn in this setting.")
        elif undertrained:
            lines.append(
                "Answer: undecided: this setting is too small to decide. Model(s) "
                + ", ".join(f"{m} ({per_model[m]['clean_accuracy']:.3f} clean)"
                            for m in undertrained)
                + f" stopped below {CONVERGED:.2f} clean accuracy, where the full setting's "
                "softmax models reach 0.92-0.95; compare centres of converged models (run "
                "the full setting).")
        else:
            lines.append(
                "Answer: on this evidence inverse adversaries CAN replace the learned centres "
                "(no measurable accuracy loss, compactness within 25%)." if can else
                "Answer: on this evidence inverse adversaries can NOT simply replace the learned "
                "centres (" + ("compactness more than 25% worse" if acc_ok else
                               "accuracy measurably lower") + ").")
    for m, r in per_model.items():
        ce = r.get("robust_after", {}).get("apgd_ce") if not m.startswith("_") else None
        if ce is not None and ce - r["robust_accuracy"] > 0.05:
            lines.append(
                f"Model {m}: the cross-entropy attacks (PGD, APGD-CE) leave {ce:.3f} robust "
                f"accuracy, the DLR and margin attacks then {r['robust_accuracy']:.3f}: its "
                "saturated softmax hides the CE gradient (gradient masking), so CE attacks "
                "alone overstate its robustness.")
    if "D" in per_model and "A" in per_model and "D" not in failed:
        a, d = per_model["A"], per_model["D"]
        lines.append(
            f"Model D (PGD + center loss) buys robust accuracy {d['robust_accuracy']:.3f} "
            f"(A: {a['robust_accuracy']:.3f}) at clean accuracy {d['clean_accuracy']:.3f} "
            f"(A: {a['clean_accuracy']:.3f}); variance/separation {d['variance_to_separation']:.4f}"
            f" (A: {a['variance_to_separation']:.4f}).")
        comp = d["comparisons"]
        il, cl = comp.get("inverse vs learned"), comp.get("clean vs learned")
        if il and cl:
            lines.append(
                f"In Model D too, the inverse-adversary centres are "
                f"{'no closer to' if il['mse_mean'] >= cl['mse_mean'] else 'closer to'} the "
                f"learned centres than the clean centres are (MSE {il['mse_mean']:.4g} vs "
                f"{cl['mse_mean']:.4g}).")
    return lines


def _report(cfg, per_model, figures, seconds) -> str:
    lines = ["# Inverse-adversary centres vs center-loss centres: results", ""]
    lines += [f"Data: MNIST `{cfg.data}` (train {per_model['_n']['train']}, test "
              f"{per_model['_n']['test']}); architecture `{cfg.arch}`, {cfg.feature_dim}-d "
              f"features; {cfg.epochs} epochs of SGD (Nesterov {cfg.momentum}, weight decay "
              f"{cfg.weight_decay}, {cfg.lr_mode} LR, max {cfg.max_lr}); center loss lambda "
              f"{cfg.center_weight}, alpha {cfg.center_alpha}; InversePGD eps' "
              f"{cfg.inverse_eps:.4f}, {cfg.inverse_steps} steps of {cfg.inverse_step_size:.4f}. "
              f"Robust accuracy: worst case per test digit of PGD-{cfg.robust_steps} (CE), "
              f"APGD-CE, APGD-DLR and PGD (margin loss), {cfg.robust_steps} steps each, at Linf "
              f"eps {cfg.robust_eps}.", ""]
    trained = {m: r.get("train_seconds") for m, r in per_model.items()
               if not m.startswith("_") and r.get("train_seconds")}
    if trained:
        lines += ["Training time (all epochs, also those of a killed and resumed run): "
                  + ", ".join(f"{m} {t / 60:.0f} min" for m, t in trained.items())
                  + f". This report was written in {seconds:.0f} s (models finished by an "
                  "earlier run are loaded from `models_done/`, not retrained).", ""]
    if "D" in per_model:
        lines += [f"Model D trains on PGD-{cfg.adv_steps} adversarial examples (Linf eps "
                  f"{cfg.adv_eps}, step {cfg.adv_step_size}, random start) with center loss on "
                  f"{'clean and adversarial' if cfg.adv_center_on == 'both' else cfg.adv_center_on} "
                  f"features; the budget is 0 for the first "
                  f"{cfg.adv_clean_epochs:g} epochs, then ramps linearly to eps over "
                  f"{cfg.adv_warmup_epochs:g} epochs.", ""]
    models = [m for m in per_model if not m.startswith("_")]
    lines += ["## Models", "", "| model | training | clean acc | robust acc (worst) | intra-class var | "
              "mean centre distance | var / dist^2 |", "|---|---|---|---|---|---|---|"]
    for m in models:
        r = per_model[m]
        lines.append(f"| {m} | {MODELS[m]} | {r['clean_accuracy']:.3f} | {r['robust_accuracy']:.3f}"
                     f" | {r['intra_class_variance']:.4g} | {r['inter_class_separation']['mean']:.4g}"
                     f" | {r['variance_to_separation']:.4f} |")
    names = [a for a in ROBUST_ATTACKS if all(a in per_model[m].get("robust_after", {})
                                              for m in models)]
    if names:
        lines += ["", f"Robust accuracy left after each attack and every earlier one (eps "
                  f"{cfg.robust_eps}, {cfg.robust_steps} steps; each attack runs on the digits "
                  "the earlier ones did not break):", "",
                  "| model | clean | " + " | + ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for m in models:
            r = per_model[m]
            lines.append(f"| {m} | {r['clean_accuracy']:.3f} | "
                         + " | ".join(f"{r['robust_after'][a]:.3f}" for a in names) + " |")
    lines.append("")
    for m in models:
        lines += [f"## Model {m}: centre comparisons (mean ± std over classes)", "",
                  "| pair | cosine | MSE |", "|---|---|---|"]
        for pair, v in per_model[m]["comparisons"].items():
            lines.append(f"| {pair} | {v['cosine_mean']:.3f} ± {v['cosine_std']:.3f} | "
                         f"{v['mse_mean']:.4g} ± {v['mse_std']:.2g} |")
        lines.append("")
    lines += ["## What the numbers say", ""] + [f"- {s}" for s in _verdict(per_model)] + [""]
    lines += ["## Figures", ""] + [f"![{k}]({os.path.basename(p)})" for k, p in figures.items()]
    return "\n".join(lines) + "\n"


def run_centers_study(cfg: CentersStudyConfig, progress=True) -> dict:
    """Trains the study's models, analyses them and writes the report. Returns results."""
    import keras

    from tfadv.data import mnist as mnist_data
    from tfadv.trainers import EpsilonWarmup
    from tfadv.trainers.callbacks import EpochSeconds, JSONHistory

    t0 = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    # Before any pipeline exists: a tf.data shuffle order depends on the global seed.
    keras.utils.set_random_seed(cfg.seed)
    x_tr, y_tr = mnist_data.load_mnist(cfg.data, "train", cfg.data_dir)
    x_te, y_te = mnist_data.load_mnist(cfg.data, "test", cfg.data_dir)
    x_tr, y_tr = mnist_data.subset(x_tr, y_tr, cfg.limit, cfg.seed)
    x_te, y_te = mnist_data.subset(x_te, y_te, cfg.eval_limit, cfg.seed)
    train_ds = mnist_data.to_dataset(x_tr, y_tr, batch_size=cfg.batch_size, shuffle=True,
                                     seed=cfg.seed)
    x_val, y_val = mnist_data.subset(x_te, y_te, cfg.val_limit, cfg.seed)
    val_ds = mnist_data.to_dataset(x_val, y_val, batch_size=500)
    steps = int(np.ceil(len(x_tr) / cfg.batch_size))
    per_model, feats, kinds_by_model = {"_n": {"train": len(x_tr), "test": len(x_te)}}, {}, {}
    done_dir = os.path.join(cfg.out, "models_done")
    for name in cfg.models:
        saved = load_model_results(done_dir, name, cfg)
        model_file = os.path.join(cfg.out, f"model_{name}.keras")
        if (saved is not None and set(saved[0].get("robust_after", ())) != set(ROBUST_ATTACKS)
                and os.path.exists(model_file)):
            # Kept by an earlier version with other robustness attacks: re-attack the saved model.
            if progress:
                print(f"\n== Model {name}: robust accuracy under {', '.join(ROBUST_ATTACKS)} ==",
                      flush=True)
            saved[0].update(robust_results(keras.models.load_model(model_file), x_te, y_te, cfg))
            save_model_results(done_dir, name, cfg, *saved)
        if saved is not None:
            per_model[name], kinds_by_model[name], feats[name] = saved
            if progress:
                print(f"\n== Model {name}: results of an earlier run in {done_dir} ==",
                      flush=True)
            continue
        if progress:
            print(f"\n== Model {name}: {MODELS[name]} ==", flush=True)
        keras.utils.set_random_seed(cfg.seed)
        model = build_study_model(name, cfg)
        _compile(model, cfg, steps)
        model(x_tr[:1])  # built before fit: BackupAndRestore needs the variables
        backup = model_backup(cfg.out, name, cfg)
        # The history lives next to the backup, so a resumed run keeps every epoch's row.
        history = JSONHistory(os.path.join(backup.backup_dir, "history.json"))
        callbacks = [backup, EpochSeconds(), history]
        if name == "D":
            callbacks.insert(1, EpsilonWarmup(cfg.adv_warmup_epochs, start=cfg.adv_clean_epochs))
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks,
                  shuffle=False,  # the pipeline shuffles
                  verbose="auto" if progress else 0)
        model.base.save(model_file)
        res, kinds, f_te = analyse_model(model, model.base, x_tr, y_tr, x_te, y_te, cfg)
        hist = history.read()  # all epochs, also those of a killed earlier run
        res["train_seconds"] = float(sum(hist.get("epoch_seconds", [])))
        res["history"] = {k: [float(v) for v in vals] for k, vals in hist.items() if k != "epoch"}
        per_model[name], feats[name], kinds_by_model[name] = res, f_te, kinds
        save_model_results(done_dir, name, cfg, res, kinds, f_te)
        shutil.rmtree(os.path.join(cfg.out, "backup", name), ignore_errors=True)
        if progress:
            print(f"Model {name}: clean {res['clean_accuracy']:.3f}, robust "
                  f"{res['robust_accuracy']:.3f}, var/dist^2 {res['variance_to_separation']:.4f}")
    figures = _figures(cfg.out, {k: v for k, v in per_model.items() if k != "_n"}, feats,
                       kinds_by_model, y_te)
    seconds = time.perf_counter() - t0
    results = {"config": dataclasses.asdict(cfg), "models": per_model, "figures": figures,
               "verdict": _verdict(per_model), "seconds": seconds}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(_report(cfg, per_model, figures, seconds))
    return results
