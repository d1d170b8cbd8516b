"""Attacks on face-embedding models: dodging and impersonation.

A face system compares embeddings by cosine similarity against a threshold.
Two threat models (Sharif et al. 2016; the RobFR benchmark, Yang et al. 2020):

- dodging: make a face NOT match its own identity: push the embedding away
  from a reference embedding of the same person (its clean embedding, or an
  enrolled photo / the person's centre). Untargeted: ascend the cosine
  distance. Success: similarity < threshold.
- impersonation: make a face match a chosen other person: pull the embedding
  toward that person's reference. Targeted: descend the cosine distance.
  Success: similarity >= threshold.

All our attacks take the reference embeddings as `y` ([N, D] float), with
`objective="cosine_distance"`; images are raw pixels, so budgets are in pixel
units with `bounds=(0, 255)`. The cosine objective's gradient vanishes at the
clean image when the reference IS the clean embedding: use a random start.

    attack = dodging_pgd(eps=4, steps=20)
    x_adv = attack(embedder, x, reference_embeddings)
    ok = attack_success(embedder(x_adv), reference_embeddings, threshold, "dodging")
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.config import check_threshold
from tfadv.attacks.apgd import APGD
from tfadv.attacks.base import call_model
from tfadv.attacks.cw import CarliniWagnerL2
from tfadv.attacks.pgd import FGSM, PGD
from tfadv.attacks import registry
from tfadv.attacks.registry import register
from tfadv.ops import norms

MODES = ("dodging", "impersonation")
PIXEL_BOUNDS = (0.0, 255.0)


def cosine_similarity(a, b):
    """Row-wise cosine similarity of two [N, D] tensors: the one cosine of tfadv.

    Args:
        a, b: embeddings [N, D] (b may broadcast, e.g. [D]); any float dtype.

    Returns:
        [N] similarities in float32 (float64 when either input is float64);
        an all-zero row has similarity 0.
    """
    a = tf.convert_to_tensor(a)
    b = tf.convert_to_tensor(b)
    dtype = tf.float64 if tf.float64 in (a.dtype, b.dtype) else tf.float32
    a = tf.math.l2_normalize(tf.cast(a, dtype), axis=-1)
    b = tf.math.l2_normalize(tf.cast(b, dtype), axis=-1)
    return tf.reduce_sum(a * b, axis=-1)


def cosine_distance(embeddings, reference):
    """`1 - cos(embedding, reference)` per example: the embedding attack objective."""
    return 1.0 - cosine_similarity(embeddings, reference)


objectives_lib.register("cosine_distance", cosine_distance)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
    return mode


def attack_success(embeddings, reference, threshold, mode):
    """Per-example success of an embedding attack at the verification threshold.

    Args:
        embeddings: [N, D] embeddings of the adversarial images.
        reference: [N, D] references (own identity for dodging, target for
            impersonation).
        threshold: cosine-similarity threshold of the face system.
        mode: "dodging" (success: similarity < threshold) or "impersonation"
            (success: similarity >= threshold).

    Returns:
        bool tensor [N].

    Raises:
        ValueError: a threshold that is not a cosine similarity in [-1, 1].
    """
    sim = cosine_similarity(embeddings, reference)
    if not tf.is_tensor(threshold) or tf.executing_eagerly():
        thr = tf.constant(check_threshold(float(np.asarray(threshold))), sim.dtype)
    else:
        # In the similarity's dtype: float64 embeddings give float64 similarities.
        thr = tf.cast(threshold, sim.dtype)
        in_range = tf.reduce_all(tf.abs(thr) <= 1.0)
        with tf.control_dependencies([tf.debugging.Assert(
                in_range, ["Expected threshold to be a cosine similarity, a finite number "
                           "in [-1, 1]. Received:", thr])]):
            thr = tf.identity(thr)
    return success_at(sim, thr, mode)


def success_at(similarity, threshold, mode):
    """The success rule on similarities: dodging `similarity < threshold`,
    impersonation `similarity >= threshold` (the face system accepts a pair
    when its cosine similarity reaches the threshold).

    Works on Python floats, NumPy arrays and tensors alike.

    Raises:
        ValueError: unknown mode.
    """
    return similarity < threshold if _check_mode(mode) == "dodging" else similarity >= threshold


def _targeted(mode):
    return _check_mode(mode) == "impersonation"


def default_step_size(eps, norm="inf") -> float:
    """The default PGD step of the embedding attacks: `eps / 4` (Linf) or `eps / 5` (L2).

    Args:
        eps: budget (pixel units).
        norm: any spelling `tfadv.ops.norms.canonical_norm` accepts.

    Raises:
        ValueError: unknown norm.
    """
    return float(eps) / (4.0 if norms.canonical_norm(norm) == "inf" else 5.0)


def embedding_pgd(mode="dodging", *, eps=4.0, steps=20, step_size=None, norm="inf",
                  random_start=True, bounds=PIXEL_BOUNDS, unroll=None) -> PGD:
    """PGD on the cosine distance: dodging (ascend) or impersonation (descend).

    Args:
        mode: "dodging" or "impersonation".
        eps: budget in pixel units (0-255) for Linf, or L2 norm in pixel units.
        steps: gradient steps.
        step_size: default `default_step_size(eps, norm)`: `eps / 4` (Linf) or
            `eps / 5` (L2), so 20 steps can cross the ball several times.
        norm: any spelling `tfadv.ops.norms.canonical_norm` accepts ("inf",
            "Linf", "l_inf", "infinity", np.inf; "2", "L2", "l_2", 2).
        random_start, bounds: as `PGD`.
        unroll: as `PGD`; pass False for InceptionResNetV1-sized models.

    Returns:
        A `PGD` on the cosine distance (targeted for impersonation).

    Raises:
        ValueError: unknown mode or norm, or bad budget settings.
    """
    return embedding_attack("pgd", mode, eps=eps, steps=steps, step_size=step_size, norm=norm,
                            random_start=random_start, bounds=bounds, unroll=unroll)


def dodging_pgd(**kwargs) -> PGD:
    return embedding_pgd("dodging", **kwargs)


def impersonation_pgd(**kwargs) -> PGD:
    return embedding_pgd("impersonation", **kwargs)


def embedding_fgsm(mode="dodging", *, eps=4.0, norm="inf", bounds=PIXEL_BOUNDS) -> FGSM:
    """One signed-gradient step on the cosine distance. Without a random start
    it is blind when the reference is the clean embedding itself (zero
    gradient); use it with enrolled references."""
    return embedding_attack("fgsm", mode, eps=eps, norm=norm, bounds=bounds)


@register
class EmbeddingAPGD(APGD):
    """APGD on the cosine distance with success judged at a threshold.

    Args:
        threshold: cosine-similarity threshold; success is dodging
            (similarity < threshold) or impersonation (>= threshold, with
            `targeted=True`). Other arguments as `APGD`.
    """

    name = "embedding_apgd"

    def __init__(self, *, eps, threshold, steps=50, norm="inf", rho=0.75, alpha=0.75,
                 random_start=True, targeted=False, bounds=PIXEL_BOUNDS, eot_iter=1):
        super().__init__(eps=eps, steps=steps, norm=norm, objective="cosine_distance", rho=rho,
                         alpha=alpha, random_start=random_start, targeted=targeted, bounds=bounds,
                         eot_iter=eot_iter)
        self.threshold = check_threshold(threshold)

    def is_success(self, outputs, y):
        return attack_success(outputs, y, self.threshold,
                              "impersonation" if self.targeted else "dodging")

    def get_config(self):
        config = super().get_config()
        config.pop("objective", None)
        config.update(threshold=self.threshold)
        return config


@register
class EmbeddingCW(CarliniWagnerL2):
    """Carlini-Wagner L2 for embeddings: the smallest L2 perturbation that
    crosses the verification threshold.

    Minimises `||x' - x||^2 + c * max(m(x'), -kappa)` with the margin
    `m = cos(f(x'), ref) - threshold` (dodging) or `threshold - cos(f(x'), ref)`
    (impersonation, `targeted=True`), binary-searching `c` per example.

    Args:
        threshold: cosine-similarity threshold of the face system.
        confidence: kappa, in cosine units (e.g. 0.05 to land clearly past
            the threshold).
        Other arguments as `CarliniWagnerL2` (`bounds` default (0, 255)).
    """

    name = "embedding_cw"

    def __init__(self, *, threshold, eps=None, confidence=0.0, learning_rate=0.01,
                 max_iterations=100, binary_search_steps=5, initial_const=1.0,
                 targeted=False, bounds=PIXEL_BOUNDS):
        super().__init__(eps=eps, confidence=confidence, learning_rate=learning_rate,
                         max_iterations=max_iterations, binary_search_steps=binary_search_steps,
                         initial_const=initial_const, targeted=targeted, bounds=bounds)
        self.threshold = check_threshold(threshold)

    def prepare_target(self, y, objective):
        # The target is the reference embeddings [N, D], not class labels.
        return tf.convert_to_tensor(y)

    def _prepare_target(self, y, outputs0):
        return tf.cast(y, tf.float32)

    def _margin(self, embeddings, reference):
        sim = cosine_similarity(embeddings, reference)
        if self.targeted:
            return self.threshold - sim + self.confidence
        return sim - self.threshold + self.confidence

    def get_config(self):
        config = super().get_config()
        config.update(threshold=self.threshold)
        return config


EMBEDDING_ATTACKS = ("fgsm", "pgd", "apgd", "cw")


def embedding_attack(name, mode="dodging", *, eps=None, threshold=None, steps=20,
                     step_size=None, norm="inf", random_start=True, bounds=PIXEL_BOUNDS,
                     unroll=None, cw_iterations=100, cw_search_steps=5, cw_confidence=0.0,
                     cw_learning_rate=0.01, cw_initial_const=1.0):
    """An embedding attack by name, built through `tfadv.attacks.registry.get`.

    Args:
        name: "fgsm", "pgd", "apgd" or "cw" (`EMBEDDING_ATTACKS`).
        mode: "dodging" (untargeted: ascend the cosine distance to the own
            reference) or "impersonation" (targeted: descend it to the target's).
        eps: budget in pixel units (0-255); for "cw" an optional L2 limit.
        threshold: cosine threshold in [-1, 1] ("apgd" and "cw" judge success
            at it; the others ignore it).
        steps, step_size, norm, random_start, unroll: iterative attacks;
            `step_size` defaults to `default_step_size(eps, norm)`.
        bounds: valid pixel range.
        cw_iterations, cw_search_steps, cw_confidence, cw_learning_rate,
            cw_initial_const: "cw" (C&W L2).

    Returns:
        A `tfadv.attacks.Attack` called as `attack(model, x, reference)`.

    Raises:
        ValueError: unknown name or mode, a missing eps or threshold, bad settings.
    """
    targeted = _targeted(mode)
    if name not in EMBEDDING_ATTACKS:
        raise ValueError(f"Unknown embedding attack {name!r}. Expected one of {EMBEDDING_ATTACKS}.")
    if name in ("apgd", "cw"):
        if threshold is None:
            raise ValueError(f"The {name!r} embedding attack judges success at a threshold: "
                             f"pass threshold (a cosine similarity in [-1, 1]).")
    if name == "cw":
        return registry.get("embedding_cw", threshold=threshold, eps=eps, targeted=targeted,
                            confidence=cw_confidence, learning_rate=cw_learning_rate,
                            max_iterations=cw_iterations, binary_search_steps=cw_search_steps,
                            initial_const=cw_initial_const, bounds=bounds)
    if eps is None:
        raise ValueError(f"Expected eps (pixels) for the {name!r} embedding attack.")
    norm = norms.canonical_norm(norm)
    common = dict(eps=eps, norm=norm, targeted=targeted, bounds=bounds)
    if name == "fgsm":
        return registry.get("fgsm", objective="cosine_distance", **common)
    if name == "apgd":
        return registry.get("embedding_apgd", threshold=threshold, steps=steps,
                            random_start=random_start, **common)
    if step_size is None and isinstance(eps, (int, float)):  # PGD validates eps itself
        step_size = default_step_size(eps, norm)
    return registry.get("pgd", steps=steps, step_size=step_size, random_start=random_start,
                        objective="cosine_distance", unroll=unroll, **common)


def minimal_eps(attack: PGD, model, x, reference, threshold, mode="dodging", *,
                search_steps=8, batch_size=None):
    """Per-example smallest budget at which `attack` succeeds (RobFR's metric).

    Binary search over `eps` in `[0, attack.eps]`: each search step runs the
    attack once with a per-example budget (and step size) scaled by the
    current midpoint, then narrows each example's interval by its success.

    Args:
        attack: a PGD/FGSM configured with the largest budget to search.
        model: the embedding model.
        x: images [N, H, W, C]; reference: [N, D] embeddings.
        threshold, mode: as `attack_success`.
        search_steps: bisections (the answer is within `attack.eps / 2**steps`).
        batch_size: optional batching of x.

    Returns:
        numpy float [N]: the smallest successful eps found, `inf` where the
        attack did not succeed even at `attack.eps`, 0 where the clean input
        already succeeds.
    """
    _check_mode(mode)
    x = np.asarray(x, np.float32)
    reference = np.asarray(reference, np.float32)
    n = len(x)
    batch_size = batch_size or max(1, n)
    out = np.empty(n, np.float64)
    # One compiled attack for every bisection step (the budget is an input), cached
    # with the model: later calls with an equal attack reuse the trace.
    from tfadv.evaluation.compiled import compiled_attack  # tfadv.evaluation imports attacks

    run = compiled_attack(model, attack, with_eps=True)
    for start in range(0, n, batch_size):
        xb = tf.constant(x[start:start + batch_size])
        rb = tf.constant(reference[start:start + batch_size])
        clean_ok = attack_success(call_model(model, xb), rb, threshold, mode).numpy()
        lo = np.zeros(len(xb))
        hi = np.ones(len(xb))

        def succeeds(scale):
            x_adv = run(xb, rb, tf.constant(scale * attack.eps, tf.float32))
            return attack_success(call_model(model, x_adv), rb, threshold, mode).numpy()

        ok_max = succeeds(hi)
        for _ in range(int(search_steps)):
            mid = (lo + hi) / 2
            ok = succeeds(mid)
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        result = np.where(ok_max, hi * attack.eps, np.inf)
        out[start:start + len(xb)] = np.where(clean_ok, 0.0, result)
    return out
