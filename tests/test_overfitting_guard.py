"""CatastrophicOverfittingGuard: detection, restoring the best weights, stop or a smaller
step, its record in the logs and on disk, and a real catastrophic overfit."""

import json

import keras
import numpy as np
import pytest

import tfadv
from tfadv.attacks import PGD
from tfadv.trainers import JSONHistory
from tfadv.trainers.callbacks import CatastrophicOverfittingGuard, CatastrophicOverfittingWarning

RNG = np.random.default_rng(0)
Y = np.arange(64) % 2
X = (np.where(Y[:, None] == 1, 0.8, 0.2) + RNG.uniform(-0.05, 0.05, (64, 16))).astype("f4")
GUARD_ATTACK = PGD(eps=0.05, steps=5)


class Sabotage(keras.callbacks.Callback):
    """Flips the network's weights at the end of one epoch (a collapse the guard must see)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.weights = at, {}

    def on_epoch_end(self, epoch, logs=None):
        net = self.model.network
        self.weights[epoch] = net.get_weights()
        if epoch == self.at:
            net.set_weights([-w for w in net.get_weights()])


def trainer(method="fgsm_rs"):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((16,)), keras.layers.Dense(2)])
    model = tfadv.AdversarialModel(base, attack=PGD(eps=0.05), method=method)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def run(tmp_path, on_overfit, epochs=5, model=None):
    model = model or trainer()
    sabotage = Sabotage(at=2)
    guard = CatastrophicOverfittingGuard(X, Y, GUARD_ATTACK, on_overfit=on_overfit,
                                         state_dir=tmp_path / "guard")
    history = JSONHistory(tmp_path / "history.json")
    with pytest.warns(CatastrophicOverfittingWarning, match="epoch 3"):
        model.fit(X, Y, batch_size=16, epochs=epochs, verbose=0,
                  callbacks=[sabotage, guard, history])
    return model, sabotage, guard, json.loads((tmp_path / "history.json").read_text())


def test_detects_restores_the_best_weights_and_stops(tmp_path):
    model, sabotage, guard, history = run(tmp_path, "stop")
    assert history["epoch"] == [0, 1, 2]  # stopped after the collapse
    accuracy = history["guard_robust_accuracy"]
    assert accuracy[0] < accuracy[1] == 1.0 and accuracy[2] == 0.0
    assert history["catastrophic_overfitting"] == [0.0, 0.0, 1.0]
    # The best epoch's weights (the second epoch's) are back.
    for got, want in zip(model.network.get_weights(), sabotage.weights[1]):
        np.testing.assert_array_equal(got, want)
    assert guard.events == [{"epoch": 2, "rule": "drop", "robust_accuracy": 0.0,
                             "best_accuracy": 1.0, "best_epoch": 1, "action": "stop"}]
    assert guard.robust_accuracy() == 1.0


def test_reduce_step_continues_with_half_the_step_and_resumes_from_disk(tmp_path):
    model, _, guard, history = run(tmp_path, "reduce_step")
    assert history["epoch"] == [0, 1, 2, 3, 4]
    assert history["catastrophic_overfitting"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert float(model.step_scale.numpy()) == 0.5
    assert guard.events[0]["step_scale"] == 0.5
    state = json.loads((tmp_path / "guard" / "guard.json").read_text())
    assert state["step_scale"] == 0.5 and state["best_accuracy"] == 1.0
    # A resumed run (a new process: a new trainer and guard) picks the state up.
    again = trainer()
    fresh = CatastrophicOverfittingGuard(X, Y, GUARD_ATTACK, state_dir=tmp_path / "guard")
    fresh.set_model(again)
    fresh.on_train_begin()
    assert float(again.step_scale.numpy()) == 0.5
    assert fresh.best_accuracy == 1.0 and fresh.events == guard.events
    for got, want in zip(fresh.best_weights, guard.best_weights):
        np.testing.assert_array_equal(got, want)


def test_no_collapse_no_event(tmp_path):
    model = trainer()
    guard = CatastrophicOverfittingGuard(X, Y, GUARD_ATTACK)
    hist = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[guard]).history
    assert hist["catastrophic_overfitting"] == [0.0, 0.0] and guard.events == []


class Scripted:
    """A stand-in attack whose adversaries are the clean batch (accuracy 1.0) or its
    mirror image 1 - x (accuracy 0.0 on X), epoch by epoch as scripted."""

    def __init__(self, breaks):
        self.breaks, self.calls = list(breaks), 0

    def __call__(self, model, x, y):
        import tensorflow as tf

        adv = tf.py_function(self._adv, [x], tf.float32)
        adv.set_shape(x.shape)
        return adv

    def _adv(self, x):
        # One call per epoch: the guard's batch (64) is within one attack call.
        self.calls += 1
        epoch = min(self.calls - 1, len(self.breaks) - 1)
        return 1.0 - x if self.breaks[epoch] else x


def scripted_guard(tmp_path, pgd_breaks, one_step_breaks, **kwargs):
    model = trainer()
    # Trained first, so that the mirror image of every example is misclassified.
    model.fit(X, Y, batch_size=16, epochs=5, verbose=0)
    pgd, one_step = Scripted(pgd_breaks), Scripted(one_step_breaks)
    guard = CatastrophicOverfittingGuard(X, Y, pgd, one_step=one_step,
                                         state_dir=tmp_path / "guard", **kwargs)
    return model, guard, pgd


def test_gap_two_epochs_in_a_row_is_caught_without_a_drop(tmp_path):
    """PGD breaks everything from the start (no best to drop from) while the one-step attack
    breaks nothing: caught at the second epoch of the gap, weights kept (none was better)."""
    model, guard, _ = scripted_guard(tmp_path, [True] * 5, [False] * 5)
    before = {}

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            before[epoch] = self.model.network.get_weights()

    with pytest.warns(CatastrophicOverfittingWarning, match="epoch 2: on the guard batch the "
                      "one-step attack leaves 1.000 but PGD 0.000.*No earlier epoch was better"):
        hist = model.fit(X, Y, batch_size=16, epochs=5, verbose=0,
                         callbacks=[Keep(), guard]).history
    assert hist["catastrophic_overfitting"] == [0.0, 1.0]
    assert hist["guard_one_step_accuracy"] == [1.0, 1.0]
    assert guard.events == [{"epoch": 1, "rule": "gap", "robust_accuracy": 0.0,
                             "best_accuracy": 0.0, "best_epoch": 0, "action": "stop",
                             "one_step_accuracy": 1.0}]
    for got, want in zip(model.network.get_weights(), before[1]):
        np.testing.assert_array_equal(got, want)


def test_a_one_epoch_gap_is_not_a_collapse_and_the_streak_survives_a_resume(tmp_path):
    # Gap in epoch 1 only (a healthy run's first epoch), then closed: nothing.
    model, guard, _ = scripted_guard(tmp_path, [True, False, False], [False] * 3)
    hist = model.fit(X, Y, batch_size=16, epochs=3, verbose=0, callbacks=[guard]).history
    assert hist["catastrophic_overfitting"] == [0.0, 0.0, 0.0] and guard.events == []
    # The gaps of a killed run's last epochs count with the first epoch of its resumption
    # (which continues at the next epoch, as BackupAndRestore resumes it).
    model, guard, _ = scripted_guard(tmp_path / "b", [True], [False], gap_epochs=3,
                                     on_overfit="reduce_step")
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[guard])
    assert guard.gap_streak == 2
    again, fresh, _ = scripted_guard(tmp_path / "b", [True], [False], gap_epochs=3,
                                     on_overfit="reduce_step")
    with pytest.warns(CatastrophicOverfittingWarning, match="for 3 epochs in a row"):
        hist = again.fit(X, Y, batch_size=16, epochs=3, initial_epoch=2, verbose=0,
                         callbacks=[fresh]).history
    assert hist["catastrophic_overfitting"] == [1.0] and fresh.gap_streak == 0
    assert float(again.step_scale.numpy()) == 0.5


def test_no_one_step_attack_no_gap_rule(tmp_path):
    model = trainer()
    guard = CatastrophicOverfittingGuard(X, Y, Scripted([True]))
    hist = model.fit(X, Y, batch_size=16, epochs=3, verbose=0, callbacks=[guard]).history
    assert hist["catastrophic_overfitting"] == [0.0] * 3 and "guard_one_step_accuracy" not in hist


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.0), "threshold"), (dict(on_overfit="restart"), "on_overfit"),
    (dict(step_factor=1.0), "step_factor"), (dict(gap=0.0), "gap"),
    (dict(gap=1.5), "gap"), (dict(gap_epochs=0), "gap_epochs"), (dict(gap="abc"), "gap"),
    (dict(gap=None), "gap"), (dict(gap=float("nan")), "gap"), (dict(gap_epochs=1.9), "gap_epochs"),
    (dict(gap_epochs=True), "gap_epochs"), (dict(gap_epochs=float("inf")), "gap_epochs"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-5), "batch_size")])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CatastrophicOverfittingGuard(X, Y, GUARD_ATTACK, **kwargs)


def test_float_labels_and_a_plain_keras_model_are_refused():
    with pytest.raises(ValueError, match="integer class labels"):
        CatastrophicOverfittingGuard(X, Y * 0.7, GUARD_ATTACK)
    plain = keras.Sequential([keras.Input((16,)), keras.layers.Dense(2)])
    plain.compile("sgd", "sparse_categorical_crossentropy")
    guard = CatastrophicOverfittingGuard(X, Y, GUARD_ATTACK)
    with pytest.raises(ValueError, match="watches a tfadv trainer"):
        plain.fit(X, Y, epochs=1, verbose=0, callbacks=[guard])


def test_an_epoch_trained_again_after_a_kill_is_not_counted_twice(tmp_path):
    """The guard saves its state before the backup: a kill in between trains the epoch again,
    and its gap (and any event) replaces the first record instead of adding to it."""
    model, guard, _ = scripted_guard(tmp_path, [True], [False], gap_epochs=3)
    guard.set_model(model)
    guard.on_train_begin()
    logs = {}
    guard.on_epoch_end(0, logs)
    guard.on_epoch_end(1, logs)
    assert guard.gap_streak == 2
    guard.on_epoch_end(1, logs)  # epoch 1 again
    assert guard.gap_streak == 2 and guard.events == []
    state = json.loads((tmp_path / "guard" / "guard.json").read_text())
    assert state["gaps"] == {"0": True, "1": True}
    with pytest.warns(CatastrophicOverfittingWarning):
        guard.on_epoch_end(2, logs)
    with pytest.warns(CatastrophicOverfittingWarning):
        guard.on_epoch_end(2, logs)  # the stop epoch again: one event, not two
    assert [e["epoch"] for e in guard.events] == [2]
    assert CatastrophicOverfittingGuard.stopped_after(tmp_path / "guard") == 3
    assert CatastrophicOverfittingGuard.stopped_after(tmp_path / "nothing") is None


def test_mismatched_batch():
    with pytest.raises(ValueError, match="one non-zero length"):
        CatastrophicOverfittingGuard(X, Y[:3], GUARD_ATTACK)


@pytest.mark.slow
def test_a_real_catastrophic_overfit_is_caught(mnist_small):
    """PGD training makes a model somewhat robust; FGSM training (zero start, Adam 3e-3) then
    overfits catastrophically (measured: in 6 epochs FGSM accuracy 0.26 -> 0.62 while PGD
    accuracy 0.225 -> 0.035, the loss falling). The guard sees the collapse after the first
    epoch, restores the PGD-trained weights and stops."""
    x, y = mnist_small[0], mnist_small[1]
    keras.utils.set_random_seed(0)
    base = tfadv.models.mnist_cnn()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    pgd = tfadv.AdversarialModel(base, attack=PGD(eps=0.3, steps=5, step_size=0.15))
    pgd.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    guard = CatastrophicOverfittingGuard(x[:200], y[:200], PGD(eps=0.3, steps=10),
                                         threshold=0.15)
    pgd.fit(x, y, batch_size=50, epochs=6, verbose=0, callbacks=[guard])
    robust, robust_weights = guard.best_accuracy, [w.copy() for w in guard.best_weights]
    assert robust >= 0.18 and guard.events == []
    fgsm_before = float(np.mean(np.argmax(base(tfadv.attacks.FGSM(eps=0.3)(
        base, x[:200], y[:200])), -1) == y[:200]))

    class Probe(keras.callbacks.Callback):
        """FGSM and PGD accuracy on the guard batch, before the guard acts."""

        def on_epoch_end(self, epoch, logs=None):
            fgsm = tfadv.attacks.FGSM(eps=0.3)(base, x[:200], y[:200])
            pgd_adv = PGD(eps=0.3, steps=10)(base, x[:200], y[:200])
            self.fgsm = float(np.mean(np.argmax(base(fgsm), -1) == y[:200]))
            self.pgd = float(np.mean(np.argmax(base(pgd_adv), -1) == y[:200]))

    fast = tfadv.AdversarialModel(base, attack=PGD(eps=0.3), method="fgsm_rs", fast_noise=0.0,
                                  fast_step=1.0)
    fast.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    probe = Probe()
    with pytest.warns(CatastrophicOverfittingWarning):
        hist = fast.fit(x, y, batch_size=50, epochs=4, verbose=0,
                        callbacks=[probe, guard]).history
    assert hist["catastrophic_overfitting"][-1] == 1.0 and len(hist["loss"]) < 4
    # Its signature: robust to the training attack, not to PGD.
    assert probe.pgd < robust - 0.15 and probe.fgsm >= fgsm_before - 0.05
    assert probe.fgsm > probe.pgd + 0.15
    for got, want in zip(base.get_weights(), robust_weights):
        np.testing.assert_array_equal(got, want)


def test_a_new_run_in_a_finished_runs_folder_starts_the_guard_afresh(tmp_path):
    """The same command after a finished run (no backup left) trains anew: the old run's
    guard state (its best weights) must not be restored into it; a resumable run keeps it."""
    from tfadv.config.mnist import MnistTrainConfig
    from tfadv.recipes import mnist as recipe

    cfg = MnistTrainConfig(out=str(tmp_path), method="fgsm_rs", guard_size=8)
    state = tmp_path / "guard"
    state.mkdir()
    (state / "guard.json").write_text('{"best_accuracy": 0.9}')
    (tmp_path / "backup").mkdir()
    recipe._guard(cfg, X[:16, :1], Y[:16], chief=True)
    assert (state / "guard.json").exists()  # a resumed run continues its guard
    (tmp_path / "backup").rmdir()
    guard = recipe._guard(cfg, X[:16, :1], Y[:16], chief=True)
    assert not state.exists() and guard.state_dir == str(state)


@pytest.mark.slow
def test_overfitting_from_the_start_is_caught_by_the_gap(tmp_path):
    """`tfadv train mnist --method fgsm_rs` on the embedded digits (eps 0.3) overfits before it
    is ever robust (measured: guard-batch PGD accuracy 0.02, 0.21, 0.14 while FGSM's rose
    0.39, 0.73, 0.86): no drop from a best, but the gap rule stops it at epoch 3."""
    from tfadv.config.mnist import MnistTrainConfig
    from tfadv.recipes.mnist import train_mnist

    import tfadv.recipes.mnist as recipe

    cfg = MnistTrainConfig(out=str(tmp_path / "run"), method="fgsm_rs", epochs=6, seed=0,
                           verbose=0, val_limit=200, eval_steps=5)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the final evaluation

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe, "evaluate_robustness", killed)
        with pytest.warns(CatastrophicOverfittingWarning, match="one-step attack leaves"):
            with pytest.raises(KeyboardInterrupt):
                train_mnist(cfg)
    assert (tmp_path / "run" / "backup").is_dir()
    # The same command again: straight to the final evaluation, nothing more trained.
    train_mnist(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    pgd, fgsm = history["guard_robust_accuracy"], history["guard_one_step_accuracy"]
    stopped = len(pgd)
    assert stopped <= 4 and history["catastrophic_overfitting"][-1] == 1.0
    assert history["epoch"] == list(range(stopped))
    assert all(f - p > 0.4 for f, p in zip(fgsm[-2:], pgd[-2:]))
    assert max(pgd) < 0.5
    guard = json.loads((tmp_path / "run" / "guard" / "guard.json").read_text())
    assert [e["rule"] for e in guard["events"]] == ["gap"]
