"""Robust FaceNet: measure how easily a face model is fooled, fine-tune it, compare.

On a folder `faces/{train,val}/<person>/`: the `train` photos are the gallery
(and what fine-tuning sees), the `val` photos the probes. The operating
threshold is the best-accuracy cosine threshold on pairs of gallery photos of
the fine-tuning identities: chosen on training data only, saved with the
model, and used for every success decision. Identities held out of
fine-tuning (`holdout`) are reported separately: a face system meets new
people every day.

This module orchestrates: it loads the splits, chooses thresholds, trains,
calls the evaluator (`tfadv.evaluation.faces`: the protocol, the attack
suite, minimal eps and curves) and writes what the report views
(`tfadv.reports.facenet`) render. Eps in pixel units (0-255).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfadv import assets, runs
from tfadv.attacks import embedding as E
from tfadv.attacks.pgd import PGD
from tfadv.config.faces import ATTACKS, FaceEvalConfig, FaceFinetuneConfig  # noqa: F401 (re-exported)
from tfadv.config.options import option_names
from tfadv.data import faces as faces_lib
from tfadv.files import output_dir, write_json, write_text
from tfadv.evaluation import faces as face_eval
from tfadv.evaluation import verification as V
from tfadv.evaluation.faces import identity_references  # noqa: F401 (re-exported)
from tfadv.models.facenet import facenet, freeze_backbone, load_embedder
from tfadv.reports.facenet import plot_curves, report_markdown
from tfadv.trainers.callbacks import JSONHistory, backup_and_restore
from tfadv.trainers.embedding import EmbeddingAdversarialModel


# -- data -----------------------------------------------------------------

@dataclass
class FaceSplits:
    train: object          # FaceSet of gallery / fine-tuning photos (all identities)
    val: object            # FaceSet of probe photos
    train_ids: list        # label indices used for fine-tuning
    heldout_ids: list      # label indices never trained on


def load_splits(faces=None, *, holdout=0, seed=0, detector=None, size=160,
                progress=False) -> FaceSplits:
    """Loads `faces/train` and `faces/val` (MTCNN crops, cached) and picks held-out people."""
    root = Path(faces) if faces else assets.require().demo_faces
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"Expected {root}/{split}/<person>/*.jpg (one folder per person). "
                "Run `tfadv assets fetch` for the demo set, or pass --faces DIR.")
    train = faces_lib.load_face_folder(root / "train", detector=detector, size=size,
                                       progress=progress)
    val = faces_lib.load_face_folder(root / "val", detector=detector, size=size,
                                     class_names=train.class_names, progress=progress)
    n = len(train.class_names)
    if holdout >= n:
        raise ValueError(f"holdout={holdout} leaves no identity to fine-tune on ({n} people).")
    order = np.random.default_rng(seed).permutation(n)
    heldout = sorted(int(i) for i in order[:holdout])
    return FaceSplits(train, val, [i for i in range(n) if i not in heldout], heldout)


def _subset(faceset, ids, keep=None):
    """The photos of the identities `ids` (and of `keep`, a bool mask, if given)."""
    mask = np.isin(faceset.labels, ids)
    if keep is not None:
        mask &= keep
    return faceset.images[mask], faceset.labels[mask]


# -- evaluation -------------------------------------------------------------

def choose_threshold(model, splits: FaceSplits, batch_size=32) -> float:
    """Best-accuracy cosine threshold on pairs of gallery photos of the fine-tuning identities."""
    x, y = _subset(splits.train, splits.train_ids)
    # Only the threshold: no TAR@FAR (its too-few-pairs warning would not be about this).
    report = V.verification_report(face_eval.embed(model, x, batch_size), y, fars=())
    return float(report["threshold"])


def operating_threshold(net, model, splits: FaceSplits) -> tuple[float, str]:
    """(threshold, where it came from): the `threshold.json` next to the model file `model`
    when there is one, else `choose_threshold` on gallery pairs.

    Raises:
        ValueError: a bad threshold file.
    """
    found = model and (Path(model).parent / "threshold.json").is_file()
    if found:
        return V.load_threshold(model), str(Path(model).parent / "threshold.json")
    return choose_threshold(net, splits), "gallery pairs of the fine-tuning identities"


def attack_suite(model, x, ref, threshold, mode, cfg: FaceEvalConfig, *, progress=None) -> dict:
    """Success rates of every configured attack in one mode at `cfg.eps` (JSON-ready).

    `tfadv.evaluation.faces.attack_suite` as a dict: attack -> {"success",
    "per_example"} (C&W also "median_l2"), "worst_case" (per photo: any Linf
    attack, any restart) and "n".
    """
    return face_eval.attack_suite(model, x, ref, threshold, mode, cfg, progress=progress,
                                  keep_images=False).suite_dict()


def evaluate_face_model(model, splits: FaceSplits, threshold: float,
                        cfg: FaceEvalConfig | None = None, *, progress=None) -> dict:
    """Clean verification and attack success for one model on the splits (JSON-ready).

    `tfadv.evaluation.faces.evaluate_faces` with the gallery `splits.train`,
    the probes `splits.val` and the groups "trained" and "held_out".

    Returns:
        A dict: "threshold", "eps", "groups" (clean verification per
        identity group), "matched_clean", "attacks" (the suite per mode and
        group), "min_eps_dodging", "curves" (success vs eps per mode).

    Raises:
        ValueError: the threshold is not a finite number in [-1, 1], or an
            unknown attack name.
    """
    groups = {"trained": splits.train_ids, "held_out": splits.heldout_ids}
    return face_eval.evaluate_faces(model, splits.train, splits.val, threshold, cfg,
                                    groups=groups, progress=progress).to_dict()


def _timed_evaluation(model, splits, threshold, cfg, say) -> dict:
    t = time.perf_counter()
    metrics = evaluate_face_model(model, splits, threshold, cfg, progress=say)
    metrics["seconds"] = time.perf_counter() - t
    return metrics


# -- models -----------------------------------------------------------------

def pretrained(preset):
    return facenet(preset)


def save_embedder(model, out_dir, threshold, **extra):
    """Writes `embedder.keras` and `threshold.json` (the pair `tfadv export` reads)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".embedder.keras.tmp.keras"
    model.save(tmp)
    os.replace(tmp, out_dir / "embedder.keras")
    V.save_threshold(out_dir / "threshold.json", threshold, **extra)
    return out_dir / "embedder.keras"


def export_pretrained(preset, out, *, faces=None, holdout=0, seed=0) -> dict:
    """Writes a pretrained preset as `embedder.keras` + `threshold.json`."""
    model = pretrained(preset)
    splits = load_splits(faces, holdout=holdout, seed=seed)
    thr = choose_threshold(model, splits)
    save_embedder(model, out, thr, preset=preset, chosen_on="gallery pairs of the "
                  "fine-tuning identities")
    return {"threshold": thr, "path": str(Path(out) / "embedder.keras")}


def _train_dataset(x, y, cfg):
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
    ds = ds.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True)
    if cfg.augment:
        ds = ds.map(lambda a, b: (tf.image.random_flip_left_right(a, seed=cfg.seed), b))
    return ds.batch(cfg.batch_size).prefetch(2)


def build_trainer(cfg: FaceFinetuneConfig, num_classes, threshold):
    """The fine-tuning model: pretrained embedder, frozen copy as teacher, attacks."""
    embedder = pretrained(cfg.preset)
    freeze_backbone(embedder, cfg.freeze_until)
    teacher = (pretrained(cfg.preset)
               if cfg.distill_weight > 0 or cfg.consistency_target == "teacher" else None)
    fast = cfg.method != "pgd"
    steps = 1 if fast else cfg.train_steps  # a fast method uses only the attack's budget
    step = cfg.train_step_size or 2.5 * cfg.train_eps / max(steps, 1)
    if steps == 0:
        attack = None
    elif cfg.attack_on == "embedding":
        attack = E.embedding_attack("pgd", "dodging", eps=cfg.train_eps, steps=steps,
                                    step_size=step, unroll=False)
    else:
        attack = PGD(eps=cfg.train_eps, steps=steps, step_size=step, bounds=(0, 255),
                     unroll=False)
    static = [facenet(p) for p in cfg.static_presets]
    eval_attack = E.embedding_attack("pgd", "dodging", eps=cfg.evaluation.eps, steps=5,
                                     unroll=False)
    return EmbeddingAdversarialModel(
        embedder, num_classes, attack=attack, attack_on=cfg.attack_on,
        adv_weight=cfg.adv_weight if attack is not None else 0.0, ce_weight=cfg.ce_weight,
        consistency_weight=cfg.consistency_weight if attack is not None else 0.0,
        consistency_target=cfg.consistency_target if teacher is not None else "clean",
        center_weight=cfg.center_weight, teacher=teacher, distill_weight=cfg.distill_weight,
        static_models=static, eval_attack=eval_attack, eval_threshold=threshold,
        method=cfg.method, **({"fast_step": cfg.fast_step, "fast_noise": cfg.fast_noise,
                               "free_replays": cfg.free_replays} if fast else {}))


def _pretrained_metrics(base, splits, thr0, cfg, out, say) -> dict:
    """The pretrained model's evaluation, kept in `out` so a killed run does not redo it."""
    cached = out / "pretrained_metrics.json"
    key = {"preset": cfg.preset, "faces": cfg.faces, "holdout": cfg.holdout, "seed": cfg.seed,
           "evaluation": dataclasses.asdict(cfg.evaluation), "threshold": thr0}
    previous = json.loads(cached.read_text()) if cached.exists() else {}
    if previous.get("key") == json.loads(json.dumps(key)):
        say(f"Pretrained {cfg.preset}: threshold {thr0:.3f}; evaluation from {cached}")
        return previous["metrics"]
    say(f"Pretrained {cfg.preset}: threshold {thr0:.3f}; evaluating ...")
    metrics = _timed_evaluation(base, splits, thr0, cfg.evaluation, say)
    write_text(cached, json.dumps({"key": key, "metrics": metrics}, default=float))
    return metrics


def _relabelled(faceset, ids, keep=None):
    """The photos of `ids` (and `keep`, a bool mask), labels re-indexed 0..len(ids)-1."""
    x, y = _subset(faceset, ids, keep)
    remap = {c: i for i, c in enumerate(ids)}
    return x, np.array([remap[int(c)] for c in y], np.int64)


# Settings a resumed run may change: how long it runs and how it is judged.
RESUMABLE_CHANGES = ("out", "epochs", "overwrite", "evaluation")


def _poison_scan(base, splits, cfg, out, say, metrics):
    """`--scan-poison`: the fine-tuning photos scanned with the pretrained embedder; writes
    out/poison_scan.json. Returns the photos to train on (bool mask) for "exclude", else None."""
    if cfg.scan_poison == "off":
        return None
    from tfadv.poisoning.scan import scan_faceset

    in_training = np.isin(splits.train.labels, splits.train_ids)
    scan = scan_faceset(base, splits.train, cfg.scan_method, keep=in_training)
    flags = np.asarray(scan.pop("flags"))
    scan["excluded"] = cfg.scan_poison == "exclude"
    metrics["poison_scan"] = scan
    write_json(out / "poison_scan.json", scan)
    line = f"Poison scan ({cfg.scan_method}): {scan['flagged']} of {scan['images']} photos suspect"
    if scan["flagged"]:
        what = ", left out of fine-tuning" if scan["excluded"] else ""
        line += f"{what}: {[s['path'] for s in scan['suspects']]}"
    say(line)
    return ~flags if scan["excluded"] else None


def finetune(cfg: FaceFinetuneConfig, *, progress=True, evaluate=True, splits=None) -> dict:
    """Evaluates the pretrained model, fine-tunes it adversarially, evaluates again.

    Writes to `cfg.out`: embedder.keras, threshold.json, metrics.json,
    report.md, history.json, curves_*.png. Killed runs resume from the last
    finished epoch (`backup/`); their settings are checked (`tfadv.runs`).

    Raises:
        ValueError: `cfg.out` holds a killed run with other settings.
        FileExistsError: `cfg.out` holds a finished run and `cfg.overwrite`
            is not set.
    """
    say = print if progress else (lambda *_: None)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    splits = splits or load_splits(cfg.faces, holdout=cfg.holdout, seed=cfg.seed,
                                   progress=progress)
    # After the faces loaded: a bad --faces leaves no output folder behind.
    state = runs.claim(out, dataclasses.asdict(cfg), finished="metrics.json",
                       mutable=RESUMABLE_CHANGES, overwrite=cfg.overwrite,
                       options=option_names(FaceFinetuneConfig), epochs=cfg.epochs,
                       defaults=dataclasses.asdict(FaceFinetuneConfig(out=cfg.out)))
    if state == "resume":
        say(f"Resuming the killed run in {out} from its last finished epoch")
    names = splits.train.class_names
    say(f"Faces: {splits.train.report()} | val: {splits.val.report()}")
    say(f"Fine-tuning identities: {[names[i] for i in splits.train_ids]}; held out: "
        f"{[names[i] for i in splits.heldout_ids]}")
    metrics = {"config": dataclasses.asdict(cfg), "identities": names,
               "held_out": [names[i] for i in splits.heldout_ids],
               "skipped": {"train": splits.train.counts(), "val": splits.val.counts()}}

    base = pretrained(cfg.preset)
    thr0 = choose_threshold(base, splits)
    if evaluate:
        metrics["pretrained"] = _pretrained_metrics(base, splits, thr0, cfg, out, say)
    keep = _poison_scan(base, splits, cfg, out, say, metrics)
    del base

    # Fine-tuning on the train photos of the fine-tuning identities; labels re-indexed.
    x, y = _relabelled(splits.train, splits.train_ids, keep)
    xv, yv = _relabelled(splits.val, splits.train_ids)
    trainer = build_trainer(cfg, len(splits.train_ids), thr0)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    trainer(x[:1])  # built before fit: BackupAndRestore needs the variables
    val_ds = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(cfg.batch_size)
    # The backup is kept until the results are written (removed below): a run killed
    # in its final evaluation resumes there instead of fine-tuning again.
    callbacks = [backup_and_restore(out / "backup", delete_checkpoint=False),
                 JSONHistory(str(out / "history.json"))]
    say(f"Fine-tuning {cfg.epochs} epochs on {len(x)} photos ...")
    t = time.perf_counter()
    trainer.fit(_train_dataset(x, y, cfg), validation_data=val_ds, epochs=cfg.epochs,
                callbacks=callbacks, verbose=2 if progress else 0)
    metrics["train_seconds"] = time.perf_counter() - t
    tuned = trainer.embedder
    thr1 = choose_threshold(tuned, splits)
    save_embedder(tuned, out, thr1, preset=cfg.preset, finetuned=True,
                  chosen_on="gallery pairs of the fine-tuning identities")
    if evaluate:
        say(f"Fine-tuned: threshold {thr1:.3f}; evaluating ...")
        metrics["finetuned"] = _timed_evaluation(tuned, splits, thr1, cfg.evaluation, say)
        metrics["figures"] = plot_curves(out, metrics)
    metrics["seconds"] = time.perf_counter() - t0
    write_json(out / "metrics.json", json.loads(json.dumps(metrics, default=float)))
    if evaluate:
        write_text(out / "report.md", report_markdown(metrics))
    shutil.rmtree(out / "backup", ignore_errors=True)
    return metrics


# -- any saved embedder (`tfadv facenet evaluate`) ----------------------------

def evaluate_saved(out, *, preset=None, model=None, faces=None, holdout=0, seed=0,
                   evaluation: FaceEvalConfig | None = None, progress=True,
                   splits=None) -> dict:
    """The fine-tuning recipe's evaluation of one saved embedder (or a preset).

    For models trained elsewhere, or built from trained ones (an ensemble,
    `tfadv.models.ensemble(..., combine="mean_embedding")`): the same
    protocol as `finetune`'s before/after report. The operating threshold is
    the model's `threshold.json` when one lies next to it, else it is chosen
    on gallery pairs of the fine-tuning identities (as `finetune` does).

    Writes `out/metrics.json`: {"model", "threshold_from", "config",
    "evaluation"} (the evaluation as `evaluate_face_model` returns it).

    Raises:
        FileNotFoundError: no such model file, or no face folders.
        ValueError: the file is not a Keras model; a bad threshold file.
    """
    say = print if progress else (lambda *_: None)
    evaluation = evaluation or FaceEvalConfig()
    net = load_model_or_preset(preset, model)
    splits = splits or load_splits(faces, holdout=holdout, seed=seed, progress=progress)
    threshold, origin = operating_threshold(net, model, splits)
    say(f"Threshold {threshold:.3f} ({origin}); evaluating ...")
    metrics = {"model": model or preset, "threshold_from": origin,
               "config": {"faces": faces, "holdout": holdout, "seed": seed,
                          "evaluation": dataclasses.asdict(evaluation)},
               "evaluation": _timed_evaluation(net, splits, threshold, evaluation, say)}
    output_dir(out)
    write_json(Path(out) / "metrics.json", json.loads(json.dumps(metrics, default=float)))
    return metrics


# -- embedding files (`tfadv facenet embed`) ----------------------------------

def load_model_or_preset(preset=None, model=None):
    if model:
        return load_embedder(model)
    return pretrained(preset or "facenet-mscele1m-128")


def embed_files(paths, *, preset=None, model=None, detector=None) -> list[dict]:
    """Embedding of the largest face in each image file; errors per file, never a crash.

    Returns:
        A list with, per path, `{"path", "embedding": [floats]}` or
        `{"path", "error": message}`.
    """
    net = load_model_or_preset(preset, model)
    return faces_lib.embed_files(
        paths, lambda crops: face_eval.embed(net, crops.astype("float32")),
        size=int(net.input_shape[1]), detector=detector)
