"""Robust FaceNet: measure how easily a face model is fooled, fine-tune it, compare.

Protocol (RobFR-style, Yang et al. 2020), on a folder `faces/{train,val}/<person>/`:

- enrolment: each person's reference is the normalised mean embedding of
  their `train` photos (the gallery);
- the operating threshold is the best-accuracy cosine threshold on pairs of
  gallery photos of the fine-tuning identities: chosen on training data only,
  saved with the model, and used for every success decision;
- clean: nearest-neighbour identification of the `val` photos against the
  gallery, verification of every val photo against every gallery photo
  (k-fold accuracy, ROC AUC, TAR@FAR);
- dodging: perturb a val photo so that it no longer matches its own
  reference (success: cosine < threshold), among photos that matched clean;
- impersonation: perturb it to match another person's reference (the next
  identity in order; success: cosine >= threshold);
- attacks: FGSM, PGD (Linf, random start), APGD, C&W (L2, minimal size),
  the worst case per photo over the Linf attacks, the median minimal Linf eps
  (binary search), and success-vs-eps curves. Eps in pixel units (0-255).

Identities held out of fine-tuning (`holdout`) are reported separately: a
face system meets new people every day.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfadv.config.faces import ATTACKS, FaceEvalConfig, FaceFinetuneConfig  # noqa: F401 (re-exported)


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
    from tfadv import assets
    from tfadv.data import faces as faces_lib

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


def _subset(faceset, ids):
    keep = np.isin(faceset.labels, ids)
    return faceset.images[keep], faceset.labels[keep]


# -- evaluation -------------------------------------------------------------

def _embed(model, x, batch_size=32):
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, 1))


def identity_references(emb, labels, num_classes):
    """Normalised mean embedding per identity ([C, D]; zeros for absent ones)."""
    refs = np.zeros((num_classes, emb.shape[1]), np.float32)
    for c in range(num_classes):
        if np.any(labels == c):
            m = emb[labels == c].mean(0)
            refs[c] = m / max(np.linalg.norm(m), 1e-12)
    return refs


def choose_threshold(model, splits: FaceSplits, batch_size=32) -> float:
    """Best-accuracy cosine threshold on pairs of gallery photos of the fine-tuning identities."""
    from tfadv.evaluation import verification as V

    x, y = _subset(splits.train, splits.train_ids)
    threshold = float(V.verification_report(_embed(model, x, batch_size), y)["threshold"])
    return threshold


def _impersonation_targets(labels, present):
    present = sorted(present)
    nxt = {c: present[(i + 1) % len(present)] for i, c in enumerate(present)}
    return np.array([nxt[int(c)] for c in labels])


def _run_attack(attack, model, x, ref, batch_size, eps=None):
    """The attack over batches of NumPy arrays; returns x_adv (NumPy, like x).

    The attack runs as one `tf.function` per model and attack config, cached
    with the model (`tfadv.evaluation.compiled`): equal attacks built in later
    calls reuse its trace. With `eps` (a float) the attack runs at that budget
    (its step size scaled alike), so one trace serves every point of a curve.
    """
    import tensorflow as tf

    from tfadv.evaluation.compiled import compiled_attack

    if len(x) == 0:
        return x
    fn = compiled_attack(model, attack, with_eps=eps is not None)
    out = []
    for i in range(0, len(x), batch_size):
        xb = tf.constant(x[i:i + batch_size])
        rb = tf.constant(ref[i:i + batch_size])
        if eps is None:
            out.append(np.asarray(fn(xb, rb)))
        else:
            # Per example ([n]), the shape minimal_eps passes: one signature.
            out.append(np.asarray(fn(xb, rb, tf.fill([len(xb)], tf.constant(eps, xb.dtype)))))
    return np.concatenate(out)


def _cos_np(a, b):
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def _succeeded(model, x_adv, ref, threshold, mode, batch_size):
    """Per-example success at the threshold: bool [N] (dodging: cos < t; impersonation: >=)."""
    cos = _cos_np(_embed(model, x_adv, batch_size), ref)
    return cos >= threshold if mode == "impersonation" else cos < threshold


def attack_suite(model, x, ref, threshold, mode, cfg: FaceEvalConfig, *, progress=None) -> dict:
    """Success rates of every configured attack in one mode at `cfg.eps`.

    Args:
        model: embedding model (raw pixels in [0, 255] -> embeddings [N, D]).
        x: photos, float32 [N, H, W, 3] in [0, 255].
        ref: references [N, D]: the own identity's (dodging) or the target's
            (impersonation).
        threshold: cosine threshold in [-1, 1] success is judged at.
        mode: "dodging" or "impersonation".
        cfg: attacks, budget (pixels) and steps.
        progress: optional `print`-like callable.

    Returns a dict: attack -> {"success": rate, "per_example": [bool]} plus
    "worst_case" (per example: any Linf attack succeeded), "n", and for C&W
    the median L2.

    Raises:
        ValueError: an unknown attack name.
    """
    from tfadv.attacks import embedding as E

    say = progress or (lambda *_: None)
    targeted = mode == "impersonation"
    results = {}
    success_any = np.zeros(len(x), bool)

    for name in cfg.attacks:
        t = time.perf_counter()
        if name == "fgsm":
            attack = E.embedding_fgsm(mode, eps=cfg.eps)
        elif name == "pgd":
            attack = E.embedding_pgd(mode, eps=cfg.eps, steps=cfg.pgd_steps,
                                     random_start=cfg.random_start, unroll=False)
        elif name == "apgd":
            attack = E.EmbeddingAPGD(eps=cfg.eps, threshold=threshold, steps=cfg.apgd_steps,
                                     random_start=cfg.random_start, targeted=targeted)
        elif name == "cw":
            attack = E.EmbeddingCW(threshold=threshold, targeted=targeted, confidence=0.02,
                                   learning_rate=1.0, max_iterations=cfg.cw_iterations,
                                   binary_search_steps=cfg.cw_search_steps, initial_const=10.0)
        else:
            raise ValueError(f"Unknown attack {name!r}; expected some of {ATTACKS}.")
        x_adv = _run_attack(attack, model, x, ref, cfg.batch_size)
        ok = _succeeded(model, x_adv, ref, threshold, mode, cfg.batch_size)
        entry = {"success": float(ok.mean()) if len(ok) else float("nan"),
                 "per_example": ok.tolist()}
        if name == "cw":
            l2 = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
            entry["median_l2"] = float(np.median(l2[ok])) if ok.any() else float("inf")
        else:
            success_any |= ok
        results[name] = entry
        say(f"    {mode:13s} {name:5s} eps {cfg.eps:g}: success {entry['success']:.3f} "
            f"({time.perf_counter() - t:.0f} s)")
    results["worst_case"] = {"success": float(success_any.mean()) if len(x) else float("nan"),
                             "per_example": success_any.tolist()}
    results["n"] = int(len(x))
    return results


def evaluate_face_model(model, splits: FaceSplits, threshold: float,
                        cfg: FaceEvalConfig | None = None, *, progress=None) -> dict:
    """Clean verification and attack success for one embedding model (see module doc).

    Args:
        model: embedding model, raw pixels [N, H, W, 3] float32 in [0, 255]
            -> embeddings [N, D].
        splits: the gallery (`train`) and probe (`val`) photos.
        threshold: the model's operating cosine threshold, in [-1, 1].
        cfg: attacks and budgets (pixel units); default `FaceEvalConfig()`.
        progress: optional `print`-like callable for progress lines.

    Returns:
        A JSON-ready dict: "threshold", "eps", "groups" (clean verification per
        identity group), "matched_clean", "attacks" (`attack_suite` per mode
        and group), "min_eps_dodging", "curves" (success vs eps per mode).

    Raises:
        ValueError: the threshold is not a finite number in [-1, 1], or an
            unknown attack name.
    """
    from tfadv.attacks import embedding as E
    from tfadv.data.pairs import cross_pairs
    from tfadv.evaluation import verification as V

    threshold = V.check_threshold(threshold)
    cfg = cfg or FaceEvalConfig()
    say = progress or (lambda *_: None)
    n_cls = len(splits.train.class_names)
    g_emb = _embed(model, splits.train.images, cfg.batch_size)
    p_emb = _embed(model, splits.val.images, cfg.batch_size)
    refs = identity_references(g_emb, splits.train.labels, n_cls)
    out = {"threshold": float(threshold), "eps": cfg.eps, "groups": {}}
    groups = {"all": list(range(n_cls)), "trained": splits.train_ids,
              "held_out": splits.heldout_ids}
    for group, ids in groups.items():
        if not ids:
            continue
        pm = np.isin(splits.val.labels, ids)
        gm = np.isin(splits.train.labels, ids)
        pe, pl, ge, gl = p_emb[pm], splits.val.labels[pm], g_emb[gm], splits.train.labels[gm]
        ia, ib, same = cross_pairs(pl, gl)
        scores = V.cosine_similarity(pe[ia], ge[ib])
        kf = V.kfold_accuracy(scores, same, folds=10, seed=cfg.seed)
        entry = {
            "probes": int(pm.sum()), "identities": len(ids),
            "nn_accuracy": float(V.nearest_neighbour_accuracy(pe, pl, ge, gl)),
            "verification_accuracy": float(kf.mean),
            "accuracy_at_threshold": float(V.accuracy_at(scores, same, threshold)),
            "auc": float(V.roc_auc(scores, same)) if same.any() and (~same).any() else None,
        }
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for far in (1e-2, 1e-3):
                tar = V.tar_at_far(scores, same, far)
                entry[f"tar@far={far:g}"] = None if tar is None or np.isnan(tar) else float(tar)
        out["groups"][group] = entry

    # Attacks on the val photos (all identities; per-group rates from per-example results).
    x, labels = splits.val.images, splits.val.labels
    own = refs[labels]
    matched = _cos_np(p_emb, own) >= threshold
    present = sorted(set(int(c) for c in splits.train.labels))
    tgt = refs[_impersonation_targets(labels, present)]
    not_yet = _cos_np(p_emb, tgt) < threshold
    out["matched_clean"] = float(matched.mean())
    modes = {"dodging": (matched, own), "impersonation": (not_yet, tgt)}
    attacks = {}
    for mode, (mask, ref) in modes.items():
        say(f"  {mode}: {int(mask.sum())} photos")
        res = {"all": attack_suite(model, x[mask], ref[mask], threshold, mode, cfg,
                                   progress=say)}
        # Per group: the same per-example outcomes, split by identity.
        for group in ("trained", "held_out"):
            sel = np.isin(labels[mask], groups[group])
            if not groups[group] or not sel.any():
                continue
            res[group] = {"n": int(sel.sum())}
            for name, entry in res["all"].items():
                if isinstance(entry, dict) and "per_example" in entry:
                    ok = np.asarray(entry["per_example"], bool)[sel]
                    res[group][name] = {"success": float(ok.mean())}
        attacks[mode] = res
    out["attacks"] = attacks

    # Minimal Linf eps (median over matched photos) and curves, PGD.
    search = E.embedding_pgd("dodging", eps=cfg.min_eps_max, steps=cfg.min_eps_steps,
                             random_start=cfg.random_start, unroll=False)
    t = time.perf_counter()
    me = E.minimal_eps(search, model, x[matched], own[matched], threshold, "dodging",
                       search_steps=cfg.min_eps_search, batch_size=cfg.batch_size)
    out["min_eps_dodging"] = {"median": float(np.median(me)) if len(me) else None,
                              "values": [float(v) for v in me]}
    say(f"  median minimal dodging eps {out['min_eps_dodging']['median']} "
        f"({time.perf_counter() - t:.0f} s)")
    curves = {}
    for mode, (mask, ref) in modes.items():
        # One attack at the largest budget, called at each (step eps / 4 kept): one trace per mode.
        unit = E.embedding_pgd(mode, eps=float(max(cfg.curve_eps)), steps=cfg.curve_steps,
                               random_start=cfg.random_start, unroll=False)
        rates = []
        for eps in cfg.curve_eps:
            x_adv = _run_attack(unit, model, x[mask], ref[mask], cfg.batch_size,
                                eps=float(eps))
            ok = _succeeded(model, x_adv, ref[mask], threshold, mode, cfg.batch_size)
            rates.append(float(ok.mean()) if len(ok) else float("nan"))
        curves[mode] = {"eps": list(cfg.curve_eps), "success": rates}
    out["curves"] = curves
    return out


# -- models -----------------------------------------------------------------

def pretrained(preset):
    from tfadv.models.facenet import facenet

    return facenet(preset)


def save_embedder(model, out_dir, threshold, **extra):
    """Writes `embedder.keras` and `threshold.json` (the pair `tfadv export` reads)."""
    from tfadv.evaluation.verification import save_threshold

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".embedder.keras.tmp.keras"
    model.save(tmp)
    os.replace(tmp, out_dir / "embedder.keras")
    save_threshold(out_dir / "threshold.json", threshold, **extra)
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
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
    ds = ds.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True)
    if cfg.augment:
        ds = ds.map(lambda a, b: (tf.image.random_flip_left_right(a, seed=cfg.seed), b))
    return ds.batch(cfg.batch_size).prefetch(2)


def build_trainer(cfg: FaceFinetuneConfig, num_classes, threshold):
    """The fine-tuning model: pretrained embedder, frozen copy as teacher, attacks."""
    from tfadv.attacks import embedding as E
    from tfadv.attacks.pgd import PGD
    from tfadv.models.facenet import facenet, freeze_backbone
    from tfadv.trainers.embedding import EmbeddingAdversarialModel

    embedder = pretrained(cfg.preset)
    freeze_backbone(embedder, cfg.freeze_until)
    teacher = (pretrained(cfg.preset)
               if cfg.distill_weight > 0 or cfg.consistency_target == "teacher" else None)
    step = cfg.train_step_size or 2.5 * cfg.train_eps / max(cfg.train_steps, 1)
    if cfg.train_steps == 0:
        attack = None
    elif cfg.attack_on == "embedding":
        attack = E.embedding_pgd("dodging", eps=cfg.train_eps, steps=cfg.train_steps,
                                 step_size=step, unroll=False)
    else:
        attack = PGD(eps=cfg.train_eps, steps=cfg.train_steps, step_size=step, bounds=(0, 255),
                     unroll=False)
    static = [facenet(p) for p in cfg.static_presets]
    eval_attack = E.embedding_pgd("dodging", eps=cfg.evaluation.eps, steps=5, unroll=False)
    return EmbeddingAdversarialModel(
        embedder, num_classes, attack=attack, attack_on=cfg.attack_on,
        adv_weight=cfg.adv_weight if attack is not None else 0.0, ce_weight=cfg.ce_weight,
        consistency_weight=cfg.consistency_weight if attack is not None else 0.0,
        consistency_target=cfg.consistency_target if teacher is not None else "clean",
        center_weight=cfg.center_weight, teacher=teacher, distill_weight=cfg.distill_weight,
        static_models=static, eval_attack=eval_attack, eval_threshold=threshold)


def finetune(cfg: FaceFinetuneConfig, *, progress=True, evaluate=True, splits=None) -> dict:
    """Evaluates the pretrained model, fine-tunes it adversarially, evaluates again.

    Writes to `cfg.out`: embedder.keras, threshold.json, metrics.json,
    report.md, history.json, curves_*.png. Killed runs resume from the last
    finished epoch (`backup/`).
    """
    import keras

    from tfadv.trainers.callbacks import JSONHistory, backup_and_restore

    say = print if progress else (lambda *_: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    splits = splits or load_splits(cfg.faces, holdout=cfg.holdout, seed=cfg.seed,
                                   progress=progress)
    names = splits.train.class_names
    say(f"Faces: {splits.train.report()} | val: {splits.val.report()}")
    say(f"Fine-tuning identities: {[names[i] for i in splits.train_ids]}; held out: "
        f"{[names[i] for i in splits.heldout_ids]}")
    metrics = {"config": dataclasses.asdict(cfg), "identities": names,
               "held_out": [names[i] for i in splits.heldout_ids],
               "skipped": {"train": splits.train.counts(), "val": splits.val.counts()}}

    base = pretrained(cfg.preset)
    thr0 = choose_threshold(base, splits)
    # The pretrained evaluation is kept, so a killed run does not redo it.
    cached = out / "pretrained_metrics.json"
    key = {"preset": cfg.preset, "faces": cfg.faces, "holdout": cfg.holdout, "seed": cfg.seed,
           "evaluation": dataclasses.asdict(cfg.evaluation), "threshold": thr0}
    if evaluate:
        previous = json.loads(cached.read_text()) if cached.exists() else {}
        if previous.get("key") == json.loads(json.dumps(key)):
            say(f"Pretrained {cfg.preset}: threshold {thr0:.3f}; evaluation from {cached}")
            metrics["pretrained"] = previous["metrics"]
        else:
            say(f"Pretrained {cfg.preset}: threshold {thr0:.3f}; evaluating ...")
            t = time.perf_counter()
            metrics["pretrained"] = evaluate_face_model(base, splits, thr0, cfg.evaluation,
                                                        progress=say)
            metrics["pretrained"]["seconds"] = time.perf_counter() - t
            cached.write_text(json.dumps({"key": key, "metrics": metrics["pretrained"]},
                                         default=float))
    del base

    # Fine-tuning on the train photos of the fine-tuning identities; labels re-indexed.
    x, y = _subset(splits.train, splits.train_ids)
    remap = {c: i for i, c in enumerate(splits.train_ids)}
    y = np.array([remap[int(c)] for c in y])
    xv, yv = _subset(splits.val, splits.train_ids)
    yv = np.array([remap[int(c)] for c in yv])
    trainer = build_trainer(cfg, len(splits.train_ids), thr0)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    trainer(x[:1])  # built before fit: BackupAndRestore needs the variables
    import tensorflow as tf

    val_ds = tf.data.Dataset.from_tensor_slices((xv, yv.astype("int64"))).batch(cfg.batch_size)
    callbacks = [backup_and_restore(out / "backup"),
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
        t = time.perf_counter()
        metrics["finetuned"] = evaluate_face_model(tuned, splits, thr1, cfg.evaluation,
                                                   progress=say)
        metrics["finetuned"]["seconds"] = time.perf_counter() - t
        metrics["figures"] = _curves(out, metrics)
    metrics["seconds"] = time.perf_counter() - t0
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    if evaluate:
        (out / "report.md").write_text(report_markdown(metrics))
    import shutil

    shutil.rmtree(out / "backup", ignore_errors=True)
    return metrics


def _curves(out, metrics):
    from matplotlib.figure import Figure

    paths = []
    for mode in ("dodging", "impersonation"):
        fig = Figure(figsize=(5, 3.5), dpi=120)
        ax = fig.subplots()
        for label in ("pretrained", "finetuned"):
            c = metrics[label]["curves"][mode]
            ax.plot(c["eps"], c["success"], marker="o", label=label)
        ax.set_xlabel("eps (Linf, pixels 0-255)")
        ax.set_ylabel(f"{mode} success (PGD)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{mode} at the model's threshold")
        path = Path(out) / f"curve_{mode}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path.name)
    return paths


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.3f}"


def _attack_list(ev) -> str:
    names = {"fgsm": "FGSM", "pgd": f"PGD-{ev['pgd_steps']} with random start",
             "apgd": f"APGD-{ev['apgd_steps']}",
             "cw": f"C&W L2, unbounded ({ev['cw_search_steps']} x {ev['cw_iterations']})"}
    return ", ".join(names.get(a, a) for a in ev["attacks"])


def report_markdown(m) -> str:
    cfg = m["config"]
    ev = cfg["evaluation"]
    rows = []

    def row(label, key_fn):
        cells = []
        for model in ("pretrained", "finetuned"):
            try:
                cells.append(_fmt(key_fn(m[model])))
            except (KeyError, TypeError):
                cells.append("n/a")
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")

    row("threshold (cosine)", lambda r: r["threshold"])
    for g in ("all", "held_out"):
        if g not in m["pretrained"]["groups"]:
            continue
        gname = "all identities" if g == "all" else "held-out identities"
        row(f"NN identification, {gname}", lambda r, g=g: r["groups"][g]["nn_accuracy"])
        row(f"verification accuracy (10-fold), {gname}",
            lambda r, g=g: r["groups"][g]["verification_accuracy"])
        row(f"ROC AUC, {gname}", lambda r, g=g: r["groups"][g]["auc"])
        row(f"TAR@FAR=1e-2, {gname}", lambda r, g=g: r["groups"][g]["tar@far=0.01"])
        row(f"TAR@FAR=1e-3, {gname}", lambda r, g=g: r["groups"][g]["tar@far=0.001"])
    for mode in ("dodging", "impersonation"):
        for a in ev["attacks"]:
            row(f"{mode} success, {a.upper()} eps {ev['eps']:g}",
                lambda r, a=a, mode=mode: r["attacks"][mode]["all"][a]["success"])
        row(f"{mode} success, worst case of the Linf attacks",
            lambda r, mode=mode: r["attacks"][mode]["all"]["worst_case"]["success"])
        row(f"{mode} success, worst case, held-out identities",
            lambda r, mode=mode: r["attacks"][mode]["held_out"]["worst_case"]["success"])
    if "cw" in ev["attacks"]:
        row("C&W dodging median L2 (pixels)",
            lambda r: r["attacks"]["dodging"]["all"]["cw"]["median_l2"])
    row("median minimal Linf eps, dodging (PGD search)", lambda r: r["min_eps_dodging"]["median"])

    held = ", ".join(m["held_out"]) or "none"
    lines = [
        "# Robust FaceNet: before and after adversarial fine-tuning", "",
        f"Preset `{cfg['preset']}`; faces `{cfg['faces'] or 'demo set (5 celebrities)'}`; "
        f"identities {', '.join(m['identities'])}; held out of fine-tuning: {held}.",
        f"Fine-tuning: {cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam "
        f"{cfg['learning_rate']:g}, PGD-{cfg['train_steps']} eps {cfg['train_eps']:g} against "
        f"the {cfg['attack_on']}, adv weight {cfg['adv_weight']}, consistency "
        f"{cfg['consistency_weight']}, center loss {cfg['center_weight']}, distillation "
        f"{cfg['distill_weight']}, backbone trained from `{cfg['freeze_until']}` "
        f"({m.get('train_seconds', 0):.0f} s).",
        f"Attacks at eps {ev['eps']:g} (pixels, Linf): {_attack_list(ev)}. "
        "Success is judged at each model's own threshold "
        "(chosen on gallery pairs of the fine-tuning identities). Dodging counts photos "
        "that matched their own identity clean; impersonation targets the next identity.",
        "", "| metric | pretrained | fine-tuned |", "|---|---|---|", *rows, "",
        f"Photos matched clean: pretrained {_fmt(m['pretrained'].get('matched_clean'))}, "
        f"fine-tuned {_fmt(m['finetuned'].get('matched_clean'))}.", "",
    ]
    for fig in m.get("figures", []):
        lines.append(f"![{fig}]({fig})")
    lines += ["", f"Total time {m['seconds']:.0f} s on this machine.", ""]
    return "\n".join(lines)


# -- embedding files (`tfadv facenet embed`) ----------------------------------

def load_model_or_preset(preset=None, model=None):
    from tfadv.models.facenet import load_embedder

    if model:
        return load_embedder(model)
    return pretrained(preset or "facenet-mscele1m-128")


def embed_files(paths, *, preset=None, model=None, detector=None) -> list[dict]:
    """Embedding of the largest face in each image file; errors per file, never a crash.

    Returns:
        A list with, per path, `{"path", "embedding": [floats]}` or
        `{"path", "error": message}`.
    """
    from tfadv.data import faces as faces_lib

    net = load_model_or_preset(preset, model)
    return faces_lib.embed_files(
        paths, lambda crops: _embed(net, crops.astype("float32")),
        size=int(net.input_shape[1]), detector=detector)


# -- hyper-parameter sweep -------------------------------------------------------

def sweep(out, *, preset="facenet-mscele1m-128", faces=None, eps_list=(2.0, 4.0),
          steps_list=(1, 3), lr_list=(1e-4,), epochs=3, holdout=0, seed=0,
          evaluation: FaceEvalConfig | None = None, progress=True) -> str:
    """Fine-tunes on an eps x steps x learning-rate grid; returns a Markdown table.

    Each grid point writes `out/<point>/metrics.json`; a killed sweep resumes
    and skips finished points (`out/sweep.json` holds the table rows).
    """
    import itertools

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = evaluation or FaceEvalConfig(attacks=("pgd",), curve_eps=(4.0,),
                                              min_eps_search=3)
    splits = load_splits(faces, holdout=holdout, seed=seed, progress=progress)
    state_path = out / "sweep.json"
    rows = json.loads(state_path.read_text()) if state_path.exists() else {}
    for eps, steps, lr in itertools.product(eps_list, steps_list, lr_list):
        key = f"eps{eps:g}_steps{steps}_lr{lr:g}"
        if key in rows:
            continue
        cfg = FaceFinetuneConfig(out=str(out / key), preset=preset, faces=faces,
                                 holdout=holdout, epochs=epochs, learning_rate=lr,
                                 train_eps=eps, train_steps=steps, seed=seed,
                                 evaluation=evaluation)
        metrics_path = out / key / "metrics.json"
        if metrics_path.exists():
            m = json.loads(metrics_path.read_text())
        else:
            m = finetune(cfg, progress=progress, splits=splits)
        rows[key] = _sweep_row(eps, steps, lr, m)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, state_path)
    table = sweep_table(rows)
    (out / "sweep.md").write_text(table + "\n")
    return table


def _sweep_row(eps, steps, lr, m):
    def get(model, *keys):
        try:
            r = m[model]
            for k in keys:
                r = r[k]
            return r
        except (KeyError, TypeError):
            return None

    row = {"eps": eps, "steps": steps, "lr": lr}
    for model in ("pretrained", "finetuned"):
        row[f"{model}_verification"] = get(model, "groups", "all", "verification_accuracy")
        row[f"{model}_dodging"] = get(model, "attacks", "dodging", "all", "pgd", "success")
        row[f"{model}_impersonation"] = get(model, "attacks", "impersonation", "all", "pgd",
                                            "success")
        row[f"{model}_heldout_dodging"] = get(model, "attacks", "dodging", "held_out", "pgd",
                                              "success")
    return row


def sweep_table(rows: dict) -> str:
    head = ("| eps | steps | lr | verification acc | dodging success | impersonation success "
            "| held-out dodging |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows.values():
        def pair(k):
            return f"{_fmt(r.get('pretrained_' + k))} -> {_fmt(r.get('finetuned_' + k))}"
        lines.append(f"| {r['eps']:g} | {r['steps']} | {r['lr']:g} | {pair('verification')} | "
                     f"{pair('dodging')} | {pair('impersonation')} | {pair('heldout_dodging')} |")
    return "\n".join(lines)
