"""Training for randomized smoothing: Gaussian augmentation and SmoothAdv.

A smoothed classifier (`tfadv.certification.RandomizedSmoothing`) is only as
good as its base model's accuracy under Gaussian noise, so its base model is
trained on noisy inputs:

- "gaussian" (Cohen, Rosenfeld & Kolter, ICML 2019): each training input is
  replaced by `x + e`, `e ~ N(0, noise_sigma^2 I)`, not clipped (the noise at
  certification time is not clipped either).
- "smoothadv" (Salman et al., "Provably Robust Deep Learning via
  Adversarially Trained Smoothed Classifiers", NeurIPS 2019): PGD on the
  smoothed *soft* classifier. With m noise draws `e_1..e_m` fixed for the
  batch, the attack maximises `-log((1/m) sum_i softmax(f(x' + e_i))_y)` over
  the L2 ball `||x' - x||_2 <= eps` (inside the input bounds); the base model
  then trains on the m noisy copies `x' + e_i` of the adversary, with the
  same draws (the paper's `SmoothAdv_PGD`, m = `noise_samples`).

With `noise_samples` m > 1 every example is trained on m times per step (m
noisy copies; the batch the loss sees has m * N rows, copy-major: rows
`k*N .. (k+1)*N - 1` are copy k). These functions are TF ops, traced by `fit`.
"""

from __future__ import annotations

import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.base import call_model
from tfadv.config.core import NOISE_METHODS  # ("gaussian", "smoothadv")

__all__ = ["NOISE_METHODS", "NOISE_SAMPLES", "check_settings", "noisy_copies", "repeat_rows",
           "smoothadv_adversary", "smoothed_log_probs", "smoothed_pgd"]

# Salman et al.'s training script draws one noise vector per example by default.
NOISE_SAMPLES = 1


def check_settings(method, attack, sigma, samples):
    """Validated `(noise_sigma, noise_samples)` of a trainer (float or None, int).

    Raises:
        ValueError: for "gaussian" / "smoothadv": sigma not > 0 or samples
            not a whole number >= 1; for "smoothadv": no L2 training attack
            with a positive eps.
    """
    if method not in NOISE_METHODS:
        return (None if sigma is None else float(sigma)), int(samples)
    if not (sigma is not None and float(sigma) > 0):
        raise ValueError(f'method="{method}" trains on Gaussian noise: pass noise_sigma > 0 '
                         "(input units, e.g. 0.25 on [0, 1] images: the sigma the model will "
                         f"be certified with). Received: noise_sigma={sigma!r}")
    if int(samples) != samples or int(samples) < 1:
        raise ValueError(f"Expected noise_samples >= 1. Received: noise_samples={samples!r}")
    if method == "smoothadv" and not (getattr(attack, "eps", None)
                                      and getattr(attack, "norm", None) == "2"):
        raise ValueError(
            'method="smoothadv" attacks the smoothed classifier inside an L2 ball: pass an L2 '
            "training attack with a positive eps, e.g. "
            'attack=tfadv.attacks.PGD(eps=1.0, step_size=0.25, steps=8, norm="2").')
    return float(sigma), int(samples)


def repeat_rows(t, copies: int):
    """`[N, ...] -> [copies * N, ...]`, copy-major (`tf.concat([t] * copies)`); None stays None."""
    if t is None or copies == 1:
        return t
    return tf.concat([t] * copies, axis=0)


def gaussian_noise(x, sigma, copies: int):
    """`copies * N` draws of `N(0, sigma^2)` shaped like `repeat_rows(x, copies)` (x's dtype)."""
    shape = tf.concat([[copies * tf.shape(x)[0]], tf.shape(x)[1:]], axis=0)
    return tf.random.normal(shape, stddev=tf.cast(sigma, x.dtype), dtype=x.dtype)


def noisy_copies(x, sigma, copies: int = 1):
    """The "gaussian" training inputs: `repeat_rows(x, copies) + e`, e ~ N(0, sigma^2 I).

    Args:
        x: float `[N, ...]` inputs (input units).
        sigma: noise standard deviation (input units).
        copies: noisy copies per input.

    Returns:
        `[copies * N, ...]`, x's dtype, no gradient attached; not clipped.
    """
    x = tf.convert_to_tensor(x)
    return tf.stop_gradient(repeat_rows(x, copies) + gaussian_noise(x, sigma, copies))


def smoothed_log_probs(model, x, noise, copies: int):
    """Log-probabilities of the smoothed soft classifier estimated with fixed draws.

    `log((1/m) sum_i softmax(f(x + e_i)))` with `e_i` the rows of `noise`
    (copy-major, m = copies), computed with log-sum-exp (float32).

    Args:
        model: callable `[M, ...] -> [M, C]` logits.
        x: `[N, ...]` inputs; noise: `[copies * N, ...]` draws.

    Returns:
        float32 `[N, C]`; each row's exponentials sum to 1, so as logits its
        softmax cross-entropy is `-log` of the smoothed probability of the label.
    """
    logits = tf.cast(call_model(model, repeat_rows(x, copies) + noise), tf.float32)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    n = tf.shape(x)[0]
    per_copy = tf.reshape(log_p, tf.concat([[copies, n], tf.shape(log_p)[1:]], axis=0))
    return tf.reduce_logsumexp(per_copy, axis=0) - tf.math.log(float(copies))


def smoothed_pgd(attack, model, x, labels, noise, copies: int, eps=None):
    """The attack on the smoothed soft classifier estimated with the fixed draws `noise`.

    Maximises `-log((1/m) sum_i softmax(f(x' + e_i))_y)` (Salman et al.'s
    SmoothAdv attack) with `attack`'s steps inside its ball of radius `eps`.

    Args:
        attack: a tfadv attack (L2 for SmoothAdv); model: the base classifier (logits).
        x: `[N, ...]` inputs; labels: `[N]` int labels; noise: `[copies * N, ...]` draws.
        eps: the budget (None: the attack's).

    Returns:
        `x'` `[N, ...]`, no gradient attached.
    """
    def smoothed(inputs):
        return smoothed_log_probs(model, inputs, noise, copies)

    return attack(smoothed, x, labels, objective=objectives_lib.cross_entropy, eps=eps)


def smoothadv_adversary(attack, model, x, labels, *, sigma, copies: int, eps):
    """SmoothAdv's training inputs: m noisy copies of PGD's adversary on the smoothed classifier.

    Args:
        attack: the training attack (an L2 tfadv attack such as `PGD(norm="2")`):
            its steps, step size, bounds and start are used, its eps replaced by `eps`.
        model: the base classifier (logits).
        x: `[N, ...]` inputs; labels: `[N]` int labels.
        sigma: noise standard deviation; copies: m; eps: this step's L2 budget.

    Returns:
        `[copies * N, ...]` inputs `x' + e_i` (x's dtype), no gradient attached.
    """
    x = tf.convert_to_tensor(x)
    noise = gaussian_noise(x, sigma, copies)
    x_adv = smoothed_pgd(attack, model, x, labels, noise, copies, eps)
    return tf.stop_gradient(repeat_rows(tf.cast(x_adv, x.dtype), copies) + noise)
