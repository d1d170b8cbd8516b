import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tfadv.demo", "--quick", "--epochs", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert set(summary["models"]) == {"standard", "pgd"}
    for m in summary["models"].values():
        assert 0 <= m["robust_accuracy"] <= min(m["per_attack"].values()) <= m["clean_accuracy"]
        assert m["curve"]["eps"][0] == 0.0
    assert open(summary["curve_png"], "rb").read(4) == b"\x89PNG"
    assert "robust" in out.stdout and "robustness curves" in out.stdout
