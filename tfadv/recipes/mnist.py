"""Adversarial training of the reference CNN on MNIST, resumable, on any strategy."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from tfadv import files, models, runs
from tfadv.attacks import FGSM, PGD
from tfadv.config.core import FAST_METHODS, NOISE_METHODS
from tfadv.config.mnist import STRATEGIES, MnistTrainConfig  # noqa: F401 (re-exported)
from tfadv.config.options import option_names
from tfadv.data import mnist as mnist_data
from tfadv.evaluation import evaluate_robustness
from tfadv.trainers import AdversarialModel, CyclicLR, EpsilonWarmup, JSONHistory
from tfadv.trainers.callbacks import (CatastrophicOverfittingGuard, EpochSeconds,
                                      backup_and_restore)

def make_strategy(name: str):
    """The tf.distribute strategy for a name. Create it before any other TF work:
    MultiWorkerMirroredStrategy must exist before the first op runs (it reads
    TF_CONFIG to find its peers)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy multi-worker needs TF_CONFIG describing the cluster, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Expected strategy to be one of {STRATEGIES}. Received: {name!r}")


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def _eval_pgd(cfg: MnistTrainConfig) -> PGD:
    """The evaluation attack: PGD with random start (PGD's default step unless set)."""
    return PGD(eps=cfg.eps, steps=cfg.eval_steps, step_size=cfg.eval_step_size, norm=cfg.norm,
               random_start=True)


def _learning_rate(cfg: MnistTrainConfig, steps_per_epoch):
    """`cfg.learning_rate`, or Wong et al.'s cyclic schedule peaking at it mid-run."""
    if cfg.lr_schedule == "flat":
        return cfg.learning_rate
    if not steps_per_epoch:
        raise ValueError("--lr-schedule cyclic needs the number of batches per epoch.")
    # Each of free's replays is an optimizer step.
    per_batch = cfg.free_replays if cfg.method == "free" else 1
    return CyclicLR(cfg.learning_rate, cfg.epochs * steps_per_epoch * per_batch,
                    mode="triangular", min_lr=0.0)


def build_training_model(cfg: MnistTrainConfig, steps_per_epoch=None) -> AdversarialModel:
    """The chosen MNIST classifier (`cfg.model`) wrapped for adversarial training and compiled.

    The fast methods take eps from the training attack (its steps are unused).
    `steps_per_epoch` (batches) is needed by the cyclic learning rate.
    """
    attack = PGD(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, norm=cfg.norm,
                 random_start=True)
    eval_attack = _eval_pgd(cfg)
    base = models.MNIST_MODELS[cfg.model]()
    fast = {}
    if cfg.method in FAST_METHODS:
        fast = dict(fast_step=cfg.fast_step, fast_noise=cfg.fast_noise,
                    free_replays=cfg.free_replays)
    if cfg.method in NOISE_METHODS:
        fast = dict(noise_sigma=cfg.noise_sigma, noise_samples=cfg.noise_samples)
    model = AdversarialModel(
        base,
        attack=attack if cfg.method not in ("standard", "gaussian") else None,
        method=cfg.method,
        adv_ratio=cfg.adv_ratio,
        trades_beta=cfg.trades_beta,
        eval_attack=eval_attack,
        **fast,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(_learning_rate(cfg, steps_per_epoch)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=cfg.jit_compile,
    )
    model.build((None, 28, 28, 1))
    return model


def _guard_dir(cfg: MnistTrainConfig) -> str:
    """Where the chief keeps the guard's state (read back by a resumed run)."""
    return os.path.join(cfg.out, "guard")


def _guard(cfg: MnistTrainConfig, x_tr, y_tr, chief):
    """The catastrophic-overfitting guard of `cfg.guard_action`, or None.

    It attacks a fixed random sample of `guard_size` training digits with
    PGD-10 at the training eps (Wong et al. check a training minibatch) and
    with FGSM (its gap rule: `guard_gap`), and
    keeps its state in `out/guard` so that a resumed run continues it. A run
    with no training backup to resume from (a new run, or the same command
    after a finished one) starts the guard afresh: another run's best weights
    must not be restored into it.
    """
    state = _guard_dir(cfg)
    if chief and not os.path.isdir(os.path.join(cfg.out, "backup")):
        shutil.rmtree(state, ignore_errors=True)
    if cfg.guard_action is None:
        return None
    rng = np.random.default_rng(cfg.seed)
    rows = rng.choice(len(x_tr), min(cfg.guard_size, len(x_tr)), replace=False)
    return CatastrophicOverfittingGuard(
        x_tr[rows], y_tr[rows], PGD(eps=cfg.eps, steps=10, norm=cfg.norm, random_start=True),
        threshold=cfg.guard_threshold, on_overfit=cfg.guard_action,
        one_step=FGSM(eps=cfg.eps, norm=cfg.norm), gap=cfg.guard_gap,
        state_dir=state if chief else tempfile.mkdtemp())


# Settings a resumed run may change: how long it runs, how it is run, how it is judged.
RESUMABLE_CHANGES = ("out", "epochs", "verbose", "overwrite", "strategy", "data_dir",
                     "jit_compile", "eval_steps", "eval_step_size")


def train_mnist(cfg: MnistTrainConfig, strategy=None) -> dict:
    """Trains, evaluates and saves; resumes a killed run with the same `out`.

    Raises:
        ValueError: `out` holds a killed run with other settings.
        FileExistsError: `out` holds a finished run and `cfg.overwrite` is not set.

    Writes `out/model.keras` (the base classifier: (28, 28, 1) in [0, 1] ->
    10 logits), `out/history.json` (one row per finished epoch, clean and
    robust validation metrics) and `out/metrics.json`.

    Returns:
        The metrics dict written to metrics.json.
    """
    strategy = strategy or make_strategy(cfg.strategy)
    chief = _is_chief(strategy)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.mixed_precision:
        keras.mixed_precision.set_dtype_policy(cfg.mixed_precision)
    try:
        (x_tr, y_tr), (x_te, y_te) = mnist_data.load_train_test(
            cfg.data, cfg.data_dir, train_limit=cfg.limit, test_limit=cfg.limit, seed=cfg.seed)
        # After the data loaded: a bad data option leaves no output folder behind.
        files.output_dir(cfg.out)
        if chief:
            # A cyclic schedule's length is the run's: its epochs cannot change mid-run.
            mutable = [k for k in RESUMABLE_CHANGES
                       if k != "epochs" or cfg.lr_schedule == "flat"]
            runs.claim(cfg.out, dataclasses.asdict(cfg), finished="metrics.json",
                       mutable=mutable, overwrite=cfg.overwrite,
                       options=option_names(MnistTrainConfig), epochs=cfg.epochs,
                       defaults=dataclasses.asdict(MnistTrainConfig(out=cfg.out)))
        # Batches are global: each of the R replicas gets batch_size / R.
        train_ds = mnist_data.to_dataset(x_tr, y_tr, batch_size=cfg.batch_size, shuffle=True,
                                         seed=cfg.seed)
        x_val, y_val = mnist_data.subset(x_te, y_te, cfg.val_limit, cfg.seed)
        test_ds = mnist_data.to_dataset(x_val, y_val, batch_size=max(cfg.batch_size, 100))
        if cfg.strategy == "multi-worker":
            opts = tf.data.Options()
            opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
            train_ds, test_ds = train_ds.with_options(opts), test_ds.with_options(opts)

        with strategy.scope():
            model = build_training_model(cfg, -(-len(x_tr) // cfg.batch_size))
        # Non-chief workers must write their backups elsewhere (TF's rule).
        backup_dir = os.path.join(cfg.out, "backup") if chief else tempfile.mkdtemp()
        callbacks = [EpochSeconds()]
        guard = _guard(cfg, x_tr, y_tr, chief)
        if guard is not None:
            # Before the backup, so that a backup holds weights the guard restored.
            callbacks.append(guard)
        # Kept until metrics.json is written: a run killed in its final evaluation
        # resumes there instead of training again.
        callbacks.append(backup_and_restore(backup_dir, delete_checkpoint=False))
        if cfg.eps_warmup_epochs > 0 and cfg.method != "standard":
            callbacks.append(EpsilonWarmup(cfg.eps_warmup_epochs))
        history_cb = JSONHistory(os.path.join(cfg.out, "history.json")) if chief else None
        if history_cb:
            callbacks.append(history_cb)
        epochs = cfg.epochs
        stopped = (CatastrophicOverfittingGuard.stopped_after(_guard_dir(cfg))
                   if guard is not None else None)
        if stopped is not None and stopped < epochs:
            # The guard stopped this run and it was killed before its final evaluation:
            # the backup's weights are the ones the guard restored; nothing more is trained.
            print(f"The catastrophic-overfitting guard stopped this run after epoch {stopped}; "
                  "resuming at its final evaluation.")
            epochs = stopped
        t0 = time.perf_counter()
        model.fit(train_ds, validation_data=test_ds, epochs=epochs, callbacks=callbacks,
                  shuffle=False,  # the pipeline shuffles
                  verbose=cfg.verbose)
        train_seconds = time.perf_counter() - t0

        base = model.base
        result = evaluate_robustness(
            base, x_te, y_te,
            [_eval_pgd(cfg),
             FGSM(eps=cfg.eps, norm=cfg.norm)],
            batch_size=500,
        )
        metrics = {
            "config": dataclasses.asdict(cfg),
            "test": result.to_dict(),
            "eval_attack": f"PGD-{cfg.eval_steps} + FGSM, eps={cfg.eps} (L{cfg.norm}), worst "
                           "case per example",
            "train_seconds_this_run": train_seconds,
            "overfitting_events": [] if guard is None else guard.events,
            "replicas": strategy.num_replicas_in_sync,
        }
        if chief:
            with files.atomic_path(os.path.join(cfg.out, "model.keras")) as tmp:
                base.save(tmp)
            files.write_json(os.path.join(cfg.out, "metrics.json"), metrics)
            shutil.rmtree(backup_dir, ignore_errors=True)
        return metrics
    finally:
        if cfg.mixed_precision:
            keras.mixed_precision.set_dtype_policy("float32")
