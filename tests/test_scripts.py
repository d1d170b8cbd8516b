"""The scripts users copy (training/) and run (serving/): they load, and the cheap ones run."""

import io
import json
import os
import py_compile
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from test_export import save_embedder
from tfadv.export import export_model
from tfadv.serving import ModelServer

ROOT = Path(__file__).resolve().parents[1]
TRAINING = sorted((ROOT / "training").glob("*.py"))
SERVING = sorted((ROOT / "serving").glob("*.py"))
STUDIES = sorted((ROOT / "studies").glob("*.py"))


def test_the_seed_scripts_are_there():
    names = {p.name for p in TRAINING}
    assert {"facenet_finetune.py", "generate_facenet_adversarial.py", "mnist_adversarial.py",
            "center_loss_inverse.py"} <= names
    assert [p.name for p in SERVING] == ["smoke_check.py"]


@pytest.mark.parametrize("path", TRAINING + SERVING + STUDIES,
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_loads_and_documents_its_report(path):
    """The studies behind reports/: they import without running and say how to run them."""
    script = runpy.run_path(str(path), run_name="loaded_by_test")
    assert callable(script["main"])
    assert f"python studies/{path.name}" in script["__doc__"]
    assert (ROOT / "reports" / path.stem).is_dir()


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_script_loads_with_valid_settings(path):
    """Importing runs everything above `if __name__ == "__main__"`: the imports resolve
    and the settings at the top are valid configs; nothing trains."""
    script = runpy.run_path(str(path), run_name="loaded_by_test")
    assert callable(script["main"])
    config = script["CONFIG"]
    assert type(config).__module__.startswith("tfadv.config")
    assert config.out.startswith("runs/")


def test_mnist_script_smoke_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "mnist_adversarial.py"),
                           "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "robust accuracy" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1 and metrics["config"]["limit"] == 200
    assert 0.0 <= metrics["test"]["robust_accuracy"] <= metrics["test"]["clean_accuracy"] <= 1.0
    assert (out / "model.keras").is_file() and (out / "history.json").is_file()


# ------------------------------------------------------------------ serving/smoke_check.py

NAME = "faces"


@pytest.fixture(scope="module")
def smoke_check():
    return runpy.run_path(str(ROOT / "serving" / "smoke_check.py"), run_name="loaded_by_test")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    _, path = save_embedder(str(root / "model"))
    export_model(path, str(root / "base"), name=NAME)
    with ModelServer(str(root / "base"), name=NAME, port=0, rest_port=0, poll_interval=0,
                     warmup=False) as server:
        yield server


def _run(smoke_check, server, **kwargs):
    out = io.StringIO()
    ok = smoke_check["run_checks"]("127.0.0.1", server.port, server.rest_port, out=out,
                                   **{"name": NAME, **kwargs})
    return ok, out.getvalue().splitlines()


def test_smoke_check_passes_against_a_running_server(smoke_check, server):
    ok, lines = _run(smoke_check, server)
    assert ok, lines
    assert len(lines) == 6 and all(line.startswith("ok ") for line in lines)
    assert "version 1 AVAILABLE" in lines[0]
    assert "serving_default: images: float32 [-1, 24, 20, 3] -> embeddings: float32 [-1, 8]" in (
        lines[1])
    assert "8 values, L2 norm 1.0000" in lines[2]
    assert "same as gRPC" in lines[5]
    ok, lines = _run(smoke_check, server, signature_name="embed_uint8")  # uint8 pixels
    assert ok, lines


def test_smoke_check_reports_what_fails(smoke_check, server):
    ok, lines = _run(smoke_check, server, name="nope")
    assert not ok
    assert lines[0].startswith("FAIL ") and "NOT_FOUND" in lines[0]
    assert sum(line.startswith("FAIL ") for line in lines) == len(lines)
    ok, lines = _run(smoke_check, server, signature_name="verify")  # two inputs: not an embedder
    assert not ok and lines[1].startswith("ok ") and "expected one input" in lines[2]
    assert smoke_check["main"](["--grpc-port", str(server.port), "--rest-port", "0",
                                "--name", NAME]) == 0
    assert smoke_check["main"](["--grpc-port", str(server.port), "--rest-port", "0",
                                "--name", "nope"]) == 1
