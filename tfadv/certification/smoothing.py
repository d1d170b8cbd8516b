"""Randomized smoothing: Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019.

The smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I),
returns the class the base classifier f predicts most often under Gaussian
noise. If the top class has probability p_A >= 1/2, g is constant on the L2
ball of radius sigma * Phi^-1(p_A) around x. `predict` and `certify` are the
paper's PREDICT and CERTIFY: Monte Carlo counts of f's predictions, a
two-sided binomial test (PREDICT) and a one-sided Clopper-Pearson lower bound
on p_A (CERTIFY), both from scipy. With probability at least 1 - alpha a
returned label is g's and a returned radius is certified.

The counting is one compiled `tf.while_loop` over noise batches per input
(`sample_counts`); on a GPU the same function runs there.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf
from scipy.stats import binomtest, norm

from tfadv.attacks.base import call_model

__all__ = ["ABSTAIN", "RandomizedSmoothing", "check_alpha", "check_inputs"]

ABSTAIN = -1


def check_inputs(model, x) -> np.ndarray:
    """x as float32 [N, ...], checked: a batch of finite inputs of the model's shape.

    Raises:
        ValueError: no inputs, no batch axis (one input [H, W, C] given: pass
            `x[None]`), another shape than the model's input, or NaN / inf.
    """
    x = np.asarray(x, np.float32)
    expected = getattr(model, "input_shape", None)
    if isinstance(expected, tuple) and len(expected) > 1 and x.ndim == len(expected) - 1 \
            and x.shape == tuple(expected[1:]):
        raise ValueError(f"Expected a batch of inputs [N, {', '.join(map(str, x.shape))}]. "
                         f"Received one input of shape {x.shape}: pass x[None].")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"Expected a non-empty batch of inputs [N, ...]. Received shape "
                         f"{x.shape}.")
    if isinstance(expected, tuple) and len(expected) == x.ndim and any(
            e is not None and e != s for e, s in zip(expected[1:], x.shape[1:])):
        raise ValueError(f"Expected inputs of the model's shape {expected}. Received "
                         f"{x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("The inputs hold NaN or inf: a certificate of such an input means "
                         "nothing. Clean them first.")
    return x


class RandomizedSmoothing:
    """A base classifier smoothed with isotropic Gaussian noise (Cohen et al. 2019).

    Args:
        model: callable mapping inputs [B, ...] (float32, input units) to
            logits or scores [B, C]; its argmax is the base prediction f(x).
        sigma: noise standard deviation, in input units (e.g. 0.25 on [0, 1]
            images). The certified radii are L2, in the same units.
        num_classes: C.
        batch_size: noise samples per model call.
        seed: seed of the noise generator (a run is reproducible).

    Raises:
        ValueError: sigma <= 0, num_classes < 2 or batch_size < 1.
    """

    def __init__(self, model, sigma: float, num_classes: int, *, batch_size: int = 1000,
                 seed: int = 0):
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Expected sigma > 0 (input units). Received: sigma={sigma!r}")
        if int(num_classes) < 2:
            raise ValueError(f"Expected num_classes >= 2. Received: {num_classes!r}")
        if int(batch_size) < 1:
            raise ValueError(f"Expected batch_size >= 1. Received: {batch_size!r}")
        self.model = model
        self.sigma = float(sigma)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self._generator = tf.random.Generator.from_seed(int(seed))
        self._counts = tf.function(self._counts_one, reduce_retracing=True)

    def _counts_one(self, x, n, batch):
        """Counts [C] of the base prediction over n noisy copies of one input x."""
        def body(done, counts):
            b = tf.minimum(batch, n - done)
            shape = tf.concat([[b], tf.shape(x)], 0)
            noisy = x[None] + self._generator.normal(shape, stddev=self.sigma)
            pred = tf.argmax(call_model(self.model, noisy), axis=-1, output_type=tf.int32)
            counts += tf.math.bincount(pred, minlength=self.num_classes,
                                       maxlength=self.num_classes, dtype=tf.int64)
            return done + b, counts

        _, counts = tf.while_loop(
            lambda done, counts: done < n, body,
            (tf.constant(0, tf.int64), tf.zeros([self.num_classes], tf.int64)))
        return counts

    def sample_counts(self, x, n: int, batch_size: int | None = None,
                      progress=None) -> np.ndarray:
        """How often the base classifier predicts each class under n noise draws per input.

        Args:
            x: float inputs [N, ...] (input units).
            n: noise samples per input.
            batch_size: noise samples per model call (default: the constructor's).
            progress: a tqdm-like bar, advanced by n per input.

        Returns:
            int64 [N, C] counts; each row sums to n.

        Raises:
            ValueError: n < 1; inputs as `check_inputs` refuses them; a model
                with another number of outputs than num_classes.
        """
        return self._sample_counts(self._checked(x), n, batch_size, progress)

    def _checked(self, x) -> np.ndarray:
        """`check_inputs`, and the model's outputs checked against num_classes."""
        x = check_inputs(self.model, x)
        width = int(call_model(self.model, tf.constant(x[:1])).shape[-1])
        if width != self.num_classes:
            raise ValueError(f"The model has {width} outputs; num_classes={self.num_classes}. "
                             "Pass the model's number of classes.")
        return x

    def _sample_counts(self, x, n, batch_size=None, progress=None) -> np.ndarray:
        """`sample_counts` of inputs already checked."""
        if int(n) < 1:
            raise ValueError(f"Expected n >= 1 noise samples. Received: n={n!r}")
        batch = tf.constant(int(batch_size or self.batch_size), tf.int64)
        samples = int(n)
        n = tf.constant(samples, tf.int64)
        rows = []
        for xi in x:
            rows.append(self._counts(tf.constant(xi), n, batch).numpy())
            if progress is not None:
                progress.update(samples)
        return np.stack(rows)

    def predict(self, x, n: int, alpha: float = 0.001, batch_size: int | None = None):
        """PREDICT: g(x), or ABSTAIN (-1) when the top class is not significantly ahead.

        The two most frequent classes' counts n_A, n_B are tested with a
        two-sided binomial test of p = 1/2 (scipy); the top class is returned
        when its p-value is at most alpha (the probability of returning a
        class other than g(x) is then at most alpha).

        Args:
            x: float inputs [N, ...]; n: noise samples per input; alpha: the
                test's level.

        Returns:
            int64 [N] labels, -1 where it abstains.
        """
        check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size)
        top2 = np.argsort(-counts, axis=1, kind="stable")[:, :2]
        out = np.full(len(counts), ABSTAIN, np.int64)
        for i, (a, b) in enumerate(top2):
            n_a, n_b = int(counts[i, a]), int(counts[i, b])
            if n_a + n_b and binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                out[i] = a
        return out

    def certify(self, x, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                batch_size: int | None = None, progress: bool = False):
        """CERTIFY: g(x) with a certified L2 radius, or ABSTAIN.

        n0 noise samples pick the candidate class c_A; n fresh samples count
        it, and a one-sided (1 - alpha) Clopper-Pearson lower bound p_A on its
        probability (scipy's exact binomial interval) gives the radius
        sigma * Phi^-1(p_A). Below p_A = 1/2 it abstains.

        Args:
            x: float inputs [N, ...] (input units); n0: selection samples;
                n: estimation samples; alpha: 1 - confidence.
            progress: show a bar of the noise samples done and to do.

        Returns:
            (labels int64 [N], -1 = abstain; radii float64 [N], L2 in input
            units, 0 where it abstains).
        """
        check_alpha(alpha)
        if int(n0) < 1:
            raise ValueError(f"Expected n0 >= 1 selection samples. Received: n0={n0!r}")
        x = self._checked(x)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(x) * (int(n0) + int(n)), unit="sample", unit_scale=True,
                       desc="noise samples", file=sys.stderr)
        try:
            pick = np.argmax(self._sample_counts(x, n0, batch_size, bar), axis=1)
            counts = self._sample_counts(x, n, batch_size, bar)
        finally:
            if bar is not None:
                bar.close()
        labels = np.full(len(pick), ABSTAIN, np.int64)
        radii = np.zeros(len(pick))
        for i, c in enumerate(pick):
            p_lower = lower_confidence_bound(int(counts[i, c]), int(n), alpha)
            if p_lower > 0.5:
                labels[i], radii[i] = c, self.sigma * norm.ppf(p_lower)
        return labels, radii


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion
    (the lower end of scipy's exact two-sided interval at level 1 - 2 alpha)."""
    return float(binomtest(successes, trials).proportion_ci(1 - 2 * alpha, method="exact").low)


def check_alpha(alpha):
    if not 0 < float(alpha) < 0.5:
        raise ValueError(f"Expected 0 < alpha < 0.5. Received: alpha={alpha!r}")


def certified_accuracy(labels, radii, y, at=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Certified accuracy at each radius: the fraction of inputs whose certified label is
    the true one with a certified radius of at least r (Cohen et al.'s table).

    Args:
        labels, radii: `certify`'s output (labels int [N], -1 = abstain; radii [N]).
        y: true labels int [N].
        at: the radii r (input units, L2).

    Returns:
        {r: accuracy} in the order given (r as float).
    """
    labels, radii, y = np.asarray(labels), np.asarray(radii), np.asarray(y)
    if not (labels.shape == radii.shape == y.shape):
        raise ValueError(f"Expected labels, radii and y of one shape [N]. Received "
                         f"{labels.shape}, {radii.shape}, {y.shape}.")
    correct = labels == y
    return {float(r): float(np.mean(correct & (radii >= r))) if len(y) else float("nan")
            for r in at}
