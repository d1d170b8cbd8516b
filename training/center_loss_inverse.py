"""The centres study: can inverse adversaries stand in for center loss's learned centres?

    python training/center_loss_inverse.py                 # the full setting in CONFIG below
    python training/center_loss_inverse.py --quick         # a few minutes; too small to decide
    python training/center_loss_inverse.py --out runs/mine

Trains four MNIST models (A: softmax + center loss with learned centres, B:
softmax only, C: center loss toward inverse-adversary centres, D: PGD
adversarial training + center loss), extracts each model's class centres
(clean features, inverse adversaries, universal inverse perturbations),
compares them with the learned centres and the classifier weights, and
measures robust accuracy. Writes report.md (with the verdict), results.json,
features.png and cosine_heatmaps.png to `out`. A killed study resumes: finished
models are kept, an unfinished one continues from its last epoch.
"""

import argparse
import dataclasses
import json
import os

from tfadv.config import CentersStudyConfig
from tfadv.recipes.centers import run_centers_study

# Settings. Every field is described in tfadv/config/centers.py; pixels and
# budgets are in [0, 1].
CONFIG = CentersStudyConfig(
    out="runs/centers",
    models=("A", "B", "C", "D"),
    epochs=25,
    arch="lenetpp",           # LeNets++ ("small": a smaller CNN)
    feature_dim=2,            # 2-D features can be plotted (features.png)
    data="embedded",          # 4,000 train / 1,000 test digits shipped with tfadv
    batch_size=32,
    max_lr=0.01,              # one-cycle SGD (Nesterov 0.9, weight decay 5e-4)
    center_weight=0.1,        # lambda of center loss (A, C, D)
    center_alpha=0.5,         # centre update rate (A, D)
    inverse_eps=4 / 255,      # inverse adversaries: the centres of C, and the extracted ones
    inverse_steps=5,
    adv_eps=0.3,              # model D's PGD training budget ...
    adv_steps=5,
    adv_clean_epochs=5.0,     # ... reached after clean epochs and a linear ramp
    adv_warmup_epochs=12.0,
    robust_eps=0.3,           # robust accuracy: worst case of the attacks at this budget
    robust_steps=40,
    seed=0,
)


def main(cfg: CentersStudyConfig):
    # Train, analyse and report; each model's results are kept as soon as it finishes.
    study = run_centers_study(cfg)

    # The summary, from the results file the study wrote (report.md has the rest).
    with open(os.path.join(cfg.out, "results.json")) as f:
        results = json.load(f)
    for name in cfg.models:
        r = results["models"][name]
        print(f"model {name}: clean accuracy {r['clean_accuracy']:.3f}, robust accuracy "
              f"{r['robust_accuracy']:.3f}")
    print("\n".join(f"- {line}" for line in results["verdict"]))
    print(f"report: {cfg.out}/report.md")
    return study


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CentersStudyConfig.quick: a few minutes on 2 CPU cores")
    parser.add_argument("--out", help=f"output directory (default {CONFIG.out})")
    args = parser.parse_args()
    out = args.out or (CONFIG.out + "-quick" if args.quick else CONFIG.out)
    main(CentersStudyConfig.quick(out) if args.quick else dataclasses.replace(CONFIG, out=out))
