"""Benchmark: inverse-adversary centre extraction and the cost of center loss.

Measures, in one run, on the study's LeNets++ feature net (2-D features) and
embedded MNIST:

1. Inverse-centre extraction throughput (images/s): `extract_centers` with
   InversePGD (5 steps), one compiled pass over the data. Limit ratio: its
   time over ONE input-gradient pass (forward + backward to the input) on the
   same images; 5 steps + the feature pass make 6.0 the ideal. Target <= 6.0.
2. Centre-update overhead: an epoch of `fit` with center loss (learned
   centres, updated by the Wen et al. rule every step) over an epoch with
   cross-entropy only, same model and data, at the study's batch size (32,
   so an epoch is 63 training steps rather than a few calls dominated by
   `fit`'s fixed cost). Target <= 1.05.

Repeats are interleaved and the median is reported, so machine noise hits
both sides of every ratio alike.

    python bench/centers.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfadv  # noqa: E402
from tfadv.attacks import InversePGD  # noqa: E402
from tfadv.attacks.objectives import cross_entropy  # noqa: E402
from tfadv.config import CenterLossConfig  # noqa: E402
from tfadv.data import load_mnist, subset  # noqa: E402
from tfadv.evaluation.centers import extract_centers  # noqa: E402


def timed(fn, cpu=None):
    t, c = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--train-batch", type=int, default=32, help="batch of the training epochs")
    args = p.parse_args(argv)
    n = 500 if args.quick else 2000
    arch = "small" if args.quick else "lenetpp"
    batch = 250
    keras.utils.set_random_seed(0)
    x, y = subset(*load_mnist("embedded", "train"), n)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache()
    model = tfadv.models.mnist_feature_net(feature_dim=2, arch=arch)

    @tf.function
    def grad_pass(ds):
        total = tf.constant(0.0)
        for xb, yb in ds:
            with tf.GradientTape() as tape:
                tape.watch(xb)
                loss = cross_entropy(model(xb, training=False), yb)
            total += tf.reduce_sum(tape.gradient(loss, xb))
        return total

    inverse = InversePGD()
    grad_pass(ds)
    extract_centers(model, ds, attack=inverse)  # warm-up (tracing)
    t_grad, t_inv, c_grad, c_inv = [], [], [], []
    for _ in range(args.repeats):
        t_grad.append(timed(lambda: grad_pass(ds).numpy(), c_grad))
        t_inv.append(timed(lambda: extract_centers(model, ds, attack=inverse), c_inv))
    g, inv = statistics.median(t_grad), statistics.median(t_inv)
    inv_cpu_ratio = statistics.median(c_inv) / statistics.median(c_grad)

    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.train_batch).cache()

    def training(center):
        keras.utils.set_random_seed(0)
        base = tfadv.models.mnist_feature_net(feature_dim=2, arch=arch)
        m = tfadv.AdversarialModel(base, method="standard",
                                   center_loss=CenterLossConfig() if center else None)
        m.compile(optimizer=tfadv.trainers.schedules.sgd_nesterov(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(train_ds, epochs=1, verbose=0)  # warm-up
        return m

    plain, center = training(False), training(True)
    t_ce, t_cl, c_ce, c_cl = [], [], [], []
    for _ in range(args.repeats):
        t_ce.append(timed(lambda: plain.fit(train_ds, epochs=1, verbose=0), c_ce))
        t_cl.append(timed(lambda: center.fit(train_ds, epochs=1, verbose=0), c_cl))
    ce, cl = statistics.median(t_ce), statistics.median(t_cl)
    cpu_ratio = statistics.median(c_cl) / statistics.median(c_ce)

    res = {
        "images": n, "arch": arch, "batch": batch, "train_batch": args.train_batch,
        "repeats": args.repeats,
        "input_gradient_pass_s": g, "inverse_extraction_s": inv,
        "inverse_images_per_s": n / inv, "extraction_limit_ratio": inv / g,
        "extraction_limit_ratio_cpu": inv_cpu_ratio,
        "extraction_target": 6.0,
        "ce_epoch_s": ce, "center_loss_epoch_s": cl, "center_overhead_ratio": cl / ce,
        "center_overhead_ratio_cpu": cpu_ratio,
        "center_overhead_target": 1.05,
    }
    print(f"{'measure':<44}{'value':>10}{'target':>10}")
    print(f"{'inverse-centre extraction, images/s':<44}{res['inverse_images_per_s']:>10.0f}")
    print(f"{'extraction / one input-gradient pass (wall)':<44}"
          f"{res['extraction_limit_ratio']:>10.2f}{'<= 6.0':>10}")
    print(f"{'extraction / one input-gradient pass (CPU)':<44}"
          f"{res['extraction_limit_ratio_cpu']:>10.2f}{'<= 6.0':>10}")
    print(f"{'center-loss epoch / CE-only epoch (wall)':<44}{res['center_overhead_ratio']:>10.3f}"
          f"{'<= 1.05':>10}")
    print(f"{'center-loss epoch / CE-only epoch (CPU)':<44}"
          f"{res['center_overhead_ratio_cpu']:>10.3f}{'<= 1.05':>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
