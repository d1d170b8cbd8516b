"""Time to robustness: how long each training method takes to reach a robust accuracy.

On the reference CNN, the embedded MNIST split (4,000 training digits, the
1,000 test digits), batch 50, Linf eps 0.3, each method trains for `--epochs`
epochs:

  - tfadv `pgd` (PGD-10, the README recipe), `trades`, `fgsm_rs`, `n_fgsm`,
    `free` (`tfadv train mnist` settings: `tfadv.recipes.mnist`), the fast
    methods with their catastrophic-overfitting guard on (it may stop them);
  - `art`: ART's `AdversarialTrainerMadryPGD` on the same model (PGD-10, eps
    step 0.04, Adam 1e-3, as bench/pgd_train.py sets it up).

After every epoch the model is checked (the checking time is not counted):
ART's PGD-40 (step 0.01, random start) on the 1,000 test digits, then, when
that leaves at least `--target`, our AutoAttack (standard) on the digits
PGD-40 did not break, run by run (APGD-CE, APGD-T's targets, FAB-T, Square)
and stopped as soon as fewer than `--target` of the 1,000 stand: each run only
lowers the accuracy, so a stopped epoch is below the target, and only a
cascade run to its end counts as reaching it. The robust accuracy is the
worst case of all, per digit.
Once a method has reached the target, only its last epoch is checked again.
Training wall and CPU seconds are summed up to the first epoch that reaches
the target. Targets: the fastest tfadv method reaches it in at most 1/3 of
tfadv PGD-10's time (and so at least 10x faster than ART), at clean accuracy
>= 0.97.

Every finished epoch is kept in `--state DIR/METHOD/` (the training backup and
`epochs.json`); a killed run resumes at the epoch it was in, and a method
whose epochs are all done is not trained again: a finished method's
`epochs.json` and `run.json` alone (without the backup) carry it to another
machine (copy them into `--state DIR/METHOD/`); the finished methods' records
behind the README's table are in bench/results/time_to_robustness/.

    python bench/time_to_robustness.py --state runs/bench-ttr --json runs/bench-ttr/summary.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

METHODS = ("pgd", "trades", "fgsm_rs", "n_fgsm", "free", "art")
TFADV_METHODS = METHODS[:-1]
EPS, BATCH = 0.3, 50
SPEED_TARGET = 1 / 3
CLEAN_TARGET = 0.97


def log(msg):
    print(msg, flush=True)


# -- checking ----------------------------------------------------------------
def art_classifier(network):
    import tensorflow as tf
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model=network, nb_classes=10, input_shape=(28, 28, 1), clip_values=(0.0, 1.0),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def check(network, x, y, target):
    """Clean accuracy, ART PGD-40 accuracy and (when PGD-40 leaves >= target) the worst case
    of PGD-40 and our AutoAttack, per digit."""
    warnings.filterwarnings("ignore", message=".*PyTorch not found.*")
    from art.attacks.evasion import ProjectedGradientDescent

    start = time.perf_counter()
    classifier = art_classifier(network)
    clean = np.argmax(classifier.predict(x, batch_size=500), 1) == y
    pgd = ProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=0.01, max_iter=40,
                                   num_random_init=1, batch_size=500, verbose=False)
    x_adv = pgd.generate(x=x, y=y)
    standing = clean & (np.argmax(classifier.predict(x_adv, batch_size=500), 1) == y)
    out = {"clean": float(clean.mean()), "art_pgd40": float(standing.mean()),
           "autoattack": None, "worst": float(standing.mean())}
    if standing.mean() >= target and standing.any():
        standing = cascade(network, x, y, standing, target, out)
    out["check_s"] = time.perf_counter() - start
    return out


def cascade(network, x, y, standing, target, out):
    """AutoAttack (standard) run by run on the digits still standing, stopped early.

    The cascade's runs (APGD-CE, APGD-T's 9 targets, FAB-T, Square) only ever
    lower the accuracy, so once fewer than `target` of all digits stand the
    epoch is below the target and the rest is skipped (about a quarter of the
    cascade's time instead of 20 minutes on 2 cores). Only a cascade run to
    its end sets out["autoattack"]; a stopped one leaves its upper bound in
    out["worst"] and says where it stopped.
    """
    from tfadv.evaluation.autoattack import autoattack, autoattack_suite

    standing = standing.copy()
    need = int(np.ceil(target * len(y) - 1e-9))
    square_broke = 0
    for name, runs in autoattack_suite("inf", EPS, num_classes=10).items():
        for run in runs:
            idx = np.flatnonzero(standing)
            with contextlib.redirect_stdout(io.StringIO()):
                result = autoattack(network, x[idx], y[idx], norm="inf", eps=EPS,
                                    batch_size=500, checks=False, suite={name: [run]})
            standing[idx] = result.correct
            out["worst"] = float(standing.mean())
            if name == "apgd-ce":
                out["apgd_ce"] = out["worst"]
            if name == "square":
                square_broke = int((~result.correct).sum())
            if standing.sum() < need:
                out["stopped_after"] = name
                return standing
    # Square, the black-box part, breaking digits the gradient attacks left is the masking sign.
    out["square_broke"] = square_broke
    out["autoattack"] = out["worst"]
    return standing


class Rows:
    """epochs.json of one method: one row per finished epoch, replaced atomically."""

    def __init__(self, path):
        from tfadv import files

        self.path, self._write = path, files.write_json
        self.rows = []
        if os.path.exists(path):
            with open(path) as f:
                self.rows = json.load(f)["epochs"]

    def keep_before(self, epoch):
        self.rows = [r for r in self.rows if r["epoch"] < epoch]

    def add(self, row):
        self.keep_before(row["epoch"])
        self.rows.append(row)
        self._write(self.path, {"epochs": self.rows})

    def finished(self, epochs):
        """All epochs done, or the guard stopped the run (its last row says so)."""
        return len(self.rows) >= epochs or bool(self.rows and self.rows[-1].get("finished"))

    def reached(self, target):
        return any(r.get("worst") is not None and r["worst"] >= target
                   and r.get("autoattack") is not None for r in self.rows)


def should_check(rows, epoch, epochs, target):
    return epoch == epochs - 1 or not rows.reached(target)


# -- training ----------------------------------------------------------------
def claim_state(state, method, args):
    """A method's saved epochs are continued only by a run with the same settings."""
    from tfadv import runs

    runs.claim(state, {"method": method, "seed": args.seed, "eps": EPS, "batch_size": BATCH,
                       "target": args.target, "epochs": args.epochs},
               finished=None, mutable=("epochs",), backup="epochs.json")


def train_tfadv(method, args, data, state):
    import keras

    from tfadv.config.mnist import MnistTrainConfig
    from tfadv.data import mnist as mnist_data
    from tfadv.recipes import mnist as recipe
    from tfadv.trainers import EpsilonWarmup
    from tfadv.trainers.callbacks import backup_and_restore

    (x_tr, y_tr), (x_te, y_te) = data
    claim_state(state, method, args)
    rows = Rows(os.path.join(state, "epochs.json"))
    if rows.finished(args.epochs):
        log(f"  {method}: finished ({state}/epochs.json)")
        return rows.rows
    cfg = MnistTrainConfig(out=state, method=method, epochs=args.epochs, batch_size=BATCH,
                           eps=EPS, seed=args.seed, verbose=0)
    keras.utils.set_random_seed(args.seed)
    model = recipe.build_training_model(cfg, -(-len(x_tr) // BATCH))
    # The recipe's own per-epoch robust validation is not part of the training time here.
    model.eval_attack = None
    guard = recipe._guard(cfg, x_tr, y_tr, chief=True)

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            rows.keep_before(epoch)
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            # First in the list: the guard and the checks are not counted.
            self.row = {"epoch": epoch, "train_wall_s": time.perf_counter() - self.t,
                        "train_cpu_s": time.process_time() - self.c}

    clock = Clock()

    class Check(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            row = dict(clock.row)
            if logs and "guard_robust_accuracy" in logs:
                row["guard"] = float(logs["guard_robust_accuracy"])
                row["catastrophic_overfitting"] = bool(logs["catastrophic_overfitting"])
            last = epoch == args.epochs - 1 or self.model.stop_training
            if last or not rows.reached(args.target):
                row.update(check(self.model.network, x_te, y_te, args.target))
            row["finished"] = last
            rows.add(row)
            log(f"  {method} epoch {epoch + 1}: {fmt(row)}")

    callbacks = [clock]
    if cfg.eps_warmup_epochs > 0 and method != "standard":
        callbacks.append(EpsilonWarmup(cfg.eps_warmup_epochs))
    if guard is not None:
        callbacks.append(guard)
    callbacks += [Check(), backup_and_restore(os.path.join(state, "backup"))]
    train_ds = mnist_data.to_dataset(x_tr, y_tr, batch_size=BATCH, shuffle=True, seed=args.seed)
    model.fit(train_ds, epochs=args.epochs, callbacks=callbacks, verbose=0)
    return rows.rows


def train_art(args, data, state):
    import keras

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pgd_train import art_trainer

    (x_tr, y_tr), (x_te, y_te) = data
    claim_state(state, "art", args)
    rows = Rows(os.path.join(state, "epochs.json"))
    if rows.finished(args.epochs):
        log(f"  art: finished ({state}/epochs.json)")
        return rows.rows
    keras.utils.set_random_seed(args.seed)
    trainer = art_trainer()
    network = trainer.get_classifier().model
    weights = os.path.join(state, "art.weights.h5")
    done = len(rows.rows)
    if done and os.path.exists(weights):
        network.load_weights(weights)  # the optimizer's moments restart (ART keeps them)
    else:
        rows.keep_before(0)
        done = 0
    from tfadv import files

    for epoch in range(done, args.epochs):
        t, c = time.perf_counter(), time.process_time()
        with contextlib.redirect_stderr(io.StringIO()):
            trainer.fit(x_tr, y_tr, nb_epochs=1, batch_size=BATCH)
        row = {"epoch": epoch, "train_wall_s": time.perf_counter() - t,
               "train_cpu_s": time.process_time() - c}
        if should_check(rows, epoch, args.epochs, args.target):
            row.update(check(network, x_te, y_te, args.target))
        with files.atomic_path(weights, suffix=".weights.h5") as tmp:
            network.save_weights(tmp)
        rows.add(row)
        log(f"  art epoch {epoch + 1}: {fmt(row)}")
    return rows.rows


# -- summary -----------------------------------------------------------------
def fmt(row):
    parts = [f"train {row['train_wall_s']:.1f} s wall, {row['train_cpu_s']:.1f} s CPU"]
    if "clean" in row:
        parts.append(f"clean {row['clean']:.3f}, ART PGD-40 {row['art_pgd40']:.3f}")
        if row.get("apgd_ce") is not None:
            parts.append(f"APGD-CE {row['apgd_ce']:.3f}")
        if row.get("autoattack") is not None:
            parts.append(f"worst with AutoAttack {row['worst']:.3f}"
                         + (f" (Square broke {row['square_broke']} the gradients left)"
                            if row.get("square_broke") else ""))
        elif row.get("stopped_after"):
            parts.append(f"below the target after {row['stopped_after']}: {row['worst']:.3f}")
    if "guard" in row:
        parts.append(f"guard {row['guard']:.3f}")
    return "; ".join(parts)


def summarize(rows, target):
    """Time to the first epoch whose worst case (AutoAttack included) reaches the target."""
    wall = cpu = 0.0
    reached = None
    for r in rows:
        wall += r["train_wall_s"]
        cpu += r["train_cpu_s"]
        if r.get("autoattack") is not None and r["worst"] >= target and reached is None:
            reached = {"epoch": r["epoch"] + 1, "wall_s": wall, "cpu_s": cpu,
                       "clean": r["clean"], "worst": r["worst"]}
    last = [r for r in rows if "clean" in r]
    final = last[-1] if last else None
    return {"epochs_run": len(rows), "reached": reached,
            "final": None if final is None else {
                "epoch": final["epoch"] + 1, "clean": final["clean"],
                "art_pgd40": final["art_pgd40"], "worst": final["worst"],
                "autoattack_run": final.get("autoattack") is not None,
                "stopped_after": final.get("stopped_after")},
            "train_wall_s": wall, "train_cpu_s": cpu,
            "guard_stopped": any(r.get("catastrophic_overfitting") for r in rows)}


def report(summary, target):
    log(f"\nTime to robust accuracy {target:.2f} (worst of ART PGD-40 and AutoAttack, "
        f"1,000 digits, eps {EPS}):")
    log(f"{'method':8s} {'epoch':>5s} {'wall s':>8s} {'CPU s':>8s} {'clean':>6s} "
        f"{'final clean':>11s} {'final robust':>12s}")
    for name, s in summary.items():
        r, f = s["reached"], s["final"] or {}
        reach = (f"{r['epoch']:5d} {r['wall_s']:8.0f} {r['cpu_s']:8.0f} {r['clean']:6.3f}"
                 if r else f"{'never':>5s} {'-':>8s} {'-':>8s} {'-':>6s}")
        robust = f.get("worst")
        if robust is not None and f.get("stopped_after"):
            robust = f"<= {robust:.3f} (AA)"  # the cascade stopped below the target
        elif robust is not None:
            robust = f"{robust:.3f}" + ("" if f.get("autoattack_run") else " (PGD)")
        else:
            robust = "-"
        log(f"{name:8s} {reach} {f.get('clean', float('nan')):11.3f} {robust:>12s}"
            + ("  [stopped by the guard]" if s["guard_stopped"] else ""))
    pgd = (summary.get("pgd") or {}).get("reached")
    art = (summary.get("art") or {}).get("reached")
    # PGD-10 is the yardstick, not a candidate.
    fast = [(s["reached"]["cpu_s"], n) for n, s in summary.items()
            if n in TFADV_METHODS and n != "pgd" and s["reached"]
            and s["reached"]["clean"] >= CLEAN_TARGET]
    if fast:
        cpu, name = min(fast)
        if pgd:
            log(f"fastest tfadv method ({name}) / tfadv PGD-10, CPU: {cpu / pgd['cpu_s']:.3f} "
                f"(target <= {SPEED_TARGET:.3f})")
        if art:
            log(f"fastest tfadv method ({name}) / ART PGD-10, CPU: {cpu / art['cpu_s']:.3f} "
                f"(target <= 0.1)")
    else:
        log(f"no tfadv method but PGD-10 reached {target:.2f} at clean accuracy >= "
            f"{CLEAN_TARGET}: the speed target is missed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target", type=float, default=0.80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", default="runs/bench-ttr",
                   help="directory for finished epochs: a killed run resumes from it")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or args.epochs < 1 or not 0 < args.target <= 1:
        p.error(f"methods from {METHODS}, --epochs >= 1, 0 < --target <= 1 (got {bad})")

    from tfadv.data import mnist as mnist_data

    data = mnist_data.load_train_test("embedded")
    summary = {}
    for method in methods:
        state = os.path.join(args.state, method)
        os.makedirs(state, exist_ok=True)
        log(f"{method}:")
        rows = (train_art(args, data, state) if method == "art"
                else train_tfadv(method, args, data, state))
        summary[method] = summarize(rows, args.target)
    report(summary, args.target)
    if args.json:
        from tfadv import files

        files.write_json(args.json, {"target": args.target, "eps": EPS, "batch_size": BATCH,
                                     "epochs": args.epochs, "methods": summary})


if __name__ == "__main__":
    main()
