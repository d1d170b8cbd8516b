"""Run as a script: one PGD and one TRADES step under MirroredStrategy (2 logical CPUs)
must equal the same steps on one device. Prints a JSON line."""

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


def run(strategy, method):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 16)
    with strategy.scope():
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Flatten()(inputs)
        h = keras.layers.Dense(8, activation="tanh")(h)
        base = keras.Model(inputs, keras.layers.Dense(3)(h))
        base.set_weights([np.random.default_rng(1).normal(0, 0.3, w.shape).astype("float32")
                          for w in base.get_weights()])
        attack = tfadv.attacks.PGD(eps=0.1, step_size=0.05, steps=3, random_start=False)
        model = tfadv.AdversarialModel(base, attack=attack, method=method,
                                       adv_ratio=0.5 if method == "pgd" else 1.0)
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w0 = [w.copy() for w in base.get_weights()]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model.fit(ds, epochs=1, verbose=0)
    return w0, base.get_weights(), strategy.num_replicas_in_sync


diffs, moved = [], []
for method in ("pgd", "trades"):
    w0, single, _ = run(tf.distribute.get_strategy(), method)
    _, mirrored, replicas = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), method)
    diffs += [float(np.abs(a - b).max()) for a, b in zip(single, mirrored)]
    moved += [float(np.abs(a - b).max()) for a, b in zip(single, w0)]
print(json.dumps({"replicas": replicas, "max_weight_diff": max(diffs), "weights_moved": min(moved)}))
