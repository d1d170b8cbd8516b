"""Run as a script: the centre update under MirroredStrategy (2 logical CPUs) must
equal the single-device update on the same global batch. Prints a JSON line."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfadv  # noqa: E402
from tfadv.config import CenterLossConfig  # noqa: E402


def run(strategy):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 28, 28, 1)).astype("float32")
    # Replica 0 sees only classes 0-1, replica 1 only 2-3: a one-replica update
    # would leave half of the centres where they were.
    y = np.array([0, 1] * 4 + [2, 3] * 4)
    with strategy.scope():
        base = tfadv.models.mnist_feature_net(feature_dim=3, arch="small", num_classes=4)
        model = tfadv.AdversarialModel(
            base, method="standard", center_loss=CenterLossConfig(num_classes=4, weight=0.1))
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.centers.centers.assign(np.ones((4, 3), np.float32))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model.fit(ds, epochs=1, verbose=0)
    return model.centers.centers.numpy(), strategy.num_replicas_in_sync


single, _ = run(tf.distribute.get_strategy())
mirrored, replicas = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({"replicas": replicas, "max_center_diff": float(np.abs(single - mirrored).max()),
                  "centers_moved": float(np.abs(single - 1.0).min(axis=1).min())}))
