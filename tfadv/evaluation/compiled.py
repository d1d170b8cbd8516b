"""Compiled functions cached per model: traced once, reused, freed with the model.

Tracing a `tf.function` through an attack costs from a second (small CNNs)
to minutes (InceptionResNetV1 with unrolled steps), and every trace adds a
graph that lives as long as the function object. Evaluation loops build
many attack objects with equal configurations (one per call, per curve
point, per restart); `compiled` gives them all the same function, so the
model is traced once per distinct key.

The cache is a `weakref.WeakKeyDictionary` keyed by the model: an entry
goes away when the model does. The function is built by `make(model_ref)`,
where `model_ref()` returns the model; closing over `model_ref` instead of
the model keeps the cached function from holding the model alive (a traced
graph captures the model's variables, not the model).

Example:
    >>> def make(model_ref):
    ...     def run(x, ref):
    ...         return attack(model_ref(), x, ref)
    ...     return tf.function(run, reduce_retracing=True, autograph=False)
    >>> fn = compiled(model, ("attack", attack), make)
    >>> x_adv = fn(x, ref)
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import numpy as np
import tensorflow as tf

_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _strong_ref(model):
    return lambda: model


def compiled(model, key: Hashable, make: Callable[[Callable[[], Any]], Callable]):
    """The function `make` builds for `(model, key)`, built on the first call only.

    Args:
        model: the model the function runs (any object; a Keras model in
            practice). Held weakly: the cache never keeps it alive.
        key: hashable; everything besides the model that changes the trace
            (the attack itself, which compares and hashes by its config, plus
            e.g. a tag for the kind of function or a feature-layer name).
            Equal keys share one function.
        make: `make(model_ref) -> fn`; `model_ref()` returns the model (and
            raises ReferenceError once it is freed). `fn` should reach the
            model through `model_ref` only, not close over it.

    Returns:
        The cached `fn`. When the model cannot be weakly referenced (or
        hashed), `make` is called every time and nothing is cached.

    Raises:
        ValueError: `key` is not hashable.
    """
    try:
        hash(key)
    except TypeError:
        raise ValueError(
            f"Expected a hashable key (e.g. a tuple of the attack and strings). "
            f"Received: key={key!r}") from None
    try:
        ref = weakref.ref(model)
        per_model = _CACHE.get(model)
    except TypeError:  # not weak-referenceable or not hashable: no caching
        return make(_strong_ref(model))
    if per_model is None:
        per_model = _CACHE[model] = {}
    fn = per_model.get(key)
    if fn is None:
        def model_ref():
            target = ref()
            if target is None:
                raise ReferenceError("The model of this compiled function has been freed.")
            return target

        fn = per_model[key] = make(model_ref)
    return fn


def cached_keys(model) -> list:
    """The keys with a compiled function for `model` (empty when none or not cacheable)."""
    try:
        return list(_CACHE.get(model, {}))
    except TypeError:
        return []


def clear(model=None) -> None:
    """Drops the compiled functions of `model`, or of every model when None."""
    if model is None:
        _CACHE.clear()
        return
    try:
        _CACHE.pop(model, None)
    except TypeError:
        pass


def compiled_attack(model, attack, *, with_eps: bool = False):
    """`attack` on `model` as one `tf.function`, shared by every equal attack.

    Args:
        model: the model attacked (held weakly, see `compiled`).
        attack: a `tfadv.attacks.Attack`; attacks with equal configs share
            the function (and its trace).
        with_eps: add a third argument, the budget `eps` of the call (a
            scalar or a per-example [N] tensor, see `Attack.__call__`): one
            trace then serves every budget.

    Returns:
        `fn(x, y) -> x_adv` or, with `with_eps=True`, `fn(x, y, eps)`;
        x float [N, ...] tensors, y the attack's targets (labels [N] or
        reference embeddings [N, D]). Shapes may vary between calls
        (`reduce_retracing=True`).

    Raises:
        ValueError: the attack is not hashable.
    """
    def make(model_ref):
        # Attacks loop with tf.while_loop or Python-level config only: no AutoGraph needed.
        if with_eps:
            def run(x, y, eps):
                return attack(model_ref(), x, y, eps=eps)
        else:
            def run(x, y):
                return attack(model_ref(), x, y)
        return tf.function(run, reduce_retracing=True, autograph=False)

    return compiled(model, ("attack", attack, bool(with_eps)), make)


def in_batches(fn, x, batch_size: int) -> np.ndarray:
    """`fn` over consecutive batches of `x`, results concatenated: the one batching loop.

    Args:
        fn: maps a batch `x[i:i + batch_size]` to an array or tensor whose
            first axis is the batch.
        x: NumPy array [N, ...] (N may be 0: `fn` then sees one empty batch,
            so the result keeps its trailing shape).
        batch_size: rows per call (>= 1).

    Returns:
        NumPy array [N, ...].

    Raises:
        ValueError: batch_size < 1.
    """
    if int(batch_size) < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    starts = range(0, len(x), int(batch_size)) if len(x) else [0]
    return np.concatenate([np.asarray(fn(x[i:i + int(batch_size)])) for i in starts])


def tracing_count(model) -> int:
    """Traces made so far by all of `model`'s cached `tf.function`s (for tests and benches)."""
    try:
        fns = list(_CACHE.get(model, {}).values())
    except TypeError:
        return 0
    return sum(int(f.experimental_get_tracing_count()) for f in fns
               if hasattr(f, "experimental_get_tracing_count"))
