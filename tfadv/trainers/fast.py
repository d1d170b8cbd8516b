"""Fast adversarial training: the one-step adversaries and free training's carried perturbation.

Three methods train against adversaries that cost one input-gradient pass (or
none beyond the training pass) instead of PGD-10's ten:

- "fgsm_rs", FGSM with a random start (Wong, Rice & Kolter, "Fast is better
  than free: revisiting adversarial training", ICLR 2020): a uniform start in
  the eps-ball, one signed step of `1.25 * eps`, projected back onto the
  ball and clipped to the input bounds.
- "n_fgsm", noise-augmented FGSM (de Jorge et al., "Make some noise: reliable
  and efficient single-step adversarial training", NeurIPS 2022): noise drawn
  from `U(-2 eps, 2 eps)`, one signed step of `eps`, *no* projection (the
  adversary may lie up to `3 eps` away; only the input bounds clip it).
- "free" (Shafahi et al., "Adversarial training for free!", NeurIPS 2019):
  each batch is replayed `m` times; every replay's single backward pass gives
  both the weights' gradient (the optimizer steps) and the input's gradient
  (the perturbation steps by `eps * sign`, clipped to the ball). The
  perturbation is carried from batch to batch.

The trainers (`tfadv.trainers.TrainerBase`) run these from their `method`;
this module holds the arithmetic, in TF ops (traced by `fit`, compiled by
XLA, per replica under `tf.distribute`).
"""

from __future__ import annotations

import functools

import tensorflow as tf

from tfadv.attacks.base import input_gradient
from tfadv.config.core import FAST_METHODS  # ("fgsm_rs", "n_fgsm", "free")
from tfadv.ops import norms
from tfadv.trainers.replicas import track_loss

__all__ = ["DEFAULTS", "FAST_METHODS", "FREE_REPLAYS", "ONE_STEP_METHODS", "CarriedPerturbation",
           "batch_rows", "free_step", "free_train_step", "one_step_adversary"]

ONE_STEP_METHODS = ("fgsm_rs", "n_fgsm")

# Each method's step and noise as multiples of eps, and whether it projects:
# the papers' defaults (Wong et al. alpha = 1.25 eps; de Jorge et al. k = 2 eps,
# alpha = eps; Shafahi et al. step eps from a zero start).
DEFAULTS = {
    "fgsm_rs": {"fast_step": 1.25, "fast_noise": 1.0, "project": True},
    "n_fgsm": {"fast_step": 1.0, "fast_noise": 2.0, "project": False},
    "free": {"fast_step": 1.0, "fast_noise": 0.0, "project": True},
}
# Shafahi et al.'s CIFAR-10 setting (m = 8); ImageNet used 4.
FREE_REPLAYS = 8


def one_step_adversary(model, x, target, objective, *, eps, step_size, noise, norm,
                       bounds, project=True, direction=1.0):
    """One gradient step from a random start: the FGSM-RS and N-FGSM adversary.

    `x0 = clip(x + u)`, `u ~ U(ball(noise))`; `x1 = x0 + step_size * dir(grad)`
    (dir: sign for Linf, unit L2 for L2); with `project`, `x1` is projected
    onto the eps-ball around `x`; then clipped to `bounds`.

    Args:
        model: callable, x -> outputs (logits or embeddings).
        x: `[N, ...]` float inputs inside `bounds`.
        target: what `objective` compares the outputs with (labels, or
            reference embeddings).
        objective: `(outputs, target) -> [N]` loss to ascend.
        eps: radius of the ball (input units); a float or scalar tensor.
        step_size: the step, input units.
        noise: radius of the uniform start, input units (0: no start noise).
        norm: "inf" or "2".
        bounds: `(low, high)` input range or None.
        project: project onto the eps-ball (FGSM-RS) or not (N-FGSM).
        direction: +1 ascends the objective, -1 descends it (targeted).

    Returns:
        `x_adv` with the shape and dtype of x, no gradient attached.
    """
    x = tf.convert_to_tensor(x)
    in_dtype = x.dtype
    x = tf.cast(x, norms.working_dtype(in_dtype))
    start = norms.random_start(tf.shape(x), tf.cast(noise, x.dtype), norm, x.dtype)
    x0 = norms.clip_to_bounds(x + start, bounds)
    _, _, grad = input_gradient(model, x0, target, objective, direction_only=True)
    x1 = x0 + tf.cast(direction * step_size, x.dtype) * norms.normalize_gradient(grad, norm)
    if project:
        x1 = x + norms.project(x1 - x, tf.cast(eps, x.dtype), norm)
    x1 = norms.clip_to_bounds(x1, bounds)
    return tf.stop_gradient(tf.cast(x1, in_dtype))


def free_step(x, x_adv, grad, *, eps, step_size, norm, bounds, direction=1.0):
    """Free training's perturbation update from the replay's input gradient.

    `delta <- Proj_eps(x_adv - x + step_size * dir(grad))`, then `x + delta`
    clipped to `bounds`; returns the new delta (`x_adv_next - x`).

    Args:
        x: `[N, ...]` clean inputs (working dtype); x_adv: this replay's
            inputs; grad: the training loss's gradient at `x_adv` (any
            positive scale: loss scaling changes no direction; non-finite
            entries count as zero).
        eps, step_size: radius and step, input units.
        norm: "inf" or "2"; bounds: input range or None.
        direction: +1 ascends (untargeted), -1 descends.
    """
    grad = tf.cast(grad, x.dtype)
    grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
    moved = x_adv - x + tf.cast(direction * step_size, x.dtype) * norms.normalize_gradient(
        grad, norm)
    delta = norms.project(moved, tf.cast(eps, x.dtype), norm)
    return norms.clip_to_bounds(x + delta, bounds) - x


class CarriedPerturbation:
    """Free training's perturbation, carried from one batch to the next.

    Shafahi et al. keep one perturbation of the batch's shape for the whole
    run (a batch starts from where the previous one left it); a smaller batch
    uses its first rows. The perturbation lives in a non-trainable variable of
    `[capacity, *example_shape]` (per replica under `tf.distribute`; XLA
    needs its shape fixed), created before `fit` traces the step. It is
    transient state, not saved with the model: a resumed run starts from zero,
    as the paper's first batch does.

    Args:
        capacity: rows (the per-replica batch size).
        example_shape: the shape of one input.
        dtype: the working dtype of the inputs.
    """

    def __init__(self, capacity, example_shape, dtype=tf.float32):
        self.capacity = int(capacity)
        self.variable = tf.Variable(
            tf.zeros([self.capacity, *example_shape], dtype), trainable=False,
            name="free_perturbation", synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def _rows(self, x):
        return tf.minimum(tf.shape(x)[0], self.capacity)

    def start(self, x):
        """The carried perturbation for a batch like `x` (zero rows beyond the capacity)."""
        rows = self._rows(x)
        carried = tf.cast(self.variable[:rows], x.dtype)
        pad = [[0, tf.shape(x)[0] - rows]] + [[0, 0]] * (len(x.shape) - 1)
        return tf.pad(carried, pad)

    def store(self, delta):
        """Keeps `delta`'s first rows for the next batch."""
        rows = self._rows(delta)
        kept = tf.concat([tf.cast(delta[:rows], self.variable.dtype), self.variable[rows:]], 0)
        self.variable.assign(kept, read_value=False)


def batch_rows(data, batch_size=None):
    """The batch size `fit` will see for `data` (a Dataset, arrays, a Keras PyDataset).

    Returns:
        The first batch's rows, `batch_size` (32 if None) for arrays, or None
        when it cannot be known without consuming a one-shot iterator.
    """
    if isinstance(data, tf.data.Dataset):
        spec = tf.nest.flatten(data.element_spec)[0]
        if spec.shape.rank and spec.shape[0] is not None:
            return int(spec.shape[0])
        for element in data.take(1):
            return int(tf.shape(tf.nest.flatten(element)[0])[0])
        return None
    if hasattr(data, "shape") or isinstance(data, (list, tuple, dict)):
        return int(batch_size or 32)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        try:
            first = data[0]
        except (IndexError, TypeError, KeyError):
            return None
        return int(len(tf.nest.flatten(first)[0]))
    return None


def free_train_step(model, batch, apply_gradients):
    """One batch of "free" training: `model.free_replays` optimizer steps on it,
    each also stepping the perturbation, which starts from (and is stored back
    into) the model's carried perturbation.

    Without a distribution strategy the first `free_replays - 1` replays run as
    one `tf.while_loop` (traced once whatever the count; unrolled, a large
    model's trace took minutes). Under a strategy they are unrolled, since an
    optimizer's cross-replica step cannot sit inside a loop.

    Args:
        model: a `tfadv.trainers.TrainerBase` with method "free".
        batch: its `Batch`.
        apply_gradients: `(optimizer, grads, variables)` -> None, the step.
    Returns:
        The step's logs, as `train_step` returns them.
    """
    prepared = model.prepare_batch(batch)
    x = tf.cast(batch.x, norms.working_dtype(batch.x.dtype))
    budget = model._budget()
    eps = tf.cast(budget, x.dtype)
    step = tf.cast(model.fast_step * budget * model.step_scale, x.dtype)
    attack = model.attack
    carried = model._carried
    delta = tf.zeros_like(x) if carried is None else carried.start(x)
    delta = norms.clip_to_bounds(x + norms.project(delta, eps, attack.norm), attack.bounds) - x
    replay = functools.partial(_free_replay, model, batch, prepared, x, eps, step,
                               apply_gradients)

    def metered(delta):
        delta, compiled = replay(delta)
        if compiled is not None:
            model.compute_metrics(*compiled)
        return delta

    earlier = model.free_replays - 1
    if earlier and not tf.distribute.has_strategy():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        _, delta = tf.while_loop(lambda i, _: i < earlier,
                                 lambda i, delta: (i + 1, metered(delta)),
                                 (tf.constant(0), delta), parallel_iterations=1)
    else:
        for _ in range(earlier):
            delta = metered(delta)
    delta, compiled = replay(delta)
    if carried is not None:
        carried.store(delta)
    return model._logs(True, compiled)


def _free_replay(model, batch, prepared, x, eps, step, apply_gradients, delta):
    """One replay: a training step at `x + delta`; returns the next perturbation
    (ordered after the weights' update) and the compiled metrics' inputs."""
    attack = model.attack
    variables = model.trainable_variables
    x_adv = x + delta
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        replay_prepared = dict(prepared, x_adv=tf.cast(x_adv, batch.x.dtype))
        loss, outputs = model.compute_adversarial_loss(batch, replay_prepared)
        scaled = model.optimizer.scale_loss(loss)
    track_loss(model.tracked_metrics["loss"], loss, batch.size)
    *grads, grad_x = tape.gradient(scaled, [*variables, x_adv])
    delta = free_step(x, x_adv, grad_x, eps=eps, step_size=step, norm=attack.norm,
                      bounds=attack.bounds, direction=-1.0 if attack.targeted else 1.0)
    computed = [t for t in tf.nest.flatten((loss, grads, delta, outputs))
                if isinstance(t, tf.Tensor)]
    with tf.control_dependencies(computed):
        apply_gradients(model.optimizer, grads, variables)
        compiled = model.after_train_step(batch, replay_prepared, outputs)
        # The next replay reads the weights this one updated.
        delta = tf.identity(delta)
    return delta, compiled
