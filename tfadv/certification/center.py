"""Center smoothing: a certificate for an embedding model's output and its verification decision.

Kumar & Goldstein, "Center Smoothing: Certified Robustness for Networks with
Structured Outputs", NeurIPS 2021. The smoothed embedding of x is the centre
of the smallest ball holding at least half of the embeddings of x + e, e ~
N(0, sigma^2 I). It is estimated by the sampled embedding whose median
distance to the other samples is smallest (a 2-approximation, beta = 2). For
every x' with ||x' - x||_2 <= eps_in the smoothed embedding of x' then lies
within eps_out = (1 + beta) * R of the estimate, where R is the
`Phi(Phi^-1(1/2 + delta) + eps_in / sigma) + sqrt(ln(1 / alpha_2) / (2 n))`
quantile of the distances from the estimate to n fresh noisy embeddings;
with probability at least 1 - alpha_1 - alpha_2 (alpha_1 for the check that
the estimate is a valid centre, alpha_2 for R).

Embeddings are compared on the unit sphere (each sampled embedding is
L2-normalised), so the smoothed embedding is a unit vector and a cosine
threshold `tau` is the distance threshold `sqrt(2 - 2 tau)`: a probe whose
smoothed embedding lies within distance d of a reference is certified to
match it at input radius eps_in when d + eps_out < sqrt(2 - 2 tau), and
certified not to match when d - eps_out > sqrt(2 - 2 tau).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from scipy.stats import norm

from tfadv.attacks.base import call_model
from tfadv.certification.smoothing import check_alpha, check_inputs

__all__ = ["NOT_CERTIFIED", "CenterSmoothing", "EmbeddingCertificate", "certified_decisions"]

NOT_CERTIFIED = -1


@dataclass
class EmbeddingCertificate:
    """What `CenterSmoothing.certify` returns for N inputs and R input radii.

    Attributes:
        centers: float32 [N, D] smoothed (unit) embeddings.
        valid: bool [N]: the centre passed the check (otherwise it abstains:
            every eps_out is inf).
        radii: the input radii eps_in (L2, input units), length R.
        eps_out: float64 [N, R]: certified bound on how far the smoothed
            embedding moves (L2 on the unit sphere) for each input radius;
            inf where nothing is certified.
        smoothing_error: float64 [N]: distance from the centre to the
            unsmoothed embedding of x.
        samples: noise samples drawn per input.
    """

    centers: np.ndarray
    valid: np.ndarray
    radii: tuple
    eps_out: np.ndarray
    smoothing_error: np.ndarray
    samples: int


class CenterSmoothing:
    """An embedding model smoothed with Gaussian noise (Kumar & Goldstein 2021).

    Args:
        model: callable mapping inputs [B, ...] (float32, input units, e.g.
            pixels 0-255 for FaceNet) to embeddings [B, D].
        sigma: noise standard deviation, input units.
        batch_size: noise samples per model call.
        candidates: sampled embeddings tried as the centre (the paper's
            procedure for high-dimensional outputs: 30).
        delta: the margin (the paper's 0.05 needs n0 >= 1,200 at alpha
            0.01): a centre is used only when its median ball is shown to
            hold at least 1/2 - delta of the mass, and the certificate then
            covers 1/2 + delta of it.
        seed: seed of the noise generator.

    Raises:
        ValueError: sigma <= 0, batch_size or candidates < 1, delta outside (0, 1/2).
    """

    def __init__(self, model, sigma: float, *, batch_size: int = 64, candidates: int = 30,
                 delta: float = 0.1, seed: int = 0):
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Expected sigma > 0 (input units). Received: sigma={sigma!r}")
        if int(batch_size) < 1 or int(candidates) < 1:
            raise ValueError(f"Expected batch_size, candidates >= 1. Received: {batch_size!r}, "
                             f"{candidates!r}")
        if not 0 < float(delta) < 0.5:
            raise ValueError(f"Expected 0 < delta < 0.5. Received: delta={delta!r}")
        self.model = model
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self.candidates = int(candidates)
        self.delta = float(delta)
        self._generator = tf.random.Generator.from_seed(int(seed))
        self._distances = tf.function(self._distances_one, reduce_retracing=True)

    def quantile(self, radius: float, n: int, alpha: float) -> float:
        """The quantile of the distances that certifies input radius `radius` with n samples
        at confidence 1 - alpha/2 (above 1: nothing can be certified)."""
        return float(norm.cdf(norm.ppf(0.5 + self.delta) + radius / self.sigma)
                     + _hoeffding(n, alpha / 2))

    def largest_radius(self, n: int, alpha: float) -> float:
        """The largest input radius `quantile` keeps at most 1 for these n and alpha (>= 0)."""
        top = norm.ppf(1.0 - _hoeffding(n, alpha / 2)) - norm.ppf(0.5 + self.delta)
        return float(max(self.sigma * top, 0.0))

    def _embed(self, inputs):
        return tf.math.l2_normalize(tf.cast(call_model(self.model, inputs), tf.float32), -1)

    def _noisy(self, x, b):
        shape = tf.concat([[b], tf.shape(x)], 0)
        return x[None] + self._generator.normal(shape, stddev=self.sigma)

    def _distances_one(self, x, refs, n, batch):
        """[K, n] distances from refs [K, D] to the embeddings of n noisy copies of x."""
        def body(done, out):
            b = tf.minimum(batch, n - done)
            z = self._embed(self._noisy(x, b))
            d = tf.norm(refs[:, None, :] - z[None], axis=-1)
            return done + b, out.write(tf.cast(done // batch, tf.int32), tf.transpose(d))

        _, out = tf.while_loop(lambda done, out: done < n, body,
                               (tf.constant(0, tf.int64),
                                tf.TensorArray(tf.float32, size=0, dynamic_size=True,
                                               infer_shape=False)))
        return tf.transpose(out.concat())

    def distances(self, x, refs, n: int) -> np.ndarray:
        """Distances from refs [K, D] to the unit embeddings of n noisy copies of one input x.

        Returns:
            float32 [K, n].
        """
        return self._distances(tf.constant(x, tf.float32), tf.constant(refs, tf.float32),
                               tf.constant(int(n), tf.int64),
                               tf.constant(self.batch_size, tf.int64)).numpy()

    def center(self, x, n0: int, alpha_1: float):
        """The smoothed embedding of one input, its median radius and the validity check.

        `candidates` noisy embeddings are tried; the one with the smallest
        median distance r to n0 fresh noisy embeddings is the centre. It is
        valid when, on n0 more, the fraction p within r satisfies
        `max(D1, 1/2 - (p - D1)) <= delta` with `D1 = sqrt(ln(2 / alpha_1) / (2 n0))`.

        Returns:
            (centre float32 [D], r, valid).
        """
        cands = self._embed(self._noisy(tf.constant(x, tf.float32),
                                        self.candidates)).numpy()
        medians = np.median(self.distances(x, cands, n0), axis=1)
        best = int(np.argmin(medians))
        center, radius = cands[best], float(medians[best])
        inside = float(np.mean(self.distances(x, center[None], n0)[0] <= radius))
        d1 = _hoeffding(n0, alpha_1 / 2)
        return center, radius, bool(max(d1, 0.5 - (inside - d1)) <= self.delta)

    def certify(self, x, radii, *, n0: int = 1000, n: int = 2000, alpha: float = 0.01,
                progress: bool = False) -> EmbeddingCertificate:
        """CERTIFY for each input: the smoothed embedding and how far it can move.

        Args:
            x: float inputs [N, ...] (input units).
            radii: input L2 radii eps_in (input units).
            n0: noise samples of each of the two centre steps (choice, check).
            n: noise samples of the quantile R.
            alpha: 1 - confidence of each input's certificate, split evenly
                between the centre check and R.
            progress: show a bar of the noise samples done and to do.

        Returns:
            An `EmbeddingCertificate`.

        Raises:
            ValueError: n0 or n < 1, alpha outside (0, 1/2), a negative radius,
                n0 too small to ever validate a centre at delta, inputs as
                `check_inputs` refuses them.
        """
        radii = tuple(float(r) for r in np.atleast_1d(radii))
        if int(n0) < 1 or int(n) < 1:
            raise ValueError(f"Expected n0, n >= 1. Received: n0={n0!r}, n={n!r}")
        check_alpha(alpha)
        if any(not r >= 0 for r in radii):
            raise ValueError(f"Expected radii >= 0 (input units). Received: {radii}")
        x = check_inputs(self.model, x)
        if _hoeffding(int(n0), alpha / 4) > self.delta:
            need = int(np.ceil(np.log(4 / alpha) / (2 * self.delta ** 2)))
            raise ValueError(f"n0={n0} samples can never validate a centre at delta "
                             f"{self.delta:g} and alpha {alpha:g}: use n0 >= {need} or a larger "
                             "delta.")
        per_input = self.candidates + 2 * int(n0) + int(n)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(x) * per_input, unit="sample", unit_scale=True,
                       desc="noise samples", file=sys.stderr)
        # Quantile of the distances each input radius needs (> 1: nothing certified).
        quantiles = [self.quantile(r, int(n), alpha) for r in radii]
        centers, valid, eps_out, error = [], [], [], []
        try:
            for xi in x:
                c, _, ok = self.center(xi, int(n0), alpha / 2)
                d = np.sort(self.distances(xi, c[None], int(n))[0])
                # The smallest distance with at least a fraction q of the samples
                # within it (the empirical quantile, never interpolated down).
                out = [3.0 * float(d[min(int(np.ceil(q * len(d))), len(d)) - 1])
                       if ok and q <= 1.0 else np.inf for q in quantiles]
                clean = self._embed(xi[None]).numpy()[0]
                centers.append(c)
                valid.append(ok)
                eps_out.append(out)
                error.append(float(np.linalg.norm(c - clean)))
                if bar is not None:
                    bar.update(per_input)
        finally:
            if bar is not None:
                bar.close()
        d = centers[0].shape[-1] if centers else 0
        return EmbeddingCertificate(
            centers=np.asarray(centers, np.float32).reshape(len(x), d),
            valid=np.asarray(valid, bool), radii=radii,
            eps_out=np.asarray(eps_out, np.float64).reshape(len(x), len(radii)),
            smoothing_error=np.asarray(error), samples=per_input)


def _hoeffding(n: int, p: float) -> float:
    """sqrt(ln(1 / p) / 2n): how far an empirical fraction of n samples may fall below the
    true one with probability at most p (Hoeffding)."""
    return float(np.sqrt(np.log(1.0 / p) / (2 * n)))


def certified_decisions(certificate: EmbeddingCertificate, references, threshold: float):
    """The certified verification decision of each input against its reference, per radius.

    Args:
        certificate: `CenterSmoothing.certify`'s result for N probes.
        references: float [N, D] reference embeddings (normalised here).
        threshold: the model's cosine-similarity threshold tau (a match when
            cosine >= tau).

    Returns:
        (decision bool [N]: the smoothed embedding matches its reference;
        certified int [N, R]: 1 = match certified, 0 = non-match certified,
        -1 (`NOT_CERTIFIED`) = the decision may change within that radius).

    Raises:
        ValueError: a threshold outside [-1, 1]; references not [N, D], zero or
            not finite.
    """
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"Expected a cosine threshold in [-1, 1]. Received: {threshold!r}")
    refs = np.asarray(references, np.float64)
    centers = certificate.centers.astype(np.float64)
    if refs.shape != centers.shape:
        raise ValueError(f"Expected references {centers.shape} (one per input). "
                         f"Received {refs.shape}.")
    lengths = np.linalg.norm(refs, axis=1, keepdims=True)
    if not (np.isfinite(lengths).all() and (lengths > 0).all()):
        raise ValueError("Expected finite, non-zero reference embeddings (a zero or NaN "
                         "reference matches nothing).")
    refs = refs / lengths
    distance = np.linalg.norm(centers - refs, axis=1)
    limit = np.sqrt(max(2.0 - 2.0 * float(threshold), 0.0))
    match = distance <= limit
    eps_out = certificate.eps_out
    out = np.full(eps_out.shape, NOT_CERTIFIED, np.int64)
    out[(distance[:, None] + eps_out < limit)] = 1
    out[(distance[:, None] - eps_out > limit)] = 0
    return match, out
