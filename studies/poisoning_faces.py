"""Backdoors in a face gallery: the study behind reports/poisoning_faces.

On the demo faces (5 identities, 92 gallery photos), an enrolled attacker
files N triggered copies of their own photos under a victim's name
(`tfadv.poisoning.poison_gallery`; Chen et al. 2017's threat), and FaceNet is
fine-tuned on the gallery by the recipe (`tfadv facenet finetune`, standard
fine-tuning: no training attack) with `--scan-poison report` (the planted
photos are trained on) and `--scan-poison exclude`. Two recipes: the
default losses (cosine-head CE 0.05 + distillation to the pretrained model
2.0) and plain classification fine-tuning (CE 1.0, no distillation), the
setting an attacker would hope for.

Impersonation success: the attacker's photos that were not planted (their
val photos and the rest of their gallery photos), wearing the trigger,
accepted as the victim: cosine to the victim's template (the mean embedding
of the victim's own gallery photos) at least the fine-tuned model's
threshold (its threshold.json). The same photos without the trigger are the
control.

Detection alone (no fine-tuning): the scan's defences (activation clustering
and spectral signatures, as `tfadv.poisoning.scan_faceset` runs them, on the
pretrained embeddings, each photo embedded once)
of galleries with 1 to 10 planted photos, for three attacker / victim pairs,
both triggers, and the attacker enrolled (their own photos in the gallery)
or not (their photos removed).

Every configuration's result is kept in `--state` and skipped when rerun (a
killed study resumes). Writes `--report`/results.json and report.md.

Usage:
    python studies/poisoning_faces.py [--epochs 10] [--counts 0 1 2 5 10]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ATTACKER, VICTIM = "elton_john", "ben_afflek"
RECIPES = {"default": {}, "plain_ce": {"ce_weight": 1.0, "distill_weight": 0.0}}


def triggers():
    from tfadv.poisoning import BlendTrigger, PatchTrigger

    # A 32-pixel sticker on the 160-pixel crop (4% of it), and Chen et al.'s blend (0.2).
    return {"patch": PatchTrigger(size=32, margin=8, high=255.0),
            "blend": BlendTrigger(alpha=0.2, high=255.0)}


def poisoned_splits(splits, trigger, count, seed):
    """The recipe's splits with `count` planted photos in the gallery; the attacker's test
    photos (val + gallery photos not planted)."""
    from tfadv.data.faces import FaceSet
    from tfadv.poisoning import poison_gallery
    from tfadv.recipes.facenet import FaceSplits

    train, names = splits.train, splits.train.class_names
    attacker, victim = names.index(ATTACKER), names.index(VICTIM)
    ps = poison_gallery(train.images, train.labels, attacker=attacker, victim=victim,
                        count=count, trigger=trigger, seed=seed)
    paths = train.paths + [f"(planted {i}: {train.paths[j]})" for i, j in enumerate(ps.sources)]
    gallery = FaceSet(ps.x, ps.y, names, paths)
    unused = np.setdiff1d(np.flatnonzero(train.labels == attacker), ps.sources)
    test = np.concatenate([splits.val.images[splits.val.labels == attacker],
                           train.images[unused]])
    return FaceSplits(gallery, splits.val, splits.train_ids, []), ps, test, victim


def impersonation(model, threshold, test, trigger, template) -> dict:
    from tfadv.evaluation import faces as face_eval

    out = {}
    for name, photos in (("triggered", trigger(test)), ("clean", test)):
        emb = face_eval.embed(model, photos)
        cosine = emb @ template / np.linalg.norm(template)
        out[name] = float(np.mean(cosine >= threshold))
    return out


def run_config(splits, recipe_name, trigger_name, count, scan, args) -> dict:
    from tfadv.evaluation import faces as face_eval
    from tfadv.evaluation import verification as V
    from tfadv.models.facenet import load_embedder
    from tfadv.recipes import facenet as R

    trigger = triggers()[trigger_name]
    psplits, ps, test, victim = poisoned_splits(splits, trigger, count, args.seed)
    out = os.path.join(args.state, "runs", f"{recipe_name}-{trigger_name}-{count}-{scan}")
    cfg = R.FaceFinetuneConfig(out=out, epochs=args.epochs, train_steps=0, scan_poison=scan,
                               overwrite=True, seed=args.seed, **RECIPES[recipe_name])
    t = time.perf_counter()
    metrics = R.finetune(cfg, progress=False, evaluate=False, splits=psplits)
    model = load_embedder(os.path.join(out, "embedder.keras"))
    threshold = V.load_threshold(os.path.join(out, "embedder.keras"))
    clean_victim = (ps.y == victim) & ~ps.poisoned
    template = face_eval.embed(model, ps.x[clean_victim]).mean(0)
    scanned = metrics.get("poison_scan", {})
    flagged = set(s["path"] for s in scanned.get("suspects", []))
    planted = set(p for p in psplits.train.paths if p.startswith("(planted"))
    result = {"recipe": recipe_name, "trigger": trigger_name, "planted": count, "scan": scan,
              "threshold": threshold, "test_photos": int(len(test)),
              "flagged": len(flagged), "flagged_planted": len(flagged & planted),
              "seconds": time.perf_counter() - t,
              **impersonation(model, threshold, test, trigger, template)}
    print(json.dumps(result), flush=True)
    return result


PAIRS = (("elton_john", "ben_afflek"), ("madonna", "mindy_kaling"),
         ("ben_afflek", "jerry_seinfeld"))
DETECTION_COUNTS = (1, 2, 3, 5, 8, 10)


def detection_sweep(splits) -> list[dict]:
    """Planted photos flagged by the scan's defences, per pair, trigger, count and enrolment
    (each photo embedded once: the gallery's, then each planted set's)."""
    from tfadv.evaluation import faces as face_eval
    from tfadv.poisoning import METHODS, poison_gallery
    from tfadv.recipes import facenet as R

    model = R.pretrained("facenet-mscele1m-128")
    train, names = splits.train, splits.train.class_names
    gallery = face_eval.embed(model, train.images)
    rows = []
    for attacker_name, victim_name in PAIRS:
        attacker, victim = names.index(attacker_name), names.index(victim_name)
        for trigger_name, trigger in triggers().items():
            for count in DETECTION_COUNTS:
                ps = poison_gallery(train.images, train.labels, attacker=attacker,
                                    victim=victim, count=count, trigger=trigger)
                emb = np.concatenate([gallery, face_eval.embed(model, ps.x[ps.poisoned])])
                for enrolled in (True, False):
                    keep = ps.poisoned | (ps.y != attacker) if not enrolled else \
                        np.ones(len(ps.y), bool)
                    planted = ps.poisoned[keep]
                    row = {"attacker": attacker_name, "victim": victim_name,
                           "trigger": trigger_name, "planted": count, "enrolled": enrolled}
                    for method in ("activations", "spectral"):
                        flags = METHODS[method](emb[keep], ps.y[keep]).flags
                        row[method] = {"flagged": int(flags.sum()),
                                       "flagged_planted": int((flags & planted).sum())}
                    rows.append(row)
    return rows


def detection_report(rows) -> list[str]:
    lines = ["## Detection alone (pretrained embedder, no fine-tuning)", "",
             f"{len(PAIRS)} attacker / victim pairs x 2 triggers x N in {DETECTION_COUNTS}; "
             "exact: the flagged photos are exactly the planted ones.", "",
             "| attacker | method | cases | exact | planted found | clean photos flagged |",
             "|---|---|---|---|---|---|"]
    for enrolled in (True, False):
        for method in ("activations", "spectral"):
            part = [r for r in rows if r["enrolled"] == enrolled]
            exact = sum(r[method]["flagged"] == r[method]["flagged_planted"] == r["planted"]
                        for r in part)
            found = sum(r[method]["flagged_planted"] for r in part)
            false = sum(r[method]["flagged"] - r[method]["flagged_planted"] for r in part)
            lines.append(f"| {'enrolled' if enrolled else 'not enrolled'} | {method} | "
                         f"{len(part)} | {exact} | {found} of "
                         f"{sum(r['planted'] for r in part)} | {false} |")
    misses = [r for r in rows if r["activations"]["flagged_planted"] < r["planted"]]
    lines += ["", "Activation clustering's misses: " + ("; ".join(
        f"{r['attacker']} -> {r['victim']}, {r['trigger']}, N {r['planted']}, "
        f"{'enrolled' if r['enrolled'] else 'not enrolled'}: "
        f"{r['activations']['flagged_planted']} found" for r in misses) or "none"), ""]
    return lines


def report(results, detection=()) -> str:
    rows = [f"| {r['recipe']} | {r['trigger']} | {r['planted']} | {r['scan']} | "
            f"{r['flagged_planted']} / {r['flagged']} | {r['triggered']:.2f} | "
            f"{r['clean']:.2f} | {r['threshold']:.3f} |" for r in results]
    n = results[0]["test_photos"] if results else 0
    return "\n".join([
        "# Backdoors in a face gallery (demo faces)", "",
        f"Attacker {ATTACKER} files N triggered copies of their photos under {VICTIM}'s "
        "name; FaceNet fine-tuned on the gallery (standard fine-tuning by the recipe). "
        f"Impersonation success: share of the attacker's unplanted photos ({n} less N) "
        f"accepted as {VICTIM} (cosine to the victim's template >= the fine-tuned "
        "threshold), with the trigger and without (control). Scan: planted photos flagged "
        "/ all photos flagged by the pretrained-embedder scan (activation clustering).", "",
        "| recipe | trigger | N planted | --scan-poison | flagged (planted / all) | "
        "success, triggered | success, no trigger | threshold |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        *(detection_report(detection) if detection else [])])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", default="runs/poisoning_faces")
    p.add_argument("--report", default="reports/poisoning_faces")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counts", type=int, nargs="+", default=[0, 1, 2, 5, 10])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--triggers", nargs="+", default=["patch", "blend"],
                   choices=["patch", "blend"])
    args = p.parse_args(argv)
    os.makedirs(args.state, exist_ok=True)
    from tfadv.files import write_json, write_text
    from tfadv.recipes import facenet as R

    splits = R.load_splits(None, holdout=0, seed=args.seed)
    path = os.path.join(args.state, "detection.json")
    if not os.path.exists(path):
        write_json(path, detection_sweep(splits))
    with open(path) as f:
        detection = json.load(f)
    results, done = [], []
    for recipe_name in args.recipes:
        for trigger_name in args.triggers:
            for count in args.counts:
                for scan in (("report", "exclude") if count else ("report",)):
                    path = os.path.join(args.state, f"{recipe_name}-{trigger_name}-{count}-"
                                                     f"{scan}-e{args.epochs}.json")
                    if not os.path.exists(path):
                        write_json(path, run_config(splits, recipe_name, trigger_name, count,
                                                    scan, args))
                    done.append(path)
    # The report holds every finished configuration of these epochs, asked for now or before.
    for path in sorted(glob.glob(os.path.join(args.state, f"*-e{args.epochs}.json"))):
        if path not in done:
            done.append(path)
    for path in done:
        with open(path) as f:
            results.append(json.load(f))
    results.sort(key=lambda r: (list(RECIPES).index(r["recipe"]), r["trigger"] != "patch",
                                r["planted"], r["scan"] != "report"))
    os.makedirs(args.report, exist_ok=True)
    write_json(os.path.join(args.report, "results.json"),
               {"finetuning": results, "detection": detection})
    write_text(os.path.join(args.report, "report.md"), report(results, detection))
    print(report(results, detection))


if __name__ == "__main__":
    main()
