"""Craft adversarial faces once and save them as TFRecord shards: copy this file and edit it.

    python training/generate_facenet_adversarial.py                 # the settings below
    python training/generate_facenet_adversarial.py --out runs/mine

For every face of a folder (one sub-folder per identity; by default the demo
set's val split, after `tfadv assets fetch`), every attack, every budget and
both modes, crafts an adversarial image against a FaceNet embedding model:
dodging pushes a face away from its own identity, impersonation pulls it toward
the next identity; success is judged at the model's verification threshold.
Attacks are ours ("fgsm", "pgd", "apgd", "cw") and cleverhans' ("cleverhans_fgsm",
"cleverhans_pgd") on the same cosine objective. Writes shard-*.tfrecord and
metadata.json (counts, success rates, settings) to `out`; read them back as a
tf.data pipeline with `tfadv.data.adversarial_records.read_records(out)`.

`tfadv facenet generate` runs the same with options instead of CONFIG.
"""

import argparse
import dataclasses

from tfadv import assets
from tfadv.config import GenerateConfig
from tfadv.recipes.facenet_generate import generate

# The model attacked: a FaceNet preset, an embedder .keras file, or a folder
# with embedder.keras and threshold.json (e.g. the output of facenet_finetune.py).
MODEL = "facenet-mscele1m-128"

# Settings. Every field is described in tfadv/config/faces.py; budgets are in
# pixel units (0-255).
CONFIG = GenerateConfig(
    out="runs/adv",
    faces=None,                         # folder/<person>/*.jpg; None: the demo val split
    attacks=("pgd", "cleverhans_pgd", "fgsm"),
    eps=(2.0, 4.0),                     # Linf budgets (norm="2" for L2)
    modes=("dodging", "impersonation"),
    limit=20,                           # faces attacked, one identity at a time in turn
    threshold=None,                     # None: threshold.json next to the model, else chosen on the faces
    steps=20,
    image_format="raw",                 # lossless float32; "png": rounded uint8, 4x smaller
    detector="mtcnn",                   # "none" for folders of ready face crops
    seed=0,
)


def main(model, cfg: GenerateConfig) -> dict:
    faces = cfg.faces or assets.require().demo_faces / "val"

    # Load and crop the faces, compute each identity's reference embedding,
    # run every attack at every budget and write the shards.
    summary = generate(
        model, faces, cfg.out,
        attacks=cfg.attacks, eps_list=cfg.eps, modes=cfg.modes, limit=cfg.limit,
        threshold=cfg.threshold, steps=cfg.steps, step_size=cfg.step_size, norm=cfg.norm,
        random_start=cfg.random_start, batch_size=cfg.batch_size,
        cw_iterations=cfg.cw_iterations, cw_search_steps=cfg.cw_search_steps,
        cw_confidence=cfg.cw_confidence, cw_learning_rate=cfg.cw_learning_rate,
        image_format=cfg.image_format, shard_size=cfg.shard_size,
        detector=None if cfg.detector == "mtcnn" else cfg.detector, align=cfg.align,
        seed=cfg.seed, overwrite=cfg.overwrite, progress=cfg.progress,
    )

    print(f"wrote {summary['count']} adversarial faces to {cfg.out} (threshold "
          f"{summary['threshold']:.3f} from {summary['threshold_source']})")
    for g in summary["groups"]:
        eps = "-" if g["eps"] is None else f"{g['eps']:g}"
        print(f"  {g['attack']:<16} {g['mode']:<13} eps={eps:<4} success "
              f"{g['success_rate']:.3f} ({g['successes']}/{g['count']})")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"output directory (default {CONFIG.out})")
    args = parser.parse_args()
    main(MODEL, dataclasses.replace(CONFIG, out=args.out) if args.out else CONFIG)
