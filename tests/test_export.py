"""Export to TF Serving's layout: signatures, values, files, version safety."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv.export import (BatchingParameters, contract as C, export_model, list_versions,
                          read_threshold, read_warmup_requests)
from tfadv.serving.config import parse_model_config

SIZE = (24, 20)  # H != W catches a swapped height and width
DIM = 8
THRESHOLD = 0.3


def tiny_embedder(size=SIZE, dim=DIM, seed=0):
    """Rescaling -> conv -> pooling -> dense -> unit norm: the embedder contract in miniature."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*size, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    h = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(dim)(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


def save_embedder(directory, threshold=THRESHOLD, **kwargs):
    os.makedirs(directory, exist_ok=True)
    model = tiny_embedder(**kwargs)
    path = os.path.join(directory, "embedder.keras")
    model.save(path)
    with open(os.path.join(directory, C.THRESHOLD_FILE), "w") as f:
        json.dump({C.THRESHOLD_KEY: threshold, "far": 0.001}, f)
    return model, path


def export_embedder(root, name, **kwargs):
    """A tiny embedder saved in ROOT/model and exported to ROOT/base: (model, path, base)."""
    model, path = save_embedder(os.path.join(root, "model"), **kwargs)
    base = os.path.join(root, "base")
    export_model(path, base, name=name)
    return model, path, base


def pixels(n, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype("float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, path = save_embedder(str(root / "model"))
    base = str(root / "base")
    version_dir = export_model(path, base, name="faces")
    return model, path, base, version_dir


def test_signatures_match_the_contract(exported):
    _, _, _, version_dir = exported
    loaded = tf.saved_model.load(version_dir)
    sigs = loaded.signatures
    assert set(sigs) == {C.SERVING_SIGNATURE, C.EMBED_UINT8_SIGNATURE, C.VERIFY_SIGNATURE}
    h, w = SIZE
    _, kwargs = sigs[C.SERVING_SIGNATURE].structured_input_signature
    assert list(kwargs) == [C.IMAGES]
    assert kwargs[C.IMAGES].dtype == tf.float32
    assert kwargs[C.IMAGES].shape.as_list() == [None, h, w, 3]
    _, kwargs = sigs[C.EMBED_UINT8_SIGNATURE].structured_input_signature
    assert kwargs[C.IMAGES].dtype == tf.uint8
    _, kwargs = sigs[C.VERIFY_SIGNATURE].structured_input_signature
    assert set(kwargs) == {C.IMAGES_A, C.IMAGES_B}
    assert set(sigs[C.SERVING_SIGNATURE].structured_outputs) == {C.EMBEDDINGS}
    outs = sigs[C.VERIFY_SIGNATURE].structured_outputs
    assert set(outs) == {C.SIMILARITY, C.SAME_PERSON}
    assert outs[C.SAME_PERSON].dtype == tf.bool


def test_exported_values_equal_the_model(exported):
    model, _, _, version_dir = exported
    sigs = tf.saved_model.load(version_dir).signatures
    x = pixels(5)
    expected = model(x).numpy()
    emb = sigs[C.SERVING_SIGNATURE](images=tf.constant(x))[C.EMBEDDINGS].numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    x8 = x.astype(np.uint8)
    emb8 = sigs[C.EMBED_UINT8_SIGNATURE](images=tf.constant(x8))[C.EMBEDDINGS].numpy()
    np.testing.assert_allclose(emb8, model(x8.astype("float32")).numpy(), atol=1e-5)
    b = pixels(5, seed=1)
    out = sigs[C.VERIFY_SIGNATURE](images_a=tf.constant(x), images_b=tf.constant(b))
    sim = np.sum(expected * model(b).numpy(), axis=1)
    np.testing.assert_allclose(out[C.SIMILARITY].numpy(), sim, atol=1e-5)
    np.testing.assert_array_equal(out[C.SAME_PERSON].numpy(),
                                  out[C.SIMILARITY].numpy() >= THRESHOLD)


def test_layout_and_side_files(exported):
    _, _, base, version_dir = exported
    assert version_dir == os.path.join(base, "1")
    assert sorted(os.listdir(base)) == ["1", "README.md", C.BATCHING_PARAMETERS_FILE,
                                        C.MODELS_CONFIG_FILE, C.MONITORING_CONFIG_FILE]
    from tfadv.serving.metrics import DEFAULT_PATH, read_monitoring_config

    assert read_monitoring_config(os.path.join(base, C.MONITORING_CONFIG_FILE)) == DEFAULT_PATH
    assert os.path.isfile(os.path.join(version_dir, C.SAVED_MODEL_FILE))
    extra = os.path.join(version_dir, C.ASSETS_EXTRA)
    assert read_threshold(os.path.join(extra, C.THRESHOLD_FILE)) == pytest.approx(THRESHOLD)
    with open(os.path.join(base, C.MODELS_CONFIG_FILE)) as f:
        (config,) = parse_model_config(f.read())
    assert (config.name, config.base_path, config.policy) == ("faces", "/models/faces", "latest")
    params = BatchingParameters.read(os.path.join(base, C.BATCHING_PARAMETERS_FILE))
    assert params == BatchingParameters.with_padding(32)
    assert params.allowed_batch_sizes == (1, 2, 4, 8, 16, 32)
    readme = open(os.path.join(base, "README.md")).read()
    assert "docker run" in readme and "-e MODEL_NAME=faces" in readme
    assert f"source={os.path.abspath(base)},target=/models/faces" in readme
    assert "--batching_parameters_file=/models/faces/batching_parameters.txt" in readme
    assert "--enable_model_warmup" in readme
    assert "--monitoring_config_file=/models/faces/monitoring.config" in readme


def test_warmup_file_parses_as_prediction_logs(exported):
    _, _, _, version_dir = exported
    logs = read_warmup_requests(os.path.join(version_dir, C.ASSETS_EXTRA, C.WARMUP_FILE))
    assert len(logs) == 3
    seen = set()
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == "faces"
        seen.add(request.model_spec.signature_name)
        for proto in request.inputs.values():
            array = tf.make_ndarray(proto)
            assert array.shape == (1, *SIZE, 3)
    assert seen == {C.SERVING_SIGNATURE, C.EMBED_UINT8_SIGNATURE, C.VERIFY_SIGNATURE}


def test_versions_are_never_overwritten(tmp_path):
    model = tiny_embedder()
    base = str(tmp_path / "base")
    assert export_model(model, base, threshold=0.5) == os.path.join(base, "1")
    pb = os.path.join(base, "1", C.SAVED_MODEL_FILE)
    before = open(pb, "rb").read()
    with pytest.raises(ValueError, match="Version 1 already exists.*never overwritten"):
        export_model(tiny_embedder(seed=1), base, threshold=0.5, version=1)
    assert open(pb, "rb").read() == before
    assert export_model(model, base, threshold=0.5, version=5).endswith(os.sep + "5")
    assert export_model(model, base, threshold=0.5).endswith(os.sep + "6")
    assert list_versions(base) == [1, 5, 6]
    assert not [e for e in os.listdir(base) if e.startswith(".")]  # no temporary left over


def test_a_version_is_never_visible_half_written(tmp_path, monkeypatch):
    from tfadv.export import saved_model

    base = str(tmp_path / "base")
    seen = []
    real = saved_model.warmup_requests

    def spy(*args, **kwargs):  # runs after the SavedModel is written, before the rename
        hidden = [e for e in os.listdir(base) if e.startswith(".")]
        seen.append((hidden, list_versions(base)))
        return real(*args, **kwargs)

    monkeypatch.setattr(saved_model, "warmup_requests", spy)
    export_model(tiny_embedder(), base, threshold=0.5)
    (hidden, versions), = seen
    assert len(hidden) == 1 and versions == []  # written under a hidden name
    assert os.path.isfile(os.path.join(base, "1", C.ASSETS_EXTRA, C.WARMUP_FILE))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saved_model, "warmup_requests", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(tiny_embedder(), base, threshold=0.5)
    assert list_versions(base) == [1]
    assert not [e for e in os.listdir(base) if e.startswith(".")]


def test_export_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        export_model(str(tmp_path / "missing.keras"), str(tmp_path / "b"))
    model = tiny_embedder()
    model.save(str(tmp_path / "m.keras"))
    with pytest.raises(FileNotFoundError, match="cosine_threshold"):
        export_model(str(tmp_path / "m.keras"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="Pass threshold="):
        export_model(model, str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        export_model(model, str(tmp_path / "b"), threshold=2.0)
    with pytest.raises(ValueError, match="version to be an integer >= 1"):
        export_model(model, str(tmp_path / "b"), threshold=0.5, version=0)
    inputs = keras.Input((None, None, 3))
    flexible = keras.Model(inputs, keras.layers.Dense(4)(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    with pytest.raises(ValueError, match=r"\(None, H, W, 3\) with H and W fixed"):
        export_model(flexible, str(tmp_path / "b"), threshold=0.5)
    (tmp_path / "threshold.json").write_text('{"eer": 0.1}')
    with pytest.raises(ValueError, match="cosine_threshold"):
        read_threshold(str(tmp_path / "m.keras"))
    assert list_versions(str(tmp_path / "b")) == []


def test_batching_parameters_text_round_trip():
    params = BatchingParameters(max_batch_size=16, batch_timeout_micros=500, num_batch_threads=3,
                                max_enqueued_batches=7)
    assert BatchingParameters.from_text(params.to_text()) == params
    padded = BatchingParameters.with_padding(24)
    assert padded.allowed_batch_sizes == (1, 2, 4, 8, 16, 24)
    assert BatchingParameters.from_text(padded.to_text()) == padded
    assert [padded.padded_size(n) for n in (1, 3, 9, 17, 24)] == [1, 4, 16, 24, 24]
    with pytest.raises(ValueError, match="ending with max_batch_size=8"):
        BatchingParameters(max_batch_size=8, allowed_batch_sizes=(2, 4))
    tf_serving_style = ("# comment\nmax_batch_size { value: 64 }\nallowed_batch_sizes: 32\n"
                        "allowed_batch_sizes: 64\npad_variable_length_inputs: true\n")
    parsed = BatchingParameters.from_text(tf_serving_style)
    assert parsed.max_batch_size == 64 and parsed.allowed_batch_sizes == (32, 64)
    with pytest.raises(ValueError, match="Could not parse"):
        BatchingParameters.from_text("max_batch_sise { value: 3 }")
    with pytest.raises(ValueError, match="max_batch_size to be an integer >= 1"):
        BatchingParameters(max_batch_size=0)


def test_batching_parameters_match_text_format():
    from google.protobuf import text_format
    from tfadv.export.batching import BatchingParametersProto

    assert BatchingParametersProto.DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    params = BatchingParameters.with_padding(16, batch_timeout_micros=0, max_enqueued_batches=3)
    proto = text_format.Parse(params.to_text(), BatchingParametersProto())
    assert proto.max_batch_size.value == 16 and proto.batch_timeout_micros.value == 0
    assert proto.HasField("batch_timeout_micros")  # written even at zero
    assert list(proto.allowed_batch_sizes) == [1, 2, 4, 8, 16]
    assert params.to_text() == text_format.MessageToString(params.to_proto())
    assert BatchingParameters.from_proto(proto) == params
    one_line = text_format.MessageToString(params.to_proto(), as_one_line=True)
    assert BatchingParameters.from_text(one_line) == params
    assert BatchingParameters.from_text("") == BatchingParameters()
    for bad in ("max_batch_size: 3", "max_batch_size { value: x }", "allowed_batch_sizes: 1.5"):
        with pytest.raises(ValueError, match="Could not parse"):
            BatchingParameters.from_text(bad)
    with pytest.raises(ValueError, match="max_enqueued_batches to be an integer >= 1"):
        BatchingParameters.from_text("max_enqueued_batches { value: -1 }")


def test_docker_compose_reads_the_files_export_writes(exported):
    """One source of truth: serving/ holds no copies of the deploy files; the compose
    file mounts the exported directory and reads them from where `export_model` put them."""
    _, _, base, _ = exported
    serving = os.path.join(os.path.dirname(__file__), "..", "serving")
    assert not {C.MODELS_CONFIG_FILE, C.BATCHING_PARAMETERS_FILE} & set(os.listdir(serving))
    compose = open(os.path.join(serving, "docker-compose.yml")).read()
    mount = f"{C.CONTAINER_MODELS_ROOT}/${{MODEL_NAME:-{C.DEFAULT_MODEL_NAME}}}"
    assert f"${{MODEL_BASE_DIR:-../exported/{C.DEFAULT_MODEL_NAME}}}:{mount}:ro" in compose
    assert f"--model_config_file={mount}/{C.MODELS_CONFIG_FILE}" in compose
    assert f"--batching_parameters_file={mount}/{C.BATCHING_PARAMETERS_FILE}" in compose
    # What the container finds there: a config whose base path is the mount point.
    (config,) = parse_model_config(open(os.path.join(base, C.MODELS_CONFIG_FILE)).read())
    assert config.base_path == f"{C.CONTAINER_MODELS_ROOT}/{config.name}"


def test_cli_export(tmp_path, capsys):
    from tfadv.cli import main

    _, path = save_embedder(str(tmp_path / "m"))
    base = str(tmp_path / "base")
    assert main(["export", path, "--out", base, "--name", "faces"]) == 0
    assert f"wrote {os.path.join(base, '1')}" in capsys.readouterr().out
    assert main(["export", path, "--out", base, "--name", "faces", "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list_versions(base) == [1]


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures(exported):
    _, _, _, version_dir = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this Python")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([cli, "show", "--dir", version_dir, "--all"], capture_output=True,
                         text=True, env=env, timeout=300, check=True).stdout
    for name in (C.SERVING_SIGNATURE, C.EMBED_UINT8_SIGNATURE, C.VERIFY_SIGNATURE):
        assert f"signature_def['{name}']" in out
    for key in (C.IMAGES, C.IMAGES_A, C.IMAGES_B, C.EMBEDDINGS, C.SIMILARITY, C.SAME_PERSON):
        assert f"['{key}'] tensor_info" in out
