"""Both trainers under MirroredStrategy when one replica gets no examples."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_empty_replica_contributes_nothing_and_keeps_the_loss_finite():
    """9 examples, global batch 4, 2 replicas: the last batch leaves one replica empty.

    Every trainer and loss term (TRADES KL, center loss on clean/both and with
    inverse-adversary centres, the embedding trainer's CE, consistency,
    center and distillation terms) stays finite, and the short batch's step is
    Keras' convention (each replica's mean, divided by the replicas): the
    single-device step at half the learning rate.
    """
    script = os.path.join(os.path.dirname(__file__), "mirrored_check.py")
    out = subprocess.run([sys.executable, script, "empty"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert len(result["cases"]) == 8
    for name, case in result["cases"].items():
        assert case["epochs"] == 2 and case["finite"], (name, case)  # TerminateOnNaN never fired
        if "max_diff" in case:
            assert case["max_diff"] < 1e-5, (name, case)
