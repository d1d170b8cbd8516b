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
inter-class separation, clean and robust accuracy (`evaluate_robustness` in
cascade mode), and writes `results.json`; `tfadv.reports.centers` writes
`report.md` and the figures from the same results.

This module only orchestrates: it trains, resumes and calls the evaluators;
the statements drawn from the numbers, and their thresholds, live in the
report writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import keras
import numpy as np

from tfadv import files
from tfadv.attacks import APGD, PGD, InversePGD
from tfadv.config import CenterLossConfig
from tfadv.config.centers import MODELS, CentersStudyConfig  # noqa: F401 (re-exported)
from tfadv.data import mnist as mnist_data
from tfadv.evaluation import centers as C
from tfadv.evaluation.centers import CentersModelResult, CentersStudyResult
from tfadv.evaluation.autoattack import autoattack
from tfadv.evaluation.autoattack import summary_lines as autoattack_summary
from tfadv.evaluation.robustness import evaluate_robustness
from tfadv.models import mnist_feature_net
from tfadv.reports import centers as report
from tfadv.trainers import AdversarialModel, EpsilonWarmup
from tfadv.trainers.callbacks import EpochSeconds, JSONHistory, backup_and_restore
from tfadv.trainers.schedules import CyclicLR, sgd_nesterov

# The attacks of the robust accuracy, run in this order, each on the test
# digits that every earlier one left correctly classified (the evaluator's
# cascade). PGD-CE and APGD-CE both ascend the cross-entropy, whose gradient
# vanishes in float32 once a model is very confident (measured: softmax-only
# LeNets++ kept 0.20 "robust" accuracy under both); the DLR and margin
# objectives do not saturate, so the worst case of all four is reported.
ROBUST_ATTACKS = ("pgd_ce", "apgd_ce", "apgd_dlr", "pgd_margin")


def robust_attacks(cfg) -> dict:
    """{name: attack} of `ROBUST_ATTACKS` at the study's budget (PGD's default step)."""
    eps, steps = cfg.robust_eps, cfg.robust_steps
    return {
        "pgd_ce": PGD(eps=eps, steps=steps),
        "apgd_ce": APGD(eps=eps, steps=steps),
        "apgd_dlr": APGD(eps=eps, steps=steps, objective="dlr"),
        "pgd_margin": PGD(eps=eps, steps=steps, objective="margin"),
    }


def _compile(model, cfg, steps_per_epoch):
    schedule = CyclicLR(cfg.max_lr, total_steps=max(1, steps_per_epoch * cfg.epochs),
                        mode=cfg.lr_mode)
    model.compile(
        optimizer=sgd_nesterov(schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def build_study_model(name, cfg):
    """The training model of study model `name` ("A".."D"), not yet compiled."""
    base = mnist_feature_net(feature_dim=cfg.feature_dim, arch=cfg.arch, name=f"model_{name}")
    center = dict(weight=cfg.center_weight, alpha=cfg.center_alpha,
                  inverse_eps=cfg.inverse_eps, inverse_step_size=cfg.inverse_step_size,
                  inverse_steps=cfg.inverse_steps)
    if name == "A":
        return AdversarialModel(base, method="standard", center_loss=CenterLossConfig(**center))
    if name == "B":
        return AdversarialModel(base, method="standard")
    if name == "C":
        return AdversarialModel(base, method="standard",
                                center_loss=CenterLossConfig(centers="inverse_batch", **center))
    # Robust validation each epoch (PGD-10) only for the adversarially trained
    # model: A-C are not trained for it, and their final analysis measures it.
    attack = PGD(eps=cfg.adv_eps, steps=cfg.adv_steps, step_size=cfg.adv_step_size)
    return AdversarialModel(base, attack=attack, method="pgd",
                            eval_attack=PGD(eps=cfg.robust_eps, steps=10),
                            center_loss=CenterLossConfig(on=cfg.adv_center_on, **center))


# -- resuming ---------------------------------------------------------------------


def run_key(cfg, name) -> dict:
    """Everything that changes model `name`'s results, as JSON values.

    The settings (not where results go, which models run, nor, for models
    A-C, model D's own `adv_*` settings) and the configs of the
    robust-accuracy attacks, so that changing those recomputes too.
    """
    key = {k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("out", "models", "autoattack")
           and (name == "D" or not k.startswith("adv_"))}
    key["robust_attacks"] = {k: a.get_config() for k, a in robust_attacks(cfg).items()}
    return json.loads(json.dumps(key, default=str))


def _changes(saved, key) -> str:
    if not isinstance(saved, dict):
        return "no settings recorded"
    diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if not diff:
        return "same settings, another file format"
    return ", ".join(f"{k} changed" if isinstance(key.get(k), dict) else
                     f"{k}: {saved.get(k)!r} -> {key.get(k)!r}" for k in diff[:6]) + (
        ", ..." if len(diff) > 6 else "")


def save_model_results(done_dir, name, cfg, result: CentersModelResult, features) -> None:
    """Keeps one finished model's results, so a killed study resumes after it."""
    os.makedirs(done_dir, exist_ok=True)
    base = os.path.join(done_dir, name)
    with files.atomic_path(base + ".npz") as tmp:
        np.savez(tmp, features=np.asarray(features))
    # Last: the JSON marks the model done.
    files.write_json(base + ".json", {"key": run_key(cfg, name), "result": result.to_dict()})


def load_model_results(done_dir, name, cfg, *, log=print):
    """(CentersModelResult, test features) of a model finished with these settings, else None.

    A result kept with other settings is not used (the model is recomputed);
    `log` says so, naming the settings that differ.
    """
    base = os.path.join(done_dir, name)
    if not (os.path.exists(base + ".json") and os.path.exists(base + ".npz")):
        return None
    with open(base + ".json") as f:
        saved = json.load(f)
    key = run_key(cfg, name)
    if saved.get("key") != key or "result" not in saved:
        log(f"Model {name}: the results kept in {base}.json were made with other settings "
            f"({_changes(saved.get('key'), key)}); computing them again.")
        return None
    with np.load(base + ".npz") as arrays:
        features = arrays["features"]
    return CentersModelResult.from_dict(saved["result"]), features


def autoattack_model(cfg, name, x, y, say=print, progress=True) -> dict:
    """AutoAttack (standard, Linf `cfg.robust_eps`) of study model `name` on (x, y).

    Kept in `models_done/NAME.autoattack.json` with the model's run key, so a
    resumed study does not attack a finished model again.
    """
    path = os.path.join(cfg.out, "models_done", f"{name}.autoattack.json")
    key = {"model": run_key(cfg, name), "version": "standard", "eps": cfg.robust_eps,
           "seed": cfg.seed}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == json.loads(json.dumps(key, default=str)):
            return saved["result"]
    say(f"\n== Model {name}: AutoAttack (standard, Linf eps {cfg.robust_eps}) ==", flush=True)
    model = keras.saving.load_model(os.path.join(cfg.out, f"model_{name}.keras"), safe_mode=True)
    res = autoattack(model, x, y, norm="inf", eps=cfg.robust_eps, seed=cfg.seed,
                     progress=progress)
    result = {"n": res.n, "eps": res.eps, "clean_accuracy": res.clean_accuracy,
              "robust_accuracy": res.robust_accuracy, "per_attack": res.per_attack,
              "seconds": res.seconds, "flags": res.flags}
    files.write_json(path, {"key": key, "result": result})
    say("\n".join(autoattack_summary(res)))
    return result


def model_backup(out, name, cfg, *, log=print):
    """A `BackupAndRestore` for study model `name`: a killed run resumes mid-training.

    A backup written with other settings is discarded rather than restored.
    """
    path = os.path.join(out, "backup", name)
    key_file = os.path.join(path, "run_key.json")
    key = run_key(cfg, name)
    if os.path.isdir(path):
        try:
            with open(key_file) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if saved != key:
            log(f"Model {name}: discarding the training backup in {path}, made with other "
                f"settings ({_changes(saved, key)}).")
            shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    files.write_json(key_file, key)
    return backup_and_restore(path, delete_checkpoint=False)


# -- one model --------------------------------------------------------------------


def analyse_model(model, base, x_tr, y_tr, x_te, y_te, cfg) -> tuple[CentersModelResult,
                                                                     np.ndarray]:
    """Centres of every kind, their comparison, geometry and accuracy of one model.

    Returns:
        (a `CentersModelResult` without training time and history, test features).
    """
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
    robust = evaluate_robustness(base, x_te, y_te, robust_attacks(cfg), cascade=True)
    result = CentersModelResult(
        clean_accuracy=robust.clean_accuracy,
        robust_accuracy=robust.robust_accuracy,
        robust_after=robust.per_attack,
        intra_class_variance=intra,
        inter_class_separation=sep,
        variance_to_separation=intra / max(sep["mean"] ** 2, 1e-12),
        comparisons=C.compare_centers(kinds),
        centers=kinds,
    )
    return result, f_te


def _train_and_analyse(name, cfg, train_ds, val_ds, data, steps, progress):
    x_tr, y_tr, x_te, y_te = data
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
    with files.atomic_path(os.path.join(cfg.out, f"model_{name}.keras")) as tmp:
        model.base.save(tmp)
    result, f_te = analyse_model(model, model.base, x_tr, y_tr, x_te, y_te, cfg)
    hist = history.read()  # all epochs, also those of a killed earlier run
    result.train_seconds = float(sum(hist.get("epoch_seconds", [])))
    result.history = {k: [float(v) for v in vals] for k, vals in hist.items() if k != "epoch"}
    return result, f_te


# -- the study --------------------------------------------------------------------


def run_centers_study(cfg: CentersStudyConfig, progress=True) -> CentersStudyResult:
    """Trains the study's models, analyses them and writes the report.

    Writes `results.json` (the `CentersStudyResult`'s `to_dict()` plus the
    report writer's "verdict" lines), `report.md` and the figures to
    `cfg.out`. Each finished model's results are kept in `models_done/`, so
    a killed run resumes after the last finished model (and mid-training
    from `backup/`); results kept with other settings are recomputed.

    Returns:
        The `CentersStudyResult`.
    """
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    files.output_dir(cfg.out)
    # Before any pipeline exists: a tf.data shuffle order depends on the global seed.
    keras.utils.set_random_seed(cfg.seed)
    (x_tr, y_tr), (x_te, y_te) = mnist_data.load_train_test(
        cfg.data, cfg.data_dir, train_limit=cfg.limit, test_limit=cfg.eval_limit, seed=cfg.seed)
    train_ds = mnist_data.to_dataset(x_tr, y_tr, batch_size=cfg.batch_size, shuffle=True,
                                     seed=cfg.seed)
    x_val, y_val = mnist_data.subset(x_te, y_te, cfg.val_limit, cfg.seed)
    val_ds = mnist_data.to_dataset(x_val, y_val, batch_size=500)
    steps = int(np.ceil(len(x_tr) / cfg.batch_size))
    study = CentersStudyResult(config=cfg, examples={"train": len(x_tr), "test": len(x_te)},
                               models={}, labels=y_te)
    done_dir = os.path.join(cfg.out, "models_done")
    for name in cfg.models:
        saved = load_model_results(done_dir, name, cfg, log=print)
        if saved is not None:
            say(f"\n== Model {name}: results of an earlier run in {done_dir} ==", flush=True)
            study.models[name], study.features[name] = saved
            continue
        say(f"\n== Model {name}: {MODELS[name]} ==", flush=True)
        result, f_te = _train_and_analyse(name, cfg, train_ds, val_ds, (x_tr, y_tr, x_te, y_te),
                                          steps, progress)
        save_model_results(done_dir, name, cfg, result, f_te)
        shutil.rmtree(os.path.join(cfg.out, "backup", name), ignore_errors=True)
        study.models[name], study.features[name] = result, f_te
        say(f"Model {name}: clean {result.clean_accuracy:.3f}, robust "
            f"{result.robust_accuracy:.3f}, var/dist^2 {result.variance_to_separation:.4f}")
    if cfg.autoattack:
        for name, result in study.models.items():
            result.autoattack = autoattack_model(cfg, name, x_te, y_te, say, progress)
    study.figures = report.write_figures(study, cfg.out)
    study.seconds = time.perf_counter() - t0
    files.write_json(os.path.join(cfg.out, "results.json"),
                     {**study.to_dict(), "verdict": report.verdict(study)})
    files.write_text(os.path.join(cfg.out, "report.md"), report.markdown(study))
    return study
