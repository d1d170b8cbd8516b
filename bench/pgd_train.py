"""PGD-10 adversarial-training speed: tfadv against its limit, cleverhans and ART; XLA x bf16.

Setting, in every section: the reference CNN (`tfadv.models.mnist_cnn`), the
embedded MNIST train split (`load_mnist("embedded", "train")`, 4,000 images),
batch 50, PGD-10 Linf eps 0.3, step 0.04, random start, Adam 1e-3. tfadv's
model is built and compiled exactly as the CLI does it
(`tfadv.recipes.mnist.build_training_model`).

Sections (`--sections`, both by default):

speed -- interleaved rounds; each round times one pass over the same batches of:
  - tfadv: one epoch of `AdversarialModel.fit` (XLA off, float32: the recipe's
    defaults). The epoch is timed by a callback, so `fit`'s set-up and
    tear-down are excluded (and reported apart as "fit call overhead").
  - limit: a `tf.function` computing d loss / d x for a batch, called 10x per
    batch, and a `tf.function` clean train step, each pass timed alone, on
    batches already materialised in memory. limit ratio = tfadv / (both).
    Target <= 1.15.
  - cleverhans: `projected_gradient_descent(model, x, 0.3, 0.04, 10, np.inf,
    clip_min=0, clip_max=1, y=y, rand_init=True, sanity_checks=False)` per
    batch, eager as users call it and wrapped in `tf.function`, then a
    `tf.function` train step. Target: tfadv >= 2x faster.
  - ART: `AdversarialTrainerMadryPGD` (eps 0.3, eps_step 0.04, max_iter 10,
    batch 50, nb_epochs 1) on a `TensorFlowV2Classifier` with a `train_step`.
    It is timed on a partial epoch (`--art-batches`) and scaled linearly to the
    epoch; the output says so. ART's PGD crafts in its own default batches of
    32 (the trainer does not expose it); "art_attack_batch50" sets it to 50
    with `trainer.attack.set_params(batch_size=50)`. Target: tfadv >= 3x faster.
  - probe: tfadv with PGD's steps as a `tf.while_loop` instead of unrolled
    (tfadv unrolls up to `UNROLL_MAX_STEPS` = 10 steps; the probe sets it to 0
    inside this script only, and checks the traced graphs and that both give
    the same x_adv).
  Ratios are taken within each round, then the median over rounds is reported.

precision -- `compile(jit_compile=False/True)` x dtype policy float32 /
  "mixed_bfloat16": four models trained side by side (epochs interleaved),
  the epoch time (the first, compiling epoch excluded) and, after
  `--acc-epochs` epochs, clean and robust accuracy on the 1,000 embedded test
  images under tfadv PGD-20 (eps 0.3, step 0.0375, random start). bf16 models
  are also attacked with their weights copied into a float32 model. The global
  policy is reset to float32 after every bf16 use.

The machine is shared and noisy: numbers are medians over interleaved repeats,
and both wall-clock and process CPU time are recorded (CPU time is less
sensitive to other jobs; the targets are judged on wall time).

Run:
    make bench                               # = python bench/pgd_train.py (full run, ~30-60 min)
    python bench/pgd_train.py --quick        # smoke run: few batches, one round, one epoch
    python bench/pgd_train.py --sections speed --rounds 5 --json runs/bench/pgd_train.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

EPS = 0.3
STEP = 0.04
STEPS = 10
BATCH = 50
LR = 1e-3
EVAL_STEPS = 20
TARGETS = {"limit_ratio": 1.15, "cleverhans_speedup": 2.0, "art_speedup": 3.0}
COMBOS = (  # name, jit_compile, dtype policy
    ("xla_off_f32", False, "float32"),
    ("xla_on_f32", True, "float32"),
    ("xla_off_bf16", False, "mixed_bfloat16"),
    ("xla_on_bf16", True, "mixed_bfloat16"),
)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- timing -----------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    """One timed pass: wall-clock and process CPU seconds."""

    wall: float
    cpu: float

    def scaled(self, factor):
        return Sample(self.wall * factor, self.cpu * factor)

    def __add__(self, other):
        return Sample(self.wall + other.wall, self.cpu + other.cpu)


@contextlib.contextmanager
def clock(out: list):
    """Appends the Sample of the `with` body to `out`."""
    w, c = time.perf_counter(), time.process_time()
    yield
    out.append(Sample(time.perf_counter() - w, time.process_time() - c))


def summarize(samples):
    wall = [s.wall for s in samples]
    cpu = [s.cpu for s in samples]
    return {"wall": wall, "cpu": cpu,
            "wall_median": float(np.median(wall)) if wall else None,
            "cpu_median": float(np.median(cpu)) if cpu else None}


def ratio_summary(num, den, target=None, higher_is_better=True):
    """Per-round ratios num[r] / den[r] and their medians (wall and CPU)."""
    wall = [a.wall / b.wall for a, b in zip(num, den)]
    cpu = [a.cpu / b.cpu for a, b in zip(num, den)]
    out = {"wall": wall, "cpu": cpu, "wall_median": float(np.median(wall)),
           "cpu_median": float(np.median(cpu))}
    if target is not None:
        med = out["wall_median"]
        out["target"] = target
        out["meets_target"] = bool(med >= target if higher_is_better else med <= target)
    return out


def make_epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Times each epoch from on_epoch_begin to on_epoch_end."""

        def __init__(self):
            super().__init__()
            self.samples = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch, logs=None):
            self.samples.append(Sample(time.perf_counter() - self._t[0],
                                       time.process_time() - self._t[1]))

    return EpochTimer()


@contextlib.contextmanager
def dtype_policy(name):
    """Sets the global Keras dtype policy; always resets it to float32."""
    import keras

    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


# -- the probe: PGD's step loop as a tf.while_loop vs unrolled ---------------
@contextlib.contextmanager
def pgd_while_loop():
    """Within the block, PGD (and subclasses) trace their steps as a tf.while_loop.

    tfadv unrolls loops of up to `tfadv.attacks.pgd.UNROLL_MAX_STEPS` steps;
    setting it to 0 restores the while loop (a monkeypatch of this script only).
    """
    from tfadv.attacks import pgd as pgd_module

    if not hasattr(pgd_module, "UNROLL_MAX_STEPS"):
        raise RuntimeError("tfadv.attacks.pgd.UNROLL_MAX_STEPS is gone; update the probe")
    original = pgd_module.UNROLL_MAX_STEPS
    pgd_module.UNROLL_MAX_STEPS = 0
    try:
        yield
    finally:
        pgd_module.UNROLL_MAX_STEPS = original


def loop_probe_check(base, x, y):
    """Checks the probe: while-loop ops in each traced PGD-10, and max |x_adv difference|.

    Without random start, so both forms must give the same x_adv.
    """
    import tensorflow as tf

    from tfadv.attacks import PGD

    attack = PGD(eps=EPS, step_size=STEP, steps=STEPS, random_start=False)

    def trace():
        fn = tf.function(lambda a, b: attack(base, a, b))
        graph = fn.get_concrete_function(x, y).graph
        loops = sum(op.type in ("While", "StatelessWhile") for op in graph.get_operations())
        return fn(x, y), loops

    stock, stock_loops = trace()
    with pgd_while_loop():
        looped, probe_loops = trace()
    return {"while_ops_stock": stock_loops, "while_ops_probe": probe_loops,
            "max_abs_diff": float(tf.reduce_max(tf.abs(stock - looped)))}


# -- builders ---------------------------------------------------------------
def tfadv_model(jit_compile=False):
    """AdversarialModel built and compiled as the CLI does (PGD-10, Adam 1e-3)."""
    from tfadv.recipes.mnist import MnistTrainConfig, build_training_model

    cfg = MnistTrainConfig(out=os.devnull, eps=EPS, steps=STEPS, step_size=STEP,
                           batch_size=BATCH, learning_rate=LR, jit_compile=jit_compile)
    return build_training_model(cfg)


def train_step_fn(model, optimizer):
    """A tf.function clean train step `(x, y) -> loss` for `model`."""
    import keras
    import tensorflow as tf

    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_obj(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


# -- section: speed ---------------------------------------------------------
def speed_section(args, x, y):
    import keras
    import tensorflow as tf
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    from tfadv import models
    from tfadv.data import subset, to_dataset

    ds = to_dataset(x, y, batch_size=BATCH)  # unshuffled: the same batches in every pass
    batches = list(ds)
    n_batches = len(batches)
    art_batches = min(args.art_batches, n_batches)
    runners = {}
    fit_overhead = []

    # tfadv, stock and with PGD's steps as a tf.while_loop (probe). The patch
    # stays on for every fit of the probe model, in case Keras retraces.
    def fit_runner(model, patch, overhead=None):
        timer = make_epoch_timer()

        def run():
            calls = []
            with patch(), clock(calls):
                model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
            if overhead is not None:
                overhead.append(calls[0].wall - timer.samples[-1].wall)
            return timer.samples[-1]

        return run

    keras.utils.set_random_seed(args.seed)
    stock_model = tfadv_model()
    runners["tfadv"] = fit_runner(stock_model, contextlib.nullcontext, fit_overhead)
    keras.utils.set_random_seed(args.seed)
    runners["tfadv_while"] = fit_runner(tfadv_model(), pgd_while_loop)

    # The limit: 10 input-gradient passes + 1 clean training pass.
    ref = models.mnist_cnn()
    ref_step = train_step_fn(ref, keras.optimizers.Adam(LR))

    @tf.function
    def input_grad(xb, yb):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=yb, logits=ref(xb, training=False)))
        return tape.gradient(loss, xb)

    def run_grad10():
        out = []
        with clock(out):
            for xb, yb in batches:
                for _ in range(STEPS):
                    g = input_grad(xb, yb)
            g.numpy()
        return out[0]

    def run_clean():
        out = []
        with clock(out):
            for xb, yb in batches:
                loss = ref_step(xb, yb)
            loss.numpy()
        return out[0]

    runners["limit_grad10"] = run_grad10
    runners["limit_clean"] = run_clean

    # cleverhans: the loop a user writes.
    ch_model = models.mnist_cnn()
    ch_step = train_step_fn(ch_model, keras.optimizers.Adam(LR))

    def ch_pgd(xb, yb):
        return projected_gradient_descent(ch_model, xb, EPS, STEP, STEPS, np.inf, clip_min=0,
                                          clip_max=1, y=yb, rand_init=True,
                                          sanity_checks=False)

    def ch_runner(attack):
        def run():
            out = []
            with clock(out):
                for xb, yb in ds:
                    loss = ch_step(attack(xb, yb), yb)
                loss.numpy()
            return out[0]

        return run

    runners["cleverhans_eager"] = ch_runner(ch_pgd)
    runners["cleverhans_function"] = ch_runner(tf.function(ch_pgd))

    # ART, on a random sample of the batches' images (timing is data-independent).
    art_x, art_y = subset(x, y, art_batches * BATCH, seed=args.seed)
    for name, attack_batch in (("art", None), ("art_attack_batch50", BATCH)):
        trainer = art_trainer(attack_batch)
        runners[name] = art_runner(trainer, art_x, art_y, n_batches / art_batches)

    log(f"[speed] warm-up (tracing/compiling every variant) on {n_batches} batches")
    for name, run in runners.items():
        if name.startswith("art"):
            run(warmup=True)
        else:
            run()
    fit_overhead.clear()
    probe = loop_probe_check(stock_model.base, batches[0][0], batches[0][1])
    if probe["while_ops_probe"] == probe["while_ops_stock"]:
        raise RuntimeError(f"the loop probe changed nothing ({probe}); update the probe")

    names = list(runners)
    samples = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(runners[name]())
            log(f"[speed] round {r + 1}/{args.rounds} {name:<20} "
                f"wall {samples[name][-1].wall:7.2f}s  cpu {samples[name][-1].cpu:7.2f}s")

    limit = [a + b for a, b in zip(samples["limit_grad10"], samples["limit_clean"])]
    seconds = {name: summarize(s) for name, s in samples.items()}
    seconds["limit_total"] = summarize(limit)
    ratios = {
        "limit_ratio": ratio_summary(samples["tfadv"], limit, TARGETS["limit_ratio"],
                                     higher_is_better=False),
        "cleverhans_eager_speedup": ratio_summary(samples["cleverhans_eager"], samples["tfadv"],
                                                  TARGETS["cleverhans_speedup"]),
        "cleverhans_function_speedup": ratio_summary(samples["cleverhans_function"],
                                                     samples["tfadv"],
                                                     TARGETS["cleverhans_speedup"]),
        "art_speedup": ratio_summary(samples["art"], samples["tfadv"], TARGETS["art_speedup"]),
        "art_attack_batch50_speedup": ratio_summary(samples["art_attack_batch50"],
                                                    samples["tfadv"], TARGETS["art_speedup"]),
        "probe_while_limit_ratio": ratio_summary(samples["tfadv_while"], limit,
                                                 TARGETS["limit_ratio"],
                                                 higher_is_better=False),
        "probe_while_over_stock": ratio_summary(samples["tfadv_while"], samples["tfadv"]),
    }
    return {
        "batches_per_epoch": n_batches,
        "images_per_epoch": int(len(x)),
        "rounds": args.rounds,
        "art_batches_timed": art_batches,
        "art_note": (f"ART timed on {art_batches} of {n_batches} batches per round and scaled "
                     f"x{n_batches / art_batches:g} to the epoch"),
        "seconds_per_epoch": seconds,
        "ratios": ratios,
        "fit_call_overhead_wall": fit_overhead,
        "loop_probe": probe,
    }


def art_trainer(attack_batch=None):
    """ART's Madry PGD trainer on a fresh reference CNN, as the ART docs set it up."""
    import keras
    import tensorflow as tf

    warnings.filterwarnings("ignore", message=".*PyTorch not found.*")
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import TensorFlowV2Classifier

    from tfadv import models

    model = models.mnist_cnn()
    optimizer = keras.optimizers.Adam(LR)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(model, images, labels):  # the signature ART calls
        with tf.GradientTape() as tape:
            loss = loss_object(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    classifier = TensorFlowV2Classifier(
        model=model, nb_classes=10, input_shape=(28, 28, 1), loss_object=loss_object,
        optimizer=optimizer, train_step=train_step, clip_values=(0.0, 1.0))
    trainer = AdversarialTrainerMadryPGD(classifier, nb_epochs=1, batch_size=BATCH, eps=EPS,
                                         eps_step=STEP, max_iter=STEPS)
    if attack_batch is not None:
        trainer.attack.set_params(batch_size=attack_batch)
    return trainer


def art_runner(trainer, x, y, scale):
    def run(warmup=False):
        xs, ys = (x[: 2 * BATCH], y[: 2 * BATCH]) if warmup else (x, y)
        out = []
        with contextlib.redirect_stderr(io.StringIO()), clock(out):  # ART's tqdm bars
            trainer.fit(xs, ys, nb_epochs=1, batch_size=BATCH)
        return out[0].scaled(scale)

    return run


# -- section: precision -----------------------------------------------------
def precision_section(args, x, y, x_te, y_te):
    import keras

    from tfadv import models
    from tfadv.attacks import PGD
    from tfadv.data import to_dataset
    from tfadv.evaluation import evaluate_robustness

    ds = to_dataset(x, y, batch_size=BATCH, shuffle=True, seed=args.seed)
    total_epochs = max(args.acc_epochs, 1 + args.timing_epochs)
    eval_attack = PGD(eps=EPS, steps=EVAL_STEPS, random_start=True)
    results, live = {}, {}
    for name, jit, policy in COMBOS:
        with dtype_policy(policy):
            keras.utils.set_random_seed(args.seed)
            live[name] = (tfadv_model(jit_compile=jit), make_epoch_timer(), policy)
        results[name] = {"jit_compile": jit, "dtype_policy": policy, "error": None}

    def evaluate(name):
        model, _, policy = live[name]
        keras.utils.set_random_seed(args.seed + 1)
        with dtype_policy(policy):
            res = evaluate_robustness(model.base, x_te, y_te, eval_attack, batch_size=500)
        out = {"clean_accuracy": res.clean_accuracy, "robust_accuracy": res.robust_accuracy}
        if policy != "float32":
            f32 = models.mnist_cnn()  # the global policy is float32 again here
            f32.set_weights(model.base.get_weights())
            keras.utils.set_random_seed(args.seed + 1)
            res32 = evaluate_robustness(f32, x_te, y_te, eval_attack, batch_size=500)
            out["float32_weights_clean_accuracy"] = res32.clean_accuracy
            out["float32_weights_robust_accuracy"] = res32.robust_accuracy
        return out

    names = [c[0] for c in COMBOS]
    for epoch in range(total_epochs):
        order = names[epoch % len(names):] + names[: epoch % len(names)]
        for name in order:
            if name not in live:
                continue
            model, timer, policy = live[name]
            try:
                with dtype_policy(policy):
                    model.fit(ds, initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                              shuffle=False, callbacks=[timer])
            except Exception as e:  # report, drop the combination, go on
                results[name]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"[precision] {name} failed: {results[name]['error']}")
                del live[name]
                continue
            log(f"[precision] epoch {epoch + 1}/{total_epochs} {name:<13} "
                f"wall {timer.samples[-1].wall:7.2f}s  cpu {timer.samples[-1].cpu:7.2f}s")
        if epoch + 1 == args.acc_epochs:
            for name in list(live):
                log(f"[precision] evaluating {name} after {args.acc_epochs} epoch(s)")
                results[name].update(evaluate(name))

    base_name = names[0]
    for name in names:
        if name not in live and results[name]["error"]:
            continue
        timer = live[name][1]
        timed = timer.samples[1:]  # the first epoch compiles
        results[name]["first_epoch_with_compile"] = dataclasses.asdict(timer.samples[0])
        results[name]["epoch_seconds"] = summarize(timed)
        if name in live and base_name in live:
            results[name]["speedup_vs_xla_off_f32"] = ratio_summary(
                live[base_name][1].samples[1:], timed)
    return {"epochs_trained_before_eval": args.acc_epochs, "timed_epochs": total_epochs - 1,
            "eval": f"tfadv PGD-{EVAL_STEPS} Linf eps {EPS}, step {2.5 * EPS / EVAL_STEPS:g}, "
                    f"random start, {len(x_te)} embedded test images",
            "combos": results}


# -- report -----------------------------------------------------------------
def format_report(result):
    lines = []
    s = result.get("speed")
    if s:
        sec, rat = s["seconds_per_epoch"], s["ratios"]
        lines += [f"== speed: PGD-10 training, {s['images_per_epoch']} images = "
                  f"{s['batches_per_epoch']} batches of {BATCH}; median of {s['rounds']} "
                  "interleaved round(s)",
                  f"{'variant':<34} {'wall s':>8} {'cpu s':>8}", "-" * 52]
        for name, label in (("tfadv", "tfadv AdversarialModel.fit"),
                            ("limit_grad10", "limit: 10 x input-gradient pass"),
                            ("limit_clean", "limit: clean train pass"),
                            ("limit_total", "limit: total"),
                            ("cleverhans_eager", "cleverhans PGD eager + step"),
                            ("cleverhans_function", "cleverhans PGD tf.function + step"),
                            ("art", "ART MadryPGD (scaled)"),
                            ("art_attack_batch50", "ART MadryPGD, attack batch 50 (scaled)"),
                            ("tfadv_while", "probe: tfadv, PGD as tf.while_loop")):
            lines.append(f"{label:<34} {sec[name]['wall_median']:>8.2f} "
                         f"{sec[name]['cpu_median']:>8.2f}")
        lines.append(f"  ({s['art_note']})")
        lines += ["", f"{'ratio (per round, median)':<34} {'wall':>8} {'cpu':>8}  target",
                  "-" * 66]
        for name, label in (("limit_ratio", "tfadv / limit"),
                            ("cleverhans_eager_speedup", "cleverhans eager / tfadv"),
                            ("cleverhans_function_speedup", "cleverhans tf.function / tfadv"),
                            ("art_speedup", "ART / tfadv"),
                            ("art_attack_batch50_speedup", "ART (attack batch 50) / tfadv"),
                            ("probe_while_limit_ratio", "probe: tfadv while_loop / limit"),
                            ("probe_while_over_stock", "probe: tfadv while_loop / tfadv")):
            r = rat[name]
            target = ""
            if "target" in r:
                op = "<=" if name.endswith("limit_ratio") else ">="
                target = f"{op} {r['target']:g}: " + ("met" if r["meets_target"] else "MISSED")
            lines.append(f"{label:<34} {r['wall_median']:>8.3f} {r['cpu_median']:>8.3f}  {target}")
        if s["fit_call_overhead_wall"]:
            lines.append(f"fit call overhead outside the epoch (wall, per fit call): median "
                         f"{np.median(s['fit_call_overhead_wall']):.2f}s")
        p = s["loop_probe"]
        lines.append(f"loop probe: While ops in traced PGD-10 stock {p['while_ops_stock']}, "
                     f"probe {p['while_ops_probe']}; max |x_adv difference| "
                     f"{p['max_abs_diff']:.2e}")
    p = result.get("precision")
    if p:
        lines += ["", f"== precision: XLA x dtype policy; epoch time over {p['timed_epochs']} "
                  f"epoch(s) after the first; accuracy after {p['epochs_trained_before_eval']} "
                  f"epoch(s), {p['eval']}",
                  f"{'combo':<14} {'1st ep s':>9} {'epoch s':>8} {'cpu s':>7} {'speedup':>8} "
                  f"{'clean':>6} {'robust':>7} {'robust(f32 weights)':>20}", "-" * 86]
        for name, c in p["combos"].items():
            if c.get("error") and "epoch_seconds" not in c:
                lines.append(f"{name:<14} failed: {c['error']}")
                continue
            speed = c.get("speedup_vs_xla_off_f32", {}).get("wall_median")
            f32 = c.get("float32_weights_robust_accuracy")
            lines.append(
                f"{name:<14} {c['first_epoch_with_compile']['wall']:>9.2f} "
                f"{c['epoch_seconds']['wall_median']:>8.2f} "
                f"{c['epoch_seconds']['cpu_median']:>7.2f} "
                f"{(f'{speed:.3f}' if speed else '-'):>8} "
                f"{c.get('clean_accuracy', float('nan')):>6.3f} "
                f"{c.get('robust_accuracy', float('nan')):>7.3f} "
                f"{(f'{f32:.3f}' if f32 is not None else '-'):>20}")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 batches, 1 round, 2 ART batches, 1+1 precision epochs, "
                        "200 test images (explicit flags below still win)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--sections", default="speed,precision",
                   help="comma-separated subset of: speed, precision")
    p.add_argument("--batches", type=int, help="batches per timed epoch (default: all 80)")
    p.add_argument("--rounds", type=int, help="interleaved rounds in the speed section (3)")
    p.add_argument("--art-batches", type=int, help="batches of ART's timed partial epoch (8)")
    p.add_argument("--acc-epochs", type=int,
                   help="precision: epochs trained before the robust evaluation (3)")
    p.add_argument("--timing-epochs", type=int,
                   help="precision: timed epochs after the first, compiling one (2)")
    p.add_argument("--test-limit", type=int, help="test images for the evaluation (all 1,000)")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve(args):
    quick = dict(batches=6, rounds=1, art_batches=2, acc_epochs=1, timing_epochs=1,
                 test_limit=200)
    full = dict(batches=None, rounds=3, art_batches=8, acc_epochs=3, timing_epochs=2,
                test_limit=None)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.timing_epochs < 1:
        raise SystemExit("--timing-epochs must be >= 1 (the first epoch compiles)")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"speed", "precision"}
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; expected speed, precision")
    return args


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    import keras
    import tensorflow as tf

    from tfadv.data import load_mnist, subset

    tf.get_logger().setLevel("ERROR")  # tf.function retracing notices from the evaluation
    keras.utils.set_random_seed(args.seed)
    x, y = load_mnist("embedded", "train")
    if args.batches is not None:
        # The split is sorted by class: sample, never slice.
        x, y = subset(x, y, args.batches * BATCH, seed=args.seed)
    import art
    import cleverhans

    result = {
        "settings": {"eps": EPS, "step": STEP, "steps": STEPS, "batch": BATCH,
                     "random_start": True, "optimizer": f"Adam({LR})",
                     "model": "tfadv.models.mnist_cnn", "data": "embedded MNIST train",
                     "quick": args.quick, "seed": args.seed},
        "environment": {"tensorflow": tf.__version__, "keras": keras.__version__,
                        "art": art.__version__, "cleverhans": cleverhans.__version__,
                        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    if "speed" in args.sections:
        result["speed"] = speed_section(args, x, y)
    if "precision" in args.sections:
        x_te, y_te = load_mnist("embedded", "test")
        x_te, y_te = subset(x_te, y_te, args.test_limit, seed=0)
        result["precision"] = precision_section(args, x, y, x_te, y_te)
    result["environment"]["loadavg_end"] = os.getloadavg()
    assert keras.mixed_precision.dtype_policy().name == "float32"
    print(format_report(result))
    print(json.dumps(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
