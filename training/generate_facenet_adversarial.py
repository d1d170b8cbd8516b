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

from tfadv.config import GenerateConfig
from tfadv.recipes.facenet_generate import generate_from_config, summary_lines

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
    # Load and crop the faces (cfg.faces=None: the demo val split), compute each
    # identity's reference embedding, run every attack at every budget, write the shards.
    summary = generate_from_config(model, cfg)
    print("\n".join(summary_lines(summary, cfg.out)))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"output directory (default {CONFIG.out})")
    args = parser.parse_args()
    main(MODEL, dataclasses.replace(CONFIG, out=args.out) if args.out else CONFIG)
