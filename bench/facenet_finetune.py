"""FaceNet adversarial fine-tuning step: tfadv against its limit.

Setting: the 128-d FaceNet (`tfadv.models.facenet`, InceptionResNetV1 at
160x160, random weights unless `--pretrained`), the fine-tuning recipe's
trainer (`tfadv.recipes.facenet.build_trainer`: PGD-k dodging against the
embedding, consistency + center loss, a frozen teacher for distillation,
backbone trained from `Block17_1`), a batch of `--batch` random faces.

Interleaved rounds; each round times, on the same batch:
  - tfadv: one `train_on_batch` of the trainer (compiled train_step).
  - limit: what any implementation of the same step must compute, each part a
    `tf.function` timed alone: k input-gradient passes of the cosine
    objective through the embedder (the attack), one forward pass of the
    teacher, and one forward+backward pass over the clean+adversarial batch
    (2N images) with the gradient of the weights. limit ratio = tfadv / sum.
    Target <= 1.15.
Ratios are taken within each round; the median over rounds is reported, for
wall and process CPU time.

Run:
    python bench/facenet_finetune.py                 # ~5-10 min on 2 cores
    python bench/facenet_finetune.py --rounds 2 --batch 4 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=None,
                   help="PGD steps of the inner attack (default: the recipe's, 10)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pretrained", action="store_true", help="load the preset's weights")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    import keras
    import tensorflow as tf

    from tfadv.attacks import objectives
    from tfadv.attacks.base import input_gradient
    from tfadv.recipes import facenet as recipe

    if not args.pretrained:
        recipe_pretrained = recipe.pretrained
        recipe.pretrained = lambda preset: __import__(
            "tfadv.models.facenet", fromlist=["facenet"]).facenet(preset, weights=False)
    if args.steps is None:
        args.steps = recipe.FaceFinetuneConfig(out="/tmp/unused").train_steps
    cfg = recipe.FaceFinetuneConfig(out="/tmp/unused", train_steps=args.steps,
                                    batch_size=args.batch)
    keras.utils.set_random_seed(0)
    trainer = recipe.build_trainer(cfg, num_classes=5, threshold=0.3)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
    if not args.pretrained:
        recipe.pretrained = recipe_pretrained
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (args.batch, 160, 160, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 5, args.batch).astype("int64"))

    emb, teacher = trainer.embedder, trainer.teacher
    cos = objectives.get("cosine_distance")
    ref = tf.stop_gradient(emb(x, training=False))

    @tf.function
    def grad_pass(xb):
        return input_gradient(emb, xb, ref, cos)[2]

    @tf.function
    def teacher_pass(xb):
        return teacher(xb, training=False)

    x2 = tf.concat([x, x], 0)
    y2 = tf.concat([y, y], 0)
    weights = emb.trainable_weights + trainer.head.trainable_weights

    @tf.function
    def weight_pass(xb, yb):
        with tf.GradientTape() as tape:
            logits = trainer.head(emb(xb, training=True))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                yb, logits, from_logits=True))
        return tape.gradient(loss, weights)

    def tfadv_step():
        trainer.train_on_batch(x, y)

    def limit_parts():
        out = []
        out.append(_timed(lambda: [grad_pass(x).numpy() for _ in range(args.steps)]))
        out.append(_timed(lambda: teacher_pass(x).numpy()))
        out.append(_timed(lambda: [g.numpy() for g in weight_pass(x2, y2)]))
        return tuple(sum(v) for v in zip(*out))

    # Warm-up: compile everything once.
    tfadv_step()
    limit_parts()
    rows = []
    for r in range(args.rounds):
        tw, tc = _timed(tfadv_step)
        lw, lc = limit_parts()
        rows.append({"tfadv_wall": tw, "tfadv_cpu": tc, "limit_wall": lw, "limit_cpu": lc,
                     "ratio_wall": tw / lw, "ratio_cpu": tc / lc})
        print(f"round {r + 1}: tfadv {tw:.2f} s, limit {lw:.2f} s, ratio {tw / lw:.3f} wall, "
              f"{tc / lc:.3f} CPU", flush=True)
    med = {k: float(np.median([row[k] for row in rows])) for k in rows[0]}
    print(f"\nFaceNet PGD-{args.steps} fine-tuning step, batch {args.batch}: "
          f"tfadv / limit = {med['ratio_wall']:.3f} wall, {med['ratio_cpu']:.3f} CPU "
          f"(target <= 1.15: {'met' if med['ratio_wall'] <= 1.15 else 'MISSED'}); "
          f"median step {med['tfadv_wall']:.2f} s, limit {med['limit_wall']:.2f} s, "
          f"load {os.getloadavg()[0]:.1f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rounds": rows, "median": med, "args": vars(args)}, f, indent=1)
    return med


if __name__ == "__main__":
    main()
