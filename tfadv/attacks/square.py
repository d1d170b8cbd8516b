"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

"Square Attack: a query-efficient black-box adversarial attack via random
search" (arXiv:1912.00049), the black-box member of AutoAttack. It only reads
the model's outputs (logits, probabilities or embeddings), never gradients,
so it also evaluates models with masked gradients and models behind an
endpoint. Each iteration redraws one random square window per example (a
fraction p of the image, p halving on a schedule) and keeps it if the loss
falls. The search is a NumPy loop, NOT traceable in a `tf.function`: `model`
may be any callable from a NumPy batch to outputs [n, C] or embeddings [n, D]
(a Keras model, called in inference mode in batches; a NumPy function; a
remote endpoint's client).

    result = Square(eps=0.1, queries=1000).run(model, x, y)  # .success, .queries
    x_adv = EmbeddingSquare(eps=8, threshold=0.4)(embedder, images, references)
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks.base import Attack, _check_number
from tfadv.attacks.embedding import MODES, PIXEL_BOUNDS, cosine_similarity, success_at
from tfadv.attacks.registry import register
from tfadv.attacks.square_windows import (corners, p_schedule, random_bumps, window_index,
                                          window_mask, window_shape)
from tfadv.config import check_threshold
from tfadv.ops.labels import sparse_labels_np

LOSSES = ("margin", "ce")
_RESAMPLE = 100  # Linf: most redraws of a window's signs that would leave it unchanged


@dataclasses.dataclass
class SquareResult:
    """What `Square.run` found, per example.

    Attributes:
        x_adv: NumPy array with the shape and dtype of x: the inputs found.
        success: bool [N]: misclassified (targeted: classified as y); for
            embeddings `success_at(similarity, threshold, mode)`.
        queries: int64 [N]: queries spent on the example; the start counts 1,
            the clean pass not (as in the paper): 0 where x already succeeds.
        loss: float64 [N]: the loss minimised, at x_adv (margin: score of y
            minus the best other; "ce": minus the cross-entropy; targeted
            negated; embeddings: the similarity, negated for impersonation).
    """

    x_adv: np.ndarray
    success: np.ndarray
    queries: np.ndarray
    loss: np.ndarray


def _require_eager(*values):
    if not tf.executing_eagerly() or any(
            isinstance(v, keras.KerasTensor) or (tf.is_tensor(v) and not hasattr(v, "numpy"))
            for v in values):
        raise TypeError(
            "Square is a NumPy random search over model queries: it cannot run inside a "
            "tf.function, a Keras train_step or on symbolic tensors. Call it eagerly with "
            "NumPy arrays or eager tensors (e.g. outside any @tf.function).")


def _to_numpy(x):
    """(x as float32 (float64 stays) NumPy array, the input's tf.DType)."""
    in_dtype = tf.as_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if not in_dtype.is_floating:
        raise ValueError(f"Expected x to be a floating array (cast images to float32 first). "
                         f"Received dtype={in_dtype.name}")
    work = np.float64 if in_dtype == tf.float64 else np.float32
    return (tf.cast(x, work).numpy() if tf.is_tensor(x) else np.asarray(x, work)), in_dtype


def _as_image(x):
    """x viewed as [N, H, W, C]: [N, H, W] gets C = 1, vectors [N, D] become [N, 1, D, 1]."""
    if not 2 <= x.ndim <= 4:
        raise ValueError(f"Square attacks images [N, H, W, C], [N, H, W] or vectors [N, D]. "
                         f"Received x of shape {x.shape}")
    return x.reshape(x.shape + (1,) * (4 - x.ndim)) if x.ndim > 2 else x[:, None, :, None]


def _forward(model, feature_shape, dtype, batch_size):
    """`f(x [n, H, W, C] view) -> outputs float64 [n, K]`, querying `model` in batches."""
    from tfadv.evaluation.compiled import compiled, in_batches  # evaluation imports attacks

    call = model
    if isinstance(model, keras.Layer):  # one trace for every batch size, inference mode
        spec = tf.TensorSpec([None, *feature_shape], dtype)

        def make(model_ref):
            return tf.function(lambda t: model_ref()(t, training=False), input_signature=[spec],
                               autograph=False)

        call = compiled(model, ("square_forward", tuple(feature_shape), spec.dtype.name), make)

    def f(x):
        out = in_batches(call, x.reshape((len(x), *feature_shape)), batch_size).astype(np.float64)
        if out.ndim != 2 or len(out) != len(x):
            raise ValueError(f"Expected the model to return one array [n, C] for n inputs. "
                             f"Received shape {out.shape} for n={len(x)}")
        return out

    return f


class _bar:
    """A tqdm bar over query iterations (`progress`: False, True or its description)."""

    def __init__(self, progress, total, done, standing):
        self.tqdm = None
        if progress:
            from tqdm.auto import tqdm

            desc = progress if isinstance(progress, str) else "square"
            self.tqdm = tqdm(total=total, desc=desc, unit="query", leave=False)
            self.update(done, standing)

    def update(self, n, standing):
        """`n` more queries per example still searched; `standing`: examples left."""
        if self.tqdm is not None:
            self.tqdm.update(n)
            self.tqdm.set_postfix(standing=int(standing), refresh=False)

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()


@register
class Square(Attack):
    """Square Attack: score-based black-box random search (Linf or L2).

    Args:
        eps: radius of the threat model, in the units of x (e.g. 0.3 for
            [0, 1] images; pixels with bounds=(0, 255)).
        norm: "inf" or "2" (spellings of `tfadv.ops.norms.canonical_norm`).
        queries: model queries per example, the start included (5000 in
            AutoAttack; 10,000 in the paper).
        p_init: initial fraction of the image a window covers (0.8: the
            paper's MNIST/CIFAR Linf setting and AutoAttack's for both norms).
        loss: "margin" (score of y minus the best other; works on logits or
            probabilities) or "ce" (cross-entropy of the softmax of logits).
        targeted: y holds target classes; the search makes them win.
        bounds: valid input range `(low, high)`, or None for no clipping.
        seed: seed of the search's `np.random.default_rng`: the same seed,
            model and inputs give the same x_adv and query counts.
        batch_size: most inputs per model query.
        resample: Linf: redraw a window's signs while they would leave it
            unchanged, so no query repeats the current input (the paper's
            code; AutoAttack and ART do not, and on MNIST up to half their
            late queries repeat it: saturated background pixels).

    Raises:
        ValueError: invalid settings.

    Example:
        >>> result = Square(eps=0.3, queries=1000).run(model, x, y)
        >>> robust_accuracy = 1 - result.success.mean()
    """

    name = "square"
    # A NumPy search over any callable: evaluators call it eagerly, never traced.
    black_box = True

    def __init__(self, *, eps, norm="inf", queries=5000, p_init=0.8, loss="margin",
                 targeted=False, bounds=(0.0, 1.0), seed=0, batch_size=1024, resample=True):
        if loss not in LOSSES:
            raise ValueError(f"Expected loss to be one of {LOSSES}. Received: loss={loss!r}")
        super().__init__(eps=eps, norm=norm, bounds=bounds, targeted=targeted, objective=loss)
        _check_number("queries", queries, minimum=1, integer=True)
        _check_number("p_init", p_init, minimum=0)
        if not 0 < p_init <= 1:
            raise ValueError(f"Expected 0 < p_init <= 1. Received: p_init={p_init!r}")
        _check_number("seed", seed, minimum=0, integer=True)
        _check_number("batch_size", batch_size, minimum=1, integer=True)
        if not isinstance(resample, bool):
            raise ValueError(f"Expected resample to be a bool. Received: resample={resample!r}")
        self.loss, self.queries, self.p_init = loss, int(queries), float(p_init)
        self.seed, self.batch_size, self.resample = int(seed), int(batch_size), resample

    # -- calling -----------------------------------------------------------
    def __call__(self, model, x, y, *, eps=None, objective=None):
        """`run(model, x, y, eps=eps, loss=objective).x_adv`, as a tensor for a tensor x.

        Raises:
            TypeError, ValueError: as `run`.
        """
        x_adv = self.run(model, x, y, eps=eps, loss=objective).x_adv
        return tf.constant(x_adv) if tf.is_tensor(x) else x_adv

    def run(self, model, x, y, *, eps=None, loss=None, progress=False) -> SquareResult:
        """Runs the search; returns x_adv with per-example success and query counts.

        Args:
            model: callable from a NumPy float batch [n, *x.shape[1:]] to
                scores [n, C] (logits or probabilities), or embeddings [n, D].
            x: float inputs [N, H, W, C], [N, H, W] or [N, D] (NumPy or eager
                tensor) inside `bounds`; float16/bfloat16 are searched in
                float32 and returned in their dtype.
            y: class labels in the label contract (`tfadv.ops.sparse_labels`):
                true labels, or targets with `targeted=True`.
            eps: budget for this call in the units of x: a number or a
                per-example [N] array; None: `self.eps`.
            loss: overrides the configured loss for this call.
            progress: False, True or a description: a progress bar over the
                query iterations, showing how many examples still stand.

        Returns:
            `SquareResult`. Every x_adv is within eps of x (Linf: max |delta|;
            L2: ||delta||_2, exact up to float32 rounding) and inside bounds.

        Raises:
            TypeError: called inside a `tf.function` or with symbolic tensors.
            ValueError: x not floating or outside bounds, labels outside the
                contract, a model output that is not [n, C], an unknown loss,
                a negative or non-finite eps.
        """
        _require_eager(x, y, eps)
        loss = self._resolve_loss(loss)
        x_np, in_dtype = _to_numpy(x)
        self.check_bounds(x_np)
        n = len(x_np)
        eps = self._per_example_eps(eps, n)
        img = _as_image(x_np)
        f = _forward(model, x_np.shape[1:], x_np.dtype, self.batch_size)
        rng = np.random.default_rng(self.seed)

        queries = np.zeros(n, np.int64)
        if n == 0:
            return SquareResult(tf.cast(x_np, in_dtype).numpy(), np.zeros(0, bool), queries,
                                np.zeros(0))
        out = f(img)
        target = self._prepare_target(y, out)
        best_loss, done = self._evaluate(out, target, loss)
        x_best = img.copy()
        todo = np.flatnonzero(~done & (eps > 0))
        if todo.size:
            start = self._start(img[todo], eps[todo], rng)
            best_loss[todo], done[todo] = self._evaluate(f(start), target[todo], loss)
            x_best[todo] = start
            queries[todo] = 1
        bar = _bar(progress, self.queries, int(todo.size > 0), np.sum(~done & (eps > 0)))
        for i in range(self.queries - 1):
            todo = np.flatnonzero(~done & (eps > 0))
            if not todo.size:
                break
            p = p_schedule(self.p_init, i, self.queries)
            propose = self._propose_linf if self.norm == "inf" else self._propose_l2
            cand = propose(img[todo], x_best[todo], eps[todo], p, rng)
            new_loss, new_done = self._evaluate(f(cand), target[todo], loss)
            queries[todo] += 1
            keep = (new_loss < best_loss[todo]) | new_done
            x_best[todo[keep]] = cand[keep]
            best_loss[todo[keep]] = new_loss[keep]
            done[todo] = new_done
            bar.update(1, np.sum(~done & (eps > 0)))
        bar.close()
        # Every candidate is within eps and bounds by construction (up to float rounding),
        # so x_adv is exactly the input the model was queried with.
        x_adv = tf.cast(x_best.reshape(x_np.shape), in_dtype).numpy()
        return SquareResult(x_adv, done, queries, best_loss)

    def _resolve_loss(self, loss):
        if loss is None:
            return self.loss
        key = {"cw": "margin", "cross_entropy": "ce"}.get(loss, loss)
        if key not in LOSSES:
            raise ValueError(f"{type(self).__name__} is a score-based search: its loss is one of "
                             f"{LOSSES}. Received: {loss!r}")
        return key

    def _per_example_eps(self, eps, n):
        e = np.asarray(self.eps if eps is None else eps, np.float64)
        if e.ndim > 1 or (e.ndim == 1 and len(e) != n) or not np.all(np.isfinite(e) & (e >= 0)):
            raise ValueError(f"Expected eps to be a finite number >= 0 or a per-example [N] "
                             f"array of them (N={n}). Received: eps={eps!r}")
        return np.broadcast_to(e, (n,)).copy()

    def perturb(self, model, x, y, objective, scale):
        raise TypeError(f"{type(self).__name__} is not a TensorFlow graph attack: call it "
                        f"eagerly, `attack(model, x, y)` or `attack.run(model, x, y)`.")

    # -- classification scores -------------------------------------------------
    def _prepare_target(self, y, outputs):
        k = outputs.shape[-1]
        labels = sparse_labels_np(y, k)
        if k < 2 or len(labels) != len(outputs) or not np.all((labels >= 0) & (labels < k)):
            raise ValueError(f"Square needs scores [N, C] with C >= 2 and one label in [0, C) per "
                             f"input. Received outputs of shape {outputs.shape} and labels "
                             f"{labels[:5]}... ({len(labels)} labels)")
        return labels

    def _evaluate(self, outputs, labels, loss):
        """(loss to minimise [n] float64, success [n] bool) from scores [n, C]."""
        rows = np.arange(len(outputs))
        own = outputs[rows, labels]
        others = outputs.copy()
        others[rows, labels] = -np.inf
        hit = np.argmax(outputs, 1) == labels
        if loss == "margin":
            value = own - others.max(1)
        else:  # minus the cross-entropy: log-softmax of y
            top = outputs.max(1)
            value = own - top - np.log(np.sum(np.exp(outputs - top[:, None]), 1))
        return (-value, hit) if self.targeted else (value, ~hit)

    # -- geometry ------------------------------------------------------------
    def _clip(self, x):
        return x if self.bounds is None else np.clip(x, *self.bounds)

    def _at_radius(self, x, delta, eps):
        """x + delta rescaled to ||delta||_2 = eps, clipped to bounds, in x's dtype."""
        size = np.sqrt(np.sum(delta ** 2, (1, 2, 3), keepdims=True))
        return self._clip(x + delta * eps.reshape(-1, 1, 1, 1) / np.maximum(size, 1e-30)).astype(
            x.dtype)

    def _start(self, x, eps, rng):
        n, h, w, c = x.shape
        e = eps.reshape(-1, 1, 1, 1)
        if self.norm == "inf":  # vertical stripes: one sign per column and channel
            return self._clip(x + e * rng.choice([-1.0, 1.0], size=(n, 1, w, c))).astype(x.dtype)
        # L2: a centred grid of tiles of side min(H, W) // 5 (vectors: segments of D // 5),
        # each a bump pair with a random sign per example and channel.
        if min(h, w) > 1:
            th = tw = max(min(h, w) // 5, 1)
        else:
            th, tw = (1, max(w // 5, 1)) if h == 1 else (max(h // 5, 1), 1)
        delta = np.zeros(x.shape)
        for r in range((h % th) // 2, h - th + 1, th):
            for col in range((w % tw) // 2, w - tw + 1, tw):
                delta[:, r:r + th, col:col + tw] += random_bumps(n, th, tw, rng) * rng.choice(
                    [-1.0, 1.0], size=(n, 1, 1, c))
        return self._at_radius(x, delta, eps)

    def _propose_linf(self, x, x_best, eps, p, rng):
        """Sets one window per example to x +- eps (a sign per channel), clipped to bounds."""
        n, h, w, c = x.shape
        sh, sw = window_shape(h, w, p, False)
        at = window_index(*corners(n, h, w, sh, sw, rng), sh, sw)
        e = eps.reshape(-1, 1, 1, 1)
        win, best = x[at], x_best[at]  # [n, sh, sw, c]
        up, down = self._clip(win + e).astype(x.dtype), self._clip(win - e).astype(x.dtype)
        signs = rng.choice([-1.0, 1.0], size=(n, 1, 1, c))
        if self.resample:  # [n, c]: setting the channel up (down) changes nothing
            keeps_up = np.all(np.abs(up - best) < 1e-7, (1, 2))
            keeps_down = np.all(np.abs(down - best) < 1e-7, (1, 2))
            for _ in range(_RESAMPLE):
                same = np.all(np.where(signs[:, 0, 0] > 0, keeps_up, keeps_down), 1)
                if not same.any():
                    break
                signs[same] = rng.choice([-1.0, 1.0], size=(int(same.sum()), 1, 1, c))
        cand = x_best.copy()
        cand[at] = np.where(signs > 0, up, down)
        return cand

    def _propose_l2(self, x, x_best, eps, p, rng):
        """Moves the mass of windows W1 and W2 into a new bump pair on W1; ||delta||_2 stays eps.

        Per channel, W1 gets `bump + delta_W1 / ||delta_W1||` rescaled to the norm
        `sqrt(slack / C + ||delta_{W1 u W2}||^2)` and W2 (outside W1) is zeroed,
        so the channel's energy grows by slack / C, with slack = eps^2 - ||delta||^2.
        """
        n, h, w, c = x.shape
        sh, sw = window_shape(h, w, p, True)
        r1, c1 = corners(n, h, w, sh, sw, rng)
        r2, c2 = corners(n, h, w, sh, sw, rng)
        delta = (x_best - x).astype(np.float64)
        at = window_index(r1, c1, sh, sw)
        win = delta[at]  # [n, sh, sw, c]
        union = window_mask(h, w, r1, c1, sh, sw) | window_mask(h, w, r2, c2, sh, sw)
        union_norm = np.sqrt(np.sum((delta * union) ** 2, (1, 2)))  # [n, c]
        slack = np.maximum(eps ** 2 - np.sum(delta ** 2, (1, 2, 3)), 0.0)  # [n]
        new = random_bumps(n, sh, sw, rng) * rng.choice([-1.0, 1.0], size=(n, 1, 1, c))
        new += win / np.maximum(np.sqrt(np.sum(win ** 2, (1, 2), keepdims=True)), 1e-12)
        scale = np.sqrt(slack[:, None] / c + union_norm ** 2)[:, None, None, :]
        new *= scale / np.maximum(np.sqrt(np.sum(new ** 2, (1, 2), keepdims=True)), 1e-12)
        delta[window_mask(h, w, r2, c2, sh, sw)[..., 0]] = 0.0
        delta[at] = new
        return self._at_radius(x, delta, eps)

    # -- config ------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.pop("objective", None)
        config.update(queries=self.queries, p_init=self.p_init, loss=self.loss, seed=self.seed,
                      batch_size=self.batch_size, resample=self.resample)
        return config


def cosine_similarity_np(a, b):
    """Row-wise cosine of [N, D] arrays as float64 NumPy: the one cosine,
    `tfadv.attacks.embedding.cosine_similarity`, run in float64."""
    return cosine_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64)).numpy()


@register
class EmbeddingSquare(Square):
    """Square Attack on an embedding model: dodging or impersonation at a cosine threshold.

    The search minimises the cosine similarity to the reference (dodging:
    until `similarity < threshold`) or maximises it (impersonation: until
    `similarity >= threshold`), the success rule of
    `tfadv.attacks.embedding.success_at`. Call it with the reference
    embeddings as y: `attack(embedder, images, reference [N, D])`.

    Args:
        eps: budget in the units of x (pixels with the default bounds (0, 255)).
        threshold: cosine-similarity threshold of the face system, in [-1, 1].
        mode: "dodging" or "impersonation".
        norm, queries, p_init, seed, batch_size, resample: as `Square`.
        bounds: valid pixel range (default (0, 255)).

    Raises:
        ValueError: unknown mode, a threshold outside [-1, 1], invalid settings.
    """

    name = "embedding_square"

    def __init__(self, *, eps, threshold, mode="dodging", norm="inf", queries=5000, p_init=0.8,
                 bounds=PIXEL_BOUNDS, seed=0, batch_size=1024, resample=True):
        if mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
        super().__init__(eps=eps, norm=norm, queries=queries, p_init=p_init,
                         targeted=mode == "impersonation", bounds=bounds, seed=seed,
                         batch_size=batch_size, resample=resample)
        self.objective = "cosine_distance"
        self.loss = "cosine"
        self.threshold = check_threshold(threshold)
        self.mode = mode

    def _resolve_loss(self, loss):
        if loss not in (None, "cosine", "cosine_distance"):
            raise ValueError(f"EmbeddingSquare searches on the cosine similarity to the "
                             f"reference. Received: objective={loss!r}")
        return "cosine"

    def _prepare_target(self, y, outputs):
        ref = np.asarray(y, np.float64)
        if ref.shape != outputs.shape:
            raise ValueError(f"Expected reference embeddings y of shape {outputs.shape} (one per "
                             f"input, like the model's outputs). Received shape {ref.shape}")
        return ref

    def _evaluate(self, outputs, reference, loss):
        sim = cosine_similarity_np(outputs, reference)
        hit = np.asarray(success_at(sim, self.threshold, self.mode), bool)
        return (sim if self.mode == "dodging" else -sim), hit

    def get_config(self):
        config = super().get_config()
        for key in ("targeted", "loss"):
            config.pop(key)
        config.update(threshold=self.threshold, mode=self.mode)
        return config
