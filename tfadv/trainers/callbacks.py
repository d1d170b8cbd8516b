"""Callbacks for long, resumable training runs."""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np

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
