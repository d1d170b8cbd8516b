"""Run as a script under MirroredStrategy (2 logical CPUs) and mixed_float16; prints a JSON line.

Each trainer fits, epoch after epoch, a batch of 4 whose second half
(replica 1) overflows the scaled float16 gradients while the first half
(replica 0) does not, until the loss scale is low enough, then a batch of one
example (replica 1 empty). After every step the script records the loss scale,
whether the weights are finite, and the trainable weights, in three runs: mirrored,
on one device, and mirrored with a plain `optimizer.apply` in the trainers
("mirrored_plain_apply": the step as Keras' LossScaleOptimizer decides it,
from replica 0's gradients alone).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfadv  # noqa: E402
from tfadv.trainers import base  # noqa: E402

INITIAL_SCALE = 2.0**15
EPOCHS = 12


def classifier_data():
    # Replica 0 gets the two small inputs, replica 1 the two large ones: the
    # kernel gradients grow with the input.
    x = np.full((5, 4), 0.01, np.float32)
    x[2:4] = 300.0
    return x, np.array([0, 1, 0, 1, 0])


def embedding_data():
    # Replica 1's inputs are tiny: the gradient of the L2 normalisation, and
    # with it the embedder's bias gradient, grows as 1 / |e|.
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (5, 4)).astype(np.float32)
    x[2:4] *= 1e-3
    return x, np.array([0, 1, 2, 0, 1])


def dense(units, seed, **kwargs):
    init = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
    return keras.layers.Dense(units, kernel_initializer=init, **kwargs)


def loss_scaled(optimizer):
    return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=INITIAL_SCALE)


def adversarial_model():
    inputs = keras.Input((4,))
    h = dense(4, 1)(inputs)
    base = keras.Model(inputs, dense(2, 2, dtype="float32")(h))
    model = tfadv.AdversarialModel(
        base, attack=tfadv.attacks.PGD(eps=0.01, steps=1, bounds=None), adv_ratio=0.5)
    model.compile(optimizer=loss_scaled(keras.optimizers.SGD(1e-5)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def embedding_model():
    inputs = keras.Input((4,))
    h = dense(4, 3)(inputs)
    e = keras.Model(inputs, keras.layers.UnitNormalization(dtype="float32")(h))
    model = tfadv.trainers.EmbeddingAdversarialModel(e, 3)
    model.compile(optimizer=loss_scaled(keras.optimizers.SGD(1e-3)))
    return model


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        weights = self.model.get_weights()
        self.steps.append({
            "scale": float(self.model.optimizer.dynamic_scale.numpy()),
            "finite": bool(all(np.all(np.isfinite(w)) for w in weights)),
            "trainable": [v.numpy().tolist() for v in self.model.trainable_variables],
        })


def fit(strategy, build, data):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build()
    x, y = data()
    record = Record()
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), epochs=EPOCHS,
              verbose=0, callbacks=[record])
    return record.steps


def plain_apply(optimizer, grads, variables):
    optimizer.apply(grads, variables)


def main():
    keras.mixed_precision.set_global_policy("mixed_float16")
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": mirrored.num_replicas_in_sync, "initial_scale": INITIAL_SCALE,
           "cases": {}}
    cases = (("adversarial", adversarial_model, classifier_data),
             ("embedding", embedding_model, embedding_data))
    for name, build, data in cases:
        out["cases"][name] = {
            "mirrored": fit(mirrored, build, data),
            "single": fit(tf.distribute.get_strategy(), build, data),
        }
    fixed = base.apply_gradients
    base.apply_gradients = plain_apply  # the trainers' step looks it up in tfadv.trainers.base
    try:
        for name, build, data in cases:
            out["cases"][name]["mirrored_plain_apply"] = fit(mirrored, build, data)
    finally:
        base.apply_gradients = fixed
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
