"""Both trainers under MirroredStrategy and mixed_float16 when one replica overflows.

Keras 3's LossScaleOptimizer (TensorFlow backend) decides whether a step is
finite from replica 0's local gradients; when only replica 1's scaled float16
gradients overflow it would apply the all-reduced inf. The trainers make the
decision over all replicas (`tfadv.trainers.base.apply_gradients`): the step
is skipped and the loss scale halved, as on one device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def result():
    script = os.path.join(os.path.dirname(__file__), "mirrored_lso_check.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _weights(step):
    return [np.asarray(w, np.float64) for w in step["trainable"]]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_weights(a), _weights(b)))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["adversarial", "embedding"])
def test_overflow_on_one_replica_skips_the_step_on_all(result, trainer):
    assert result["replicas"] == 2
    case = result["cases"][trainer]
    mirrored, single, plain = case["mirrored"], case["single"], case["mirrored_plain_apply"]

    # The batch does what it is for: with a plain optimizer.apply the first
    # step that goes non-finite keeps the loss scale (replica 0's gradients
    # were finite) and the all-reduced inf reaches the weights.
    k = next(i for i, s in enumerate(plain) if not s["finite"])
    before = plain[k - 1]["scale"] if k else result["initial_scale"]
    assert plain[k]["scale"] == before

    # The same step in the trainers: skipped on every replica (weights kept),
    # the scale halved, as on one device.
    assert all(s["finite"] for s in mirrored), [s["scale"] for s in mirrored]
    assert [s["scale"] for s in mirrored[:k + 1]] == [s["scale"] for s in single[:k + 1]]
    assert mirrored[k]["scale"] == before / 2
    if k:
        assert _same(mirrored[k], mirrored[k - 1])

    # Training goes on once the scale is low enough; the one-example batches
    # (replica 1 empty) train too.
    scales = [s["scale"] for s in mirrored]
    last_drop = max(i for i in range(1, len(scales)) if scales[i] < scales[i - 1])
    assert scales[-1] < result["initial_scale"]
    assert last_drop < len(mirrored) - 2
    tail = mirrored[last_drop:]
    assert all(not _same(a, b) for a, b in zip(tail, tail[1:]))
