"""Callbacks for long, resumable training runs."""

from __future__ import annotations

import json
import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfadv import files


def _to_builtin(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "numpy"):
        return np.asarray(value).item()
    return value


class JSONHistory(keras.callbacks.Callback):
    """Writes the per-epoch logs to a JSON file after every epoch.

    Resume-safe: on a restarted run (after `BackupAndRestore` has restored the
    epoch counter) rows of epochs that will be re-run are dropped, so the file
    ends with exactly one row per finished epoch. The file is replaced
    atomically, so a kill never leaves it half-written.

    Args:
        path: output file; its format is `{"epochs": [...], "<metric>": [...]}`.
    """

    def __init__(self, path):
        super().__init__()
        self.path = os.fspath(path)
        self.rows: list[dict] = []

    def _load(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            data = json.load(f)
        epochs = data.get("epoch", [])
        keys = [k for k in data if k != "epoch"]
        return [{"epoch": e, **{k: data[k][i] for k in keys}} for i, e in enumerate(epochs)]

    def on_epoch_begin(self, epoch, logs=None):
        # First epoch of this process: keep the rows of the epochs already done.
        if not self.rows:
            self.rows = [r for r in self._load() if r["epoch"] < epoch]
        else:
            self.rows = [r for r in self.rows if r["epoch"] < epoch]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": int(epoch)}
        row.update({k: _to_builtin(v) for k, v in (logs or {}).items()})
        self.rows.append(row)
        self.write()

    def read(self) -> dict:
        """The history the file holds now (one row per finished epoch)."""
        self.rows = self._load()
        return self.history()

    def history(self) -> dict:
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        return {k: [r.get(k) for r in self.rows] for k in keys}

    def write(self):
        files.write_json(self.path, self.history())


def backup_and_restore(backup_dir, **kwargs):
    """Keras' `BackupAndRestore` that keeps the previous checkpoint too.

    A kill while the weights file is being written tears the only copy of a
    plain `BackupAndRestore`, and the run can no longer resume; with
    `double_checkpoint` the previous epoch's copy is restored instead.
    Other keyword arguments go to `BackupAndRestore`.
    """
    return keras.callbacks.BackupAndRestore(os.fspath(backup_dir), double_checkpoint=True,
                                            **kwargs)


class EpochSeconds(keras.callbacks.Callback):
    """Adds each epoch's wall time to its logs as `epoch_seconds` (put it before loggers)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._t0


class EpsilonWarmup(keras.callbacks.Callback):
    """Ramps the training attack's budget linearly from 0 to eps over the first epochs.

    PGD training at the full budget from random initialisation can collapse to
    a constant prediction (the adversarial loss is flat at log(classes) and the
    model never leaves it); a short ramp of the budget avoids it. Validation
    attacks always use the full budget.

    The ramp is in epochs whatever the dataset: after batch `b` of an epoch
    `e` of `S` batches, the budget fraction is `(e + (b + 1) / S - start) / epochs`
    (clipped to [0, 1]). When the dataset's length is unknown (e.g. after
    `filter`, or `mix_with`), `S` is learned from the first epoch of each
    `fit`, and during an epoch of unknown length the budget is the ramp's value
    at the middle of that epoch, `(e + 1/2 - start) / epochs`. Epochs are
    counted from the epoch `fit` starts at, so a run resumed by
    `BackupAndRestore` continues the ramp where it stopped.

    Args:
        epochs: length of the ramp in epochs (may be fractional); 0 disables
            (the full budget from `start` on).
        start: epochs of clean training (budget 0) before the ramp begins (may
            be fractional). A model that has not left chance level yet (e.g.
            while a cyclic learning rate is still small) gains nothing from
            adversarial examples and can collapse under them.

    Raises:
        ValueError: epochs < 0 or start < 0.
    """

    def __init__(self, epochs: float, start: float = 0.0):
        super().__init__()
        if epochs < 0 or start < 0:
            raise ValueError(f"Expected epochs >= 0 and start >= 0. Received: epochs={epochs}, "
                             f"start={start}")
        self.epochs = float(epochs)
        self.start = float(start)
        self._epoch = 0
        self._steps = None  # batches per epoch, known or learned
        self._seen = 0

    def fraction(self, progress: float) -> float:
        """The budget fraction after `progress` epochs of training (in [0, 1])."""
        done = progress - self.start
        if self.epochs <= 0:
            return 1.0 if done > 0 else 0.0
        return float(min(1.0, max(0.0, done / self.epochs)))

    def _set(self, fraction):
        self.model.eps_fraction.assign(fraction)

    def on_train_begin(self, logs=None):
        steps = (self.params or {}).get("steps")
        self._steps = int(steps) if steps else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._seen = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps is None:
            self._set(self.fraction(self._epoch + 0.5))
            return
        within = min(1.0, (batch + 1) / self._steps)
        self._set(self.fraction(self._epoch + within))

    def on_train_batch_end(self, batch, logs=None):
        self._seen = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        if self._steps is None and self._seen > 0:
            self._steps = self._seen

    def on_train_end(self, logs=None):
        self._set(1.0)


class CatastrophicOverfittingWarning(UserWarning):
    """Robust accuracy under PGD collapsed during fast adversarial training."""


GUARD_ACTIONS = ("stop", "reduce_step")


def _real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool) and bool(np.isfinite(value))


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class CatastrophicOverfittingGuard(keras.callbacks.Callback):
    """Detects catastrophic overfitting of fast adversarial training, and undoes it.

    One-step methods (FGSM-RS, N-FGSM) can overfit catastrophically: within an
    epoch the accuracy under PGD falls to near zero while the accuracy under
    the training attack rises (Wong, Rice & Kolter, ICLR 2020, section 5.2).
    After every epoch this callback attacks a fixed batch with a short PGD;
    when the accuracy falls more than `threshold` below the best seen, it
    restores the network's weights of the best epoch (Wong et al.'s early
    stopping), prints and warns, and then either stops training
    (`on_overfit="stop"`) or continues with the fast step multiplied by
    `step_factor` (`"reduce_step"`, through the trainer's `step_scale`).

    A run can also overfit before it was ever robust (measured: FGSM-RS on
    MNIST at eps 0.3 from its second epoch, PGD accuracy 0.06-0.14 while FGSM
    accuracy rose to 0.87): there is no best to fall from. With `one_step`
    (FGSM at the training eps) the guard also measures the one-step
    attack's accuracy on the batch, and counts it as catastrophic
    overfitting when it exceeds the PGD accuracy by more than `gap` for
    `gap_epochs` epochs in a row: the model resists the adversary it trains
    against but not PGD, the gradient masking Wong et al. describe. One epoch
    is not enough: a healthy run's first epoch can show the same gap (free
    training, measured: FGSM 0.55 / PGD 0.00 in epoch 1, 0.82 / 0.56 in
    epoch 2). The action is the same; the best epoch's weights are restored
    when there is a better one.

    Each epoch's logs (and so `JSONHistory`'s history.json, when this callback
    comes before it) get `guard_robust_accuracy`, `guard_one_step_accuracy`
    (with `one_step`) and `catastrophic_overfitting` (1.0 in an epoch where
    it was detected); the events are in `events`, each with the `rule`
    that fired ("drop" or "gap"). With `state_dir` the best weights, the best
    accuracy, the step scale and the events are kept on disk and reloaded by a
    resumed run (put the callback before `BackupAndRestore`, so a backup
    holds the restored weights).

    Args:
        x, y: the fixed batch: inputs `[N, ...]` in the attack's bounds and
            int labels `[N]` (NumPy). Wong et al. use a training minibatch;
            held-out data works the same.
        attack: the PGD that measures it, e.g. `PGD(eps=0.3, steps=10)`.
        threshold: the drop from the best accuracy that counts as
            catastrophic (0.2: twenty points).
        one_step: the one-step attack of the gap rule, e.g.
            `FGSM(eps=0.3)`; None: the gap rule is off.
        gap: the one-step accuracy minus the PGD accuracy that counts.
        gap_epochs: epochs in a row the gap must last.
        on_overfit: "stop" or "reduce_step".
        step_factor: multiplies the step on each detection ("reduce_step").
        state_dir: directory for the guard's state (None: memory only).
        batch_size: examples per attack call.
        verbose: print each epoch's guard accuracy (detections always print).

    Raises:
        ValueError: threshold or gap outside (0, 1], gap_epochs below 1, an
            unknown on_overfit, a step_factor outside (0, 1), or x and y of
            different lengths.
    """

    def __init__(self, x, y, attack, *, threshold=0.2, on_overfit="stop", step_factor=0.5,
                 one_step=None, gap=0.4, gap_epochs=2, state_dir=None, batch_size=500,
                 verbose=0):
        super().__init__()
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"Expected 0 < threshold <= 1. Received: threshold={threshold}")
        if not (_real(gap) and 0.0 < float(gap) <= 1.0) or not (
                _integer(gap_epochs) and gap_epochs >= 1):
            raise ValueError(f"Expected a gap in (0, 1] and an integer gap_epochs >= 1. "
                             f"Received: gap={gap!r}, gap_epochs={gap_epochs!r}")
        if not (_integer(batch_size) and batch_size >= 1):
            raise ValueError(f"Expected an integer batch_size >= 1. Received: {batch_size!r}")
        if on_overfit not in GUARD_ACTIONS:
            raise ValueError(f"Expected on_overfit in {GUARD_ACTIONS}. Received: {on_overfit!r}")
        if not 0.0 < float(step_factor) < 1.0:
            raise ValueError(f"Expected 0 < step_factor < 1. Received: step_factor={step_factor}")
        self.x = np.asarray(x, np.float32)
        y = np.asarray(y)
        if y.size and not np.array_equal(y, np.round(y)):
            raise ValueError("Expected integer class labels y (not one-hot, not probabilities).")
        self.y = y.astype(np.int64).reshape(-1)
        if len(self.x) != len(self.y) or len(self.x) == 0:
            raise ValueError(f"Expected x and y of one non-zero length. Received: "
                             f"{len(self.x)} and {len(self.y)}")
        self.attack = attack
        self.one_step = one_step
        self.gap, self.gap_epochs = float(gap), int(gap_epochs)
        # Per epoch: did the gap exceed `gap`? Kept by epoch, so that an epoch trained again
        # after a kill (its state saved, its backup not) is not counted twice.
        self.gaps: dict[int, bool] = {}
        self.threshold = float(threshold)
        self.on_overfit = on_overfit
        self.step_factor = float(step_factor)
        self.state_dir = None if state_dir is None else os.fspath(state_dir)
        self.batch_size = int(batch_size)
        self.verbose = verbose
        self.best_accuracy = -1.0
        self.best_epoch = None
        self.best_weights = None
        self.events: list[dict] = []
        self._predict = {}

    # -- state -----------------------------------------------------------------
    STATE_FILE = "guard.json"

    def _paths(self):
        return (os.path.join(self.state_dir, self.STATE_FILE),
                os.path.join(self.state_dir, "best.weights.h5"))

    def _save_state(self, weights_changed):
        if self.state_dir is None:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        meta, weights = self._paths()
        if weights_changed:
            with files.atomic_path(weights, suffix=".weights.h5") as tmp:
                self.model.network.save_weights(tmp)
        files.write_json(meta, {"best_accuracy": self.best_accuracy,
                                "best_epoch": self.best_epoch,
                                "step_scale": float(self.model.step_scale.numpy()),
                                "gaps": {str(k): v for k, v in sorted(self.gaps.items())},
                                "events": self.events})

    @property
    def gap_streak(self) -> int:
        """Epochs in a row, up to the last one measured and since the last event, whose gap
        exceeded `gap`."""
        since = max((e["epoch"] for e in self.events), default=-1)
        streak, epoch = 0, max(self.gaps, default=-1)
        while epoch > since and self.gaps.get(epoch):
            streak, epoch = streak + 1, epoch - 1
        return streak

    @staticmethod
    def stopped_after(state_dir) -> int | None:
        """Epochs a run had trained when its guard stopped it (from `state_dir`), or None.

        A stopped run killed before its final evaluation is resumed for this many epochs
        (`fit(epochs=...)`): its backup holds the restored weights and nothing more is
        trained.
        """
        path = os.path.join(os.fspath(state_dir), CatastrophicOverfittingGuard.STATE_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            events = json.load(f).get("events") or []
        stops = [e["epoch"] for e in events if e.get("action") == "stop"]
        return max(stops) + 1 if stops else None

    def on_train_begin(self, logs=None):
        if not (hasattr(self.model, "network") and hasattr(self.model, "step_scale")):
            raise ValueError(
                f"CatastrophicOverfittingGuard watches a tfadv trainer (AdversarialModel, "
                f"EmbeddingAdversarialModel): its network and step_scale. Received a "
                f"{type(self.model).__name__}; wrap the model in a trainer first.")
        network = self.model.network
        self._predict = {}
        if self.state_dir is None:
            return
        meta, weights = self._paths()
        if not (os.path.exists(meta) and os.path.exists(weights)):
            return
        with open(meta) as f:
            state = json.load(f)
        self.best_accuracy = float(state["best_accuracy"])
        self.best_epoch = state["best_epoch"]
        self.events = list(state["events"])
        self.gaps = {int(k): bool(v) for k, v in (state.get("gaps") or {}).items()}
        self.model.step_scale.assign(float(state["step_scale"]))
        current = network.get_weights()
        network.load_weights(weights)
        self.best_weights = network.get_weights()
        network.set_weights(current)

    # -- measuring -------------------------------------------------------------
    def robust_accuracy(self):
        """The network's accuracy on the fixed batch under the guard's attack."""
        return self._accuracy(self.attack)

    def one_step_accuracy(self):
        """The network's accuracy on the fixed batch under `one_step` (None without it)."""
        return None if self.one_step is None else self._accuracy(self.one_step)

    def _accuracy(self, attack):
        network = self.model.network
        predict = self._predict.get(id(attack))
        if predict is None:
            @tf.function(reduce_retracing=True)
            def predict(x, y):
                x_adv = attack(network, x, y)
                return tf.argmax(network(x_adv, training=False), axis=-1)

            self._predict[id(attack)] = predict
        correct = 0
        for i in range(0, len(self.x), self.batch_size):
            x, y = self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
            correct += int(np.sum(predict(tf.constant(x), tf.constant(y)).numpy() == y))
        return correct / len(self.x)

    def on_epoch_end(self, epoch, logs=None):
        accuracy, one_step = self.robust_accuracy(), self.one_step_accuracy()
        network = self.model.network
        dropped = (self.best_weights is not None
                   and accuracy < self.best_accuracy - self.threshold)
        # A redone epoch (the run was killed after the guard saved it) replaces its record.
        self.events = [e for e in self.events if e["epoch"] < epoch]
        self.gaps = {k: v for k, v in self.gaps.items() if k < epoch}
        if one_step is not None:
            self.gaps[int(epoch)] = one_step - accuracy > self.gap
        masked = self.gap_streak >= self.gap_epochs
        detected = dropped or masked
        if logs is not None:
            logs["guard_robust_accuracy"] = accuracy
            if one_step is not None:
                logs["guard_one_step_accuracy"] = one_step
            logs["catastrophic_overfitting"] = float(detected)
        if self.verbose:
            print(f"guard: epoch {epoch + 1} PGD accuracy {accuracy:.3f} "
                  f"(best {max(self.best_accuracy, accuracy):.3f})"
                  + ("" if one_step is None else f", one-step accuracy {one_step:.3f}"))
        improved = accuracy > self.best_accuracy
        if improved:
            self.best_accuracy, self.best_epoch = accuracy, int(epoch)
            self.best_weights = network.get_weights()
        if detected:
            self._act(epoch, accuracy, one_step, rule="drop" if dropped else "gap")
        self._save_state(weights_changed=improved)

    def _act(self, epoch, accuracy, one_step, rule):
        """Restores the best epoch's weights (when an earlier epoch was better), then stops or
        shrinks the step; records, prints and warns."""
        restore = (self.best_epoch is not None and self.best_epoch != int(epoch)
                   and self.best_accuracy > accuracy)
        if restore:
            self.model.network.set_weights(self.best_weights)
        event = {"epoch": int(epoch), "rule": rule, "robust_accuracy": accuracy,
                 "best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                 "action": self.on_overfit}
        if one_step is not None:
            event["one_step_accuracy"] = one_step
        if self.on_overfit == "stop":
            self.model.stop_training = True
            then = "training stops"
        else:
            scale = float(self.model.step_scale.numpy()) * self.step_factor
            self.model.step_scale.assign(scale)
            event["step_scale"] = scale
            then = f"training continues with the step times {scale:g}"
        self.events.append(event)
        if rule == "drop":
            seen = (f"PGD accuracy on the guard batch fell to {accuracy:.3f} from "
                    f"{self.best_accuracy:.3f} (epoch {self.best_epoch + 1})")
        else:
            seen = (f"on the guard batch the one-step attack leaves {one_step:.3f} but PGD "
                    f"{accuracy:.3f}, a gap above {self.gap:g} "
                    + (f"for {self.gap_epochs} epochs in a row" if self.gap_epochs > 1
                       else "this epoch")
                    + ": the model resists the adversary it trains against, not PGD")
        kept = (f"The weights of epoch {self.best_epoch + 1} (PGD accuracy "
                f"{self.best_accuracy:.3f}) are restored" if restore
                else "No earlier epoch was better; the weights are kept")
        message = f"Catastrophic overfitting at epoch {epoch + 1}: {seen}. {kept} and {then}."
        print(f"\n*** {message} ***\n")
        warnings.warn(message, CatastrophicOverfittingWarning, stacklevel=3)
