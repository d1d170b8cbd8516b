"""The per-model cache of compiled functions: shared by equal keys, freed with the model."""

import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import tiny_embedder
from tfadv.attacks import embedding as E
from tfadv.evaluation import compiled as C


def _pixels(n, size=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_same_key_same_function_and_make_called_once():
    model = tiny_embedder()
    calls = []

    def make(model_ref):
        calls.append(model_ref)
        return lambda x: model_ref()(x)

    a = E.embedding_pgd("dodging", eps=4.0, steps=2)
    f1 = C.compiled(model, ("attack", a), make)
    assert calls[0]() is model
    f2 = C.compiled(model, ("attack", E.embedding_pgd("dodging", eps=4.0, steps=2)), make)
    assert f1 is f2 and len(calls) == 1
    f3 = C.compiled(model, ("attack", E.embedding_pgd("dodging", eps=2.0, steps=2)), make)
    assert f3 is not f1 and len(calls) == 2
    # Another model with an equal key gets its own function.
    other = tiny_embedder(seed=4)
    assert C.compiled(other, ("attack", a), make) is not f1 and len(calls) == 3
    assert calls[2]() is other
    assert set(C.cached_keys(model)) == {("attack", a),
                                         ("attack", E.embedding_pgd("dodging", eps=2.0,
                                                                    steps=2))}


def test_fifty_fresh_equal_attacks_trace_once():
    model = tiny_embedder()
    x = _pixels(3)
    ref = model(x).numpy()
    outs = []
    for _ in range(50):
        attack = E.embedding_pgd("dodging", eps=4.0, steps=2, random_start=False)
        fn = C.compiled_attack(model, attack)
        outs.append(fn(tf.constant(x), tf.constant(ref)).numpy())
    assert fn.experimental_get_tracing_count() == 1
    assert C.tracing_count(model) == 1 and len(C.cached_keys(model)) == 1
    np.testing.assert_array_equal(outs[0], outs[-1])  # deterministic without random start
    # The compiled attack computes what the eager one does.
    eager = E.embedding_pgd("dodging", eps=4.0, steps=2, random_start=False)(model, x, ref)
    np.testing.assert_allclose(outs[0], eager.numpy(), atol=1e-4)


def test_per_call_eps_is_the_attack_at_that_budget():
    model = tiny_embedder()
    x = _pixels(4, seed=1)
    ref = model(_pixels(4, seed=2)).numpy()
    largest = E.embedding_pgd("impersonation", eps=8.0, steps=3, random_start=False)
    fn = C.compiled_attack(model, largest, with_eps=True)
    for eps in (2.0, 4.0, 8.0):
        got = fn(tf.constant(x), tf.constant(ref), tf.fill([4], eps)).numpy()
        want = E.embedding_pgd("impersonation", eps=eps, steps=3, random_start=False)(
            model, x, ref).numpy()
        np.testing.assert_allclose(got, want, atol=1e-3)
    assert fn.experimental_get_tracing_count() == 1


def test_deleted_model_is_freed_with_its_functions():
    model = tiny_embedder()
    x = _pixels(2)
    fn = C.compiled_attack(model, E.embedding_pgd("dodging", eps=4.0, steps=2))
    fn(tf.constant(x), tf.constant(model(x).numpy()))
    alive = weakref.ref(model)
    alive_fn = weakref.ref(fn)
    del model, fn
    gc.collect()
    assert alive() is None
    assert alive_fn() is None  # the entry went with the model


def test_not_weak_referenceable_model_is_not_cached():
    class Slotted:
        __slots__ = ("scale",)

        def __init__(self):
            self.scale = 2.0

        def __call__(self, x):
            return x * self.scale

    model = Slotted()
    with pytest.raises(TypeError):
        weakref.ref(model)
    calls = []

    def make(model_ref):
        calls.append(1)
        return lambda x: model_ref()(x)

    f1 = C.compiled(model, "double", make)
    f2 = C.compiled(model, "double", make)
    assert len(calls) == 2 and f1(3.0) == f2(3.0) == 6.0
    assert C.cached_keys(model) == []


def test_unhashable_key_is_a_value_error():
    with pytest.raises(ValueError, match="hashable key"):
        C.compiled(tiny_embedder(), ["attack"], lambda ref: None)


def test_minimal_eps_keeps_one_trace_across_calls():
    model = tiny_embedder()
    x = _pixels(3, seed=3)
    ref = model(_pixels(3, seed=4)).numpy()
    for _ in range(3):
        attack = E.embedding_pgd("impersonation", eps=16.0, steps=2, random_start=False)
        E.minimal_eps(attack, model, x, ref, 0.9, "impersonation", search_steps=2)
    assert len(C.cached_keys(model)) == 1
    first = C.tracing_count(model)
    E.minimal_eps(E.embedding_pgd("impersonation", eps=16.0, steps=2, random_start=False),
                  model, x, ref, 0.9, "impersonation", search_steps=2)
    assert first <= 2 and C.tracing_count(model) == first


def test_generate_reuses_the_traces_of_an_earlier_run(tmp_path):
    from tfadv.recipes import facenet_generate as G

    model = tiny_embedder()
    rng = np.random.default_rng(0)
    for person in ("ann", "bob"):
        base = rng.uniform(0, 255, (16, 16, 3))
        (tmp_path / "faces" / person).mkdir(parents=True)
        for k in range(2):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "faces" / person / f"{k}.png")
    kwargs = dict(attacks=("pgd", "fgsm"), eps_list=(2, 4), steps=2, detector="none",
                  threshold=0.5)
    G.generate(model, tmp_path / "faces", tmp_path / "a", **kwargs)
    keys, traces = set(C.cached_keys(model)), C.tracing_count(model)
    # One function per attack and mode, shared by both budgets.
    assert len(keys) == 2 * 2
    G.generate(model, tmp_path / "faces", tmp_path / "b", **kwargs)
    assert set(C.cached_keys(model)) == keys and C.tracing_count(model) == traces


def test_in_batches_is_one_call_on_everything():
    x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    seen = []

    def fn(xb):
        seen.append(len(xb))
        return xb * 2

    np.testing.assert_array_equal(C.in_batches(fn, x, 5), x * 2)
    assert seen == [5, 5, 5, 5, 3]
    assert C.in_batches(fn, x[:0], 5).shape == (0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        C.in_batches(fn, x, 0)
