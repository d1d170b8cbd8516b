"""Run as a script under MirroredStrategy (2 logical CPUs); prints a JSON line.

Without arguments: one PGD and one TRADES step must equal the same steps on
one device.

With `empty`: 9 examples in global batches of 4, so the last batch holds one
example and one replica gets none. Each trainer and loss term must stay
finite (TerminateOnNaN would stop the fit), and with Keras' convention (each
replica's mean over its examples, divided by the replicas in sync) the short
batch's step is the single-device step at half the learning rate: the
weights after 2 epochs must equal a single-device run whose learning rate
halves on the short batches."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfadv  # noqa: E402
from tfadv.config import CenterLossConfig  # noqa: E402


def run(strategy, method, **extra):
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
                                       adv_ratio=0.5 if method == "pgd" else 1.0, **extra)
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w0 = [w.copy() for w in base.get_weights()]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model.fit(ds, epochs=1, verbose=0)
    return w0, base.get_weights(), strategy.num_replicas_in_sync


def equal_split():
    diffs, moved = [], []
    # The fast methods without start noise: the same adversaries on any device split.
    for method, extra in (("pgd", {}), ("trades", {}), ("fgsm_rs", {"fast_noise": 0.0}),
                          ("n_fgsm", {"fast_noise": 0.0}), ("free", {"free_replays": 3})):
        w0, single, _ = run(tf.distribute.get_strategy(), method, **extra)
        _, mirrored, replicas = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                                    method, **extra)
        diffs += [float(np.abs(a - b).max()) for a, b in zip(single, mirrored)]
        moved += [float(np.abs(a - b).max()) for a, b in zip(single, w0)]
    return {"replicas": replicas, "max_weight_diff": max(diffs), "weights_moved": min(moved)}


# -- empty replica ------------------------------------------------------------
LR = 0.5
N, BATCH, EPOCHS = 9, 4, 2
STEPS = -(-N // BATCH)


class HalfOnShortBatch(keras.optimizers.schedules.LearningRateSchedule):
    """LR on one device equivalent to Keras' per-replica convention on 2 replicas."""

    def __call__(self, step):
        short = tf.equal(tf.math.floormod(step, STEPS), STEPS - 1)
        return tf.where(short, LR / 2, LR)

    def get_config(self):
        return {}


class FixedShift(tfadv.attacks.base.Attack):
    """A deterministic per-example perturbation: the same adversaries on any device split.

    (TRADES' KL objective has a zero gradient at x, so PGD without a random
    start follows rounding noise, which differs between batch splits.)"""

    name = "fixed_shift"

    def perturb(self, model, x, y, objective, scale):
        return tf.clip_by_value(x + self.eps * scale * tf.sin(40.0 * x), 0.0, 1.0)


def feature_net():
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(8, activation="tanh")(h)
    f = keras.layers.Dense(3, activation="tanh", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="classifier")(f))


def embedder(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(4)(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


ADVERSARIAL = {
    "pgd": dict(method="pgd"),
    "trades": dict(method="trades"),
    "pgd_center_both": dict(method="pgd", adv_ratio=0.5, center_loss=dict(on="both")),
    "trades_center": dict(method="trades", center_loss=dict(on="clean")),
    "standard_inverse_centers": dict(method="standard", center_loss=dict(centers="inverse_batch")),
}
EMBEDDING = {
    "embedding_all_terms": dict(attack_on="classification", center_weight=0.5,
                                distill_weight=1.0, static=True),
    "embedding_teacher_consistency": dict(attack_on="classification",
                                          consistency_target="teacher", distill_weight=0.5),
    "embedding_dodging": dict(attack_on="embedding", center_weight=0.5, distill_weight=1.0),
}


def fit_adversarial(strategy, name, lr):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (N, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, N)
    kwargs = dict(ADVERSARIAL[name])
    with strategy.scope():
        base = feature_net()
        base.set_weights([np.random.default_rng(1).normal(0, 0.5, w.shape).astype("float32")
                          for w in base.get_weights()])
        if kwargs["method"] == "trades":
            attack = FixedShift(eps=0.1)
        else:
            attack = tfadv.attacks.PGD(eps=0.1, step_size=0.05, steps=2, random_start=False)
        if "center_loss" in kwargs:
            kwargs["center_loss"] = CenterLossConfig(
                num_classes=3, weight=0.5, inverse_eps=0.1, inverse_step_size=0.05,
                inverse_steps=2, **kwargs["center_loss"])
        model = tfadv.AdversarialModel(
            base, attack=None if kwargs["method"] == "standard" else attack,
            eval_attack=attack, **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if model.center_cfg is not None:
            model.centers.centers.assign(np.full((3, 3), 0.2, np.float32))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    hist = model.fit(ds, epochs=EPOCHS, validation_data=ds, verbose=0,
                     callbacks=[keras.callbacks.TerminateOnNaN()]).history
    state = base.get_weights()
    if model.center_cfg is not None:
        state.append(model.centers.centers.numpy())
    return hist, state


def fit_embedding(strategy, name, lr):
    rng = np.random.default_rng(0)
    y = np.arange(N) % 3
    x = (rng.uniform(0, 60, (N, 6, 6, 3)) + 50 * y[:, None, None, None]).astype("float32")
    kwargs = dict(EMBEDDING[name])
    static = kwargs.pop("static", False)
    with strategy.scope():
        e, teacher = embedder(3), embedder(4)
        statics = [embedder(5)] if static else []
        keras.utils.set_random_seed(0)
        if kwargs["attack_on"] == "embedding":
            attack = tfadv.attacks.dodging_pgd(eps=8.0, steps=2)
        else:
            attack = tfadv.attacks.PGD(eps=8.0, step_size=4.0, steps=2, random_start=False,
                                       bounds=(0, 255))
        model = tfadv.trainers.EmbeddingAdversarialModel(
            e, 3, attack=attack, teacher=teacher, static_models=statics,
            eval_attack=tfadv.attacks.dodging_pgd(eps=8.0, steps=2), eval_threshold=0.9,
            **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(lr))
        model.build(x.shape)
        if model.centers is not None:
            model.centers.centers.assign(np.full((3, 4), 0.2, np.float32))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    hist = model.fit(ds, epochs=EPOCHS, validation_data=ds, verbose=0,
                     callbacks=[keras.callbacks.TerminateOnNaN()]).history
    state = [v.numpy() for v in model.trainable_variables]
    if model.centers is not None:
        state.append(model.centers.centers.numpy())
    return hist, state


def empty_replica():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": mirrored.num_replicas_in_sync, "cases": {}}
    for names, fit in ((ADVERSARIAL, fit_adversarial), (EMBEDDING, fit_embedding)):
        for name in names:
            hist, state = fit(mirrored, name, LR)
            finite = all(np.all(np.isfinite(v)) for v in hist.values()) and \
                all(np.all(np.isfinite(s)) for s in state)
            case = {"epochs": len(hist["loss"]), "finite": bool(finite),
                    "loss": [float(v) for v in hist["loss"]]}
            # The exact comparison needs the same adversaries on both sides:
            # random starts are drawn per replica.
            if name != "embedding_dodging":
                _, single = fit(tf.distribute.get_strategy(), name, HalfOnShortBatch())
                case["max_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(state, single))
            out["cases"][name] = case
    return out


if __name__ == "__main__":
    result = empty_replica() if sys.argv[1:] == ["empty"] else equal_split()
    print(json.dumps(result))
