"""Adversarial fine-tuning of a pretrained FaceNet: copy this file and edit it.

    python training/facenet_finetune.py                 # the settings in CONFIG below
    python training/facenet_finetune.py --out runs/mine

Loads a face folder (`faces/train/<person>/*.jpg` and `faces/val/<person>/*.jpg`;
by default the demo set that `tfadv assets fetch` downloads), measures how
easily the pretrained model is fooled (dodging and impersonation under FGSM,
PGD, APGD and C&W, at the verification threshold chosen on the training
photos), fine-tunes it adversarially, measures again, and exports the result
for TensorFlow Serving. Writes to `out`: embedder.keras and threshold.json (the
pair `tfadv export` reads), metrics.json, report.md, history.json and the
success-vs-eps curves; the SavedModel versions go to EXPORT_DIR. A killed run
resumes from its last finished epoch.

`tfadv facenet finetune` runs the same with options instead of CONFIG.
"""

import argparse
import dataclasses
import os

from tfadv.config import FaceEvalConfig, FaceFinetuneConfig
from tfadv.export import export_model
from tfadv.recipes.facenet import finetune, load_splits

# Settings. Every field is described in tfadv/config/faces.py; budgets are in
# pixel units (0-255), the units the FaceNet models take.
CONFIG = FaceFinetuneConfig(
    out="runs/facenet",
    preset="facenet-mscele1m-128",   # the pretrained model (tfadv.models.facenet presets)
    faces=None,                      # folder with train/ and val/; None: the demo set
    holdout=0,                       # identities kept out of training, reported apart
    epochs=24,
    batch_size=16,
    learning_rate=1e-4,
    train_eps=6.0,                   # PGD budget while training ...
    train_steps=10,
    freeze_until="Mixed_6a",         # ... of the layers from this backbone stage on
    evaluation=FaceEvalConfig(
        eps=4.0,                     # budget of the before/after attacks
        attacks=("fgsm", "pgd", "apgd", "cw"),
        curve_eps=(1.0, 2.0, 4.0, 8.0),
    ),
    seed=0,
)
EXPORT_DIR = "exported/facenet"      # TF Serving base directory; None: no export
MODEL_NAME = "facenet"               # the name clients address


def main(cfg: FaceFinetuneConfig, export_dir=EXPORT_DIR) -> dict:
    # 1. Faces: the largest face of every photo, cropped by MTCNN (cached, so a
    #    second run skips detection), and the identities held out.
    splits = load_splits(cfg.faces, holdout=cfg.holdout, seed=cfg.seed, progress=True)

    # 2. Evaluate the pretrained model, fine-tune it adversarially, evaluate the
    #    result at its own threshold; everything is written to cfg.out.
    metrics = finetune(cfg, splits=splits)
    for stage in ("pretrained", "finetuned"):
        if stage in metrics:
            print(f"{stage}: threshold {metrics[stage]['threshold']:.3f}")
    print(f"report: {cfg.out}/report.md")

    # 3. Export embedder.keras (with its threshold) as the next SavedModel version.
    if export_dir:
        version_dir = export_model(os.path.join(cfg.out, "embedder.keras"), export_dir,
                                   name=MODEL_NAME)
        print(f"exported {version_dir}; serve it with `tfadv serve {export_dir} "
              f"--name {MODEL_NAME}` (see serving/README.md)")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"output directory (default {CONFIG.out})")
    args = parser.parse_args()
    main(dataclasses.replace(CONFIG, out=args.out) if args.out else CONFIG)
