"""The trainers with Keras' callbacks: monitor directions and the budget warm-up."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from tests.conftest import tiny_embedder
from tfadv.attacks import PGD, dodging_pgd
from tfadv.config import CenterLossConfig
from tfadv.trainers import EmbeddingAdversarialModel, EpsilonWarmup


def feature_net():
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    f = keras.layers.Dense(3, activation="tanh", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="classifier")(f))


def _adversarial():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, 8)
    model = tfadv.AdversarialModel(feature_net(), attack=PGD(eps=0.1, steps=1),
                                   center_loss=CenterLossConfig(num_classes=3))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])
    return model, x, y


def _embedding():
    rng = np.random.default_rng(0)
    y = np.arange(8) % 4
    x = (rng.uniform(0, 60, (8, 8, 8, 3)) + 50 * y[:, None, None, None]).astype("float32")
    model = EmbeddingAdversarialModel(
        tiny_embedder(8, 4), 4, attack=dodging_pgd(eps=8.0, steps=1), center_weight=0.1,
        teacher=tiny_embedder(8, 4, seed=5), distill_weight=0.1,
        eval_attack=dodging_pgd(eps=8.0, steps=1), eval_threshold=0.9)
    model.compile(optimizer="sgd")
    return model, x, y


UP, DOWN = keras.ops.greater, keras.ops.less
MONITORED = [
    (_adversarial, "val_robust_accuracy", UP),
    (_adversarial, "val_robust_loss", DOWN),
    (_adversarial, "center_loss", DOWN),
    (_adversarial, "val_accuracy", UP),
    (_embedding, "val_robust_accuracy", UP),
    (_embedding, "val_dodge_success", DOWN),
    (_embedding, "dodge_success", DOWN),
    (_embedding, "val_adv_cosine", UP),
    (_embedding, "center_loss", DOWN),
    (_embedding, "val_teacher_cosine", UP),
    (_embedding, "val_ce", DOWN),
    (_embedding, "val_accuracy", UP),
]


@pytest.mark.parametrize("make,monitor,direction", MONITORED,
                         ids=[f"{m.__name__[1:]}-{k}" for m, k, _ in MONITORED])
def test_keras_monitor_callbacks_find_the_direction_in_auto_mode(tmp_path, make, monitor,
                                                                 direction):
    model, x, y = make()
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, patience=5),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), monitor=monitor,
                                        save_best_only=True, save_weights_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, patience=5),
    ]
    hist = model.fit(x, y, validation_data=(x, y), batch_size=8, epochs=2, verbose=0,
                     callbacks=callbacks).history
    assert len(hist[monitor]) == 2
    for cb in callbacks:
        assert cb.mode == "auto" and cb.monitor_op is direction, type(cb).__name__
    assert (tmp_path / "best.weights.h5").exists()


# -- EpsilonWarmup ------------------------------------------------------------
class BudgetSpy(keras.callbacks.Callback):
    """The budget fraction each training step ran with, per epoch."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.seen, self.stop_at = {}, stop_at

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.seen.setdefault(self.epoch, []).append(float(self.model.eps_fraction.numpy()))
        if self.stop_at == (self.epoch, batch):
            raise KeyboardInterrupt("killed")


def _warmup_model():
    model = tfadv.AdversarialModel(feature_net(), attack=PGD(eps=0.1, steps=1))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    return model


def _filtered_data():
    """16 examples in batches of 4 behind a `filter`: the dataset's length is unknown."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, 16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(4)
    assert int(ds.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    return ds


def test_epsilon_warmup_counts_epochs_on_a_dataset_of_unknown_length():
    """2-epoch ramp over 3 epochs: epoch 0 (length unknown) runs at the ramp's
    mid-epoch value 0.25; then the length (4) is known and the ramp is per batch."""
    spy = BudgetSpy()
    model = _warmup_model()
    model.fit(_filtered_data(), epochs=3, verbose=0, callbacks=[EpsilonWarmup(2), spy])
    np.testing.assert_allclose(spy.seen[0], [0.25] * 4)
    np.testing.assert_allclose(spy.seen[1], [0.625, 0.75, 0.875, 1.0])
    np.testing.assert_allclose(spy.seen[2], [1.0] * 4)
    assert float(model.eps_fraction.numpy()) == 1.0


def test_epsilon_warmup_fraction_is_the_ramp_in_epochs():
    warm = EpsilonWarmup(2, start=1)
    got = [warm.fraction(t) for t in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)]
    np.testing.assert_allclose(got, [0, 0, 0, 0.25, 0.5, 1.0, 1.0])
    step = EpsilonWarmup(0, start=1)
    assert [step.fraction(t) for t in (0.5, 1.0, 1.5)] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("filtered", [False, True])
def test_epsilon_warmup_continues_after_backup_and_restore(tmp_path, filtered):
    """A run killed in epoch 1 and resumed by BackupAndRestore (fresh callbacks,
    as in a new process) continues the ramp at epoch 1, not from the start."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, 16)
    data = _filtered_data() if filtered else tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    model = _warmup_model()
    killed = BudgetSpy(stop_at=(1, 1))
    with pytest.raises(KeyboardInterrupt):
        model.fit(data, epochs=3, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(tmp_path)), EpsilonWarmup(2), killed])
    resumed = BudgetSpy()
    model = _warmup_model()
    model.fit(data, epochs=3, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path)), EpsilonWarmup(2), resumed])
    assert sorted(resumed.seen) == [1, 2]
    if filtered:
        # Epoch 1's length is unknown to the new process: its mid-epoch value.
        np.testing.assert_allclose(resumed.seen[1], [0.75] * 4)
    else:
        np.testing.assert_allclose(resumed.seen[1], [0.625, 0.75, 0.875, 1.0])
    np.testing.assert_allclose(resumed.seen[2], [1.0] * 4)
