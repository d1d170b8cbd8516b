"""The model server over gRPC and REST, the client, hot reload, load and shutdown."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from conftest import rest_json
from test_export import SIZE, THRESHOLD, export_embedder, pixels, tiny_embedder
from tfadv.export import BatchingParameters, contract as C, export_model
from tfadv.serving import Client, ModelServer
from tfadv.serving.batcher import Batcher
from tfadv.serving.config import parse_model_config
from tfadv.serving.errors import ServingError
from tfadv.serving.tensors import to_numpy, to_tensor_proto

MAX_BATCH = 8
NAME = "faces"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    model, _, base = export_embedder(root, NAME)
    batching = BatchingParameters.with_padding(MAX_BATCH, batch_timeout_micros=2000)
    with ModelServer(base, name=NAME, port=0, rest_port=0, batching=batching,
                     poll_interval=0.2) as server:
        yield model, server, base


@pytest.fixture(scope="module")
def stubs(served):
    _, server, _ = served
    channel = grpc.insecure_channel(server.grpc_target)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


def predict_request(inputs, signature=C.SERVING_SIGNATURE, name=NAME, version=None,
                    label=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def rest(server, path, payload=None):
    """(HTTP status, decoded JSON body)."""
    return rest_json(server, path, payload)


# ------------------------------------------------------------------ end to end


def test_client_embed_and_verify_equal_the_model(served):
    model, server, _ = served
    x, y = pixels(5), pixels(5, seed=1)
    with Client(server.grpc_target, name=NAME) as client:
        emb = client.embed(x)
        np.testing.assert_allclose(emb, model(x).numpy(), atol=1e-5)
        x8 = x.astype(np.uint8)
        np.testing.assert_allclose(client.embed(x8), model(x8.astype("float32")).numpy(),
                                   atol=1e-5)
        assert client.embed(x[0]).shape == (1, 8)  # one [H, W, 3] image
        # More images than the server takes per request: the client splits them.
        big = pixels(3 * MAX_BATCH + 1, seed=2)
        client.batch_size = MAX_BATCH
        np.testing.assert_allclose(client.embed(big), model(big).numpy(), atol=1e-5)
        sim, same = client.verify(x, y)
        expected = np.sum(model(x).numpy() * model(y).numpy(), axis=1)
        np.testing.assert_allclose(sim, expected, atol=1e-5)
        np.testing.assert_array_equal(same, expected >= THRESHOLD)
        sim_self, same_self = client.verify(x, x)
        np.testing.assert_allclose(sim_self, 1.0, atol=1e-5)
        assert same_self.all()
        meta = client.metadata()
        assert meta["image_size"] == SIZE and meta["embedding_dim"] == 8
        assert meta["version"] == 1
        assert set(meta["signatures"]) == {C.SERVING_SIGNATURE, C.EMBED_UINT8_SIGNATURE,
                                           C.VERIFY_SIGNATURE}
        assert meta["signatures"][C.VERIFY_SIGNATURE]["outputs"][C.SAME_PERSON] == {
            "dtype": "bool", "shape": [-1]}
        assert client.status() == [{"version": 1, "state": "AVAILABLE", "error_code": "OK",
                                    "error_message": ""}]


def test_stock_tensorflow_serving_stubs(served, stubs):
    model, _, _ = served
    predict_stub, model_stub = stubs
    x = pixels(3)
    response = predict_stub.Predict(predict_request({C.IMAGES: x}), timeout=30)
    assert response.model_spec.name == NAME and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == C.SERVING_SIGNATURE
    np.testing.assert_allclose(tf.make_ndarray(response.outputs[C.EMBEDDINGS]),
                               model(x).numpy(), atol=1e-5)

    request = predict_request({C.IMAGES_A: x, C.IMAGES_B: x}, signature=C.VERIFY_SIGNATURE)
    request.output_filter.append(C.SIMILARITY)
    response = predict_stub.Predict(request, timeout=30)
    assert list(response.outputs) == [C.SIMILARITY]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs[C.SIMILARITY]), 1.0, atol=1e-5)

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = NAME
    request.metadata_field.append("signature_def")
    response = predict_stub.GetModelMetadata(request, timeout=30)
    defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(defs)
    assert set(defs.signature_def) == {C.SERVING_SIGNATURE, C.EMBED_UINT8_SIGNATURE,
                                       C.VERIFY_SIGNATURE}
    images = defs.signature_def[C.SERVING_SIGNATURE].inputs[C.IMAGES]
    assert [d.size for d in images.tensor_shape.dim] == [-1, *SIZE, 3]
    assert images.dtype == tf.float32.as_datatype_enum

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = NAME
    response = model_stub.GetModelStatus(request, timeout=30)
    (status,) = response.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0


def test_rest_row_and_columnar(served):
    model, server, _ = served
    x, y = pixels(2), pixels(2, seed=1)
    expected = model(x).numpy()
    status, body = rest(server, f"/v1/models/{NAME}:predict", {"instances": x.tolist()})
    assert status == 200
    np.testing.assert_allclose(body["predictions"], expected, atol=1e-5)
    status, body = rest(server, f"/v1/models/{NAME}/versions/1:predict",
                        {"instances": [{C.IMAGES: im} for im in x.tolist()]})
    np.testing.assert_allclose(body["predictions"], expected, atol=1e-5)
    status, body = rest(server, f"/v1/models/{NAME}:predict", {"inputs": x.tolist()})
    np.testing.assert_allclose(body["outputs"], expected, atol=1e-5)
    status, body = rest(server, f"/v1/models/{NAME}:predict",
                        {"signature_name": C.EMBED_UINT8_SIGNATURE,
                         "inputs": {C.IMAGES: x.astype(np.uint8).tolist()}})
    assert status == 200, body
    # verify, columnar and row: several outputs come back as objects.
    status, body = rest(server, f"/v1/models/{NAME}:predict",
                        {"signature_name": C.VERIFY_SIGNATURE,
                         "inputs": {C.IMAGES_A: x.tolist(), C.IMAGES_B: y.tolist()}})
    sim = np.sum(expected * model(y).numpy(), axis=1)
    np.testing.assert_allclose(body["outputs"][C.SIMILARITY], sim, atol=1e-5)
    assert body["outputs"][C.SAME_PERSON] == (sim >= THRESHOLD).tolist()
    status, body = rest(server, f"/v1/models/{NAME}:predict",
                        {"signature_name": C.VERIFY_SIGNATURE,
                         "instances": [{C.IMAGES_A: a, C.IMAGES_B: b}
                                       for a, b in zip(x.tolist(), y.tolist())]})
    assert [p[C.SAME_PERSON] for p in body["predictions"]] == (sim >= THRESHOLD).tolist()

    status, body = rest(server, f"/v1/models/{NAME}")
    assert (status, body) == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]})
    status, body = rest(server, f"/v1/models/{NAME}/versions/1/metadata")
    assert status == 200 and body["model_spec"] == {"name": NAME, "signature_name": "",
                                                    "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert defs[C.SERVING_SIGNATURE]["inputs"][C.IMAGES]["dtype"] == "DT_FLOAT"


# ------------------------------------------------------------------ bad requests

_x = pixels(2)
_BAD_GRPC = [
    ("unknown model", predict_request({C.IMAGES: _x}, name="nobody"), "NOT_FOUND",
     "model 'nobody' is not served"),
    ("unknown version", predict_request({C.IMAGES: _x}, version=99), "NOT_FOUND",
     r"Specific\(faces, 99\)"),
    ("unknown signature", predict_request({C.IMAGES: _x}, signature="classify"),
     "FAILED_PRECONDITION", 'Serving signature key "classify" not found'),
    ("unknown label", predict_request({C.IMAGES: _x}, label="canary"), "INVALID_ARGUMENT",
     "Unrecognized servable version label: canary"),
    ("wrong input name", predict_request({"image": _x}), "INVALID_ARGUMENT",
     r"expects inputs \{images: float32 \[-1, 24, 20, 3\]\}; missing \['images'\] and "
     r"unexpected \['image'\]"),
    ("wrong dtype", predict_request({C.IMAGES: _x.astype(np.float64)}), "INVALID_ARGUMENT",
     "expects dtype float32 but float64 was sent"),
    ("uint8 to the float signature", predict_request({C.IMAGES: _x.astype(np.uint8)}),
     "INVALID_ARGUMENT", "use the signature 'embed_uint8'"),
    ("wrong rank", predict_request({C.IMAGES: _x[0]}), "INVALID_ARGUMENT",
     r"expects shape \[-1, 24, 20, 3\] but shape \[24, 20, 3\] was sent"),
    ("wrong size", predict_request({C.IMAGES: pixels(2, size=(20, 24))}), "INVALID_ARGUMENT",
     r"expects shape \[-1, 24, 20, 3\] but shape \[2, 20, 24, 3\]"),
    ("empty batch", predict_request({C.IMAGES: _x[:0]}), "INVALID_ARGUMENT", "Empty batch"),
    ("batch over the limit", predict_request({C.IMAGES: pixels(MAX_BATCH + 1)}),
     "INVALID_ARGUMENT", f"larger than the maximum batch size {MAX_BATCH}"),
    ("pairs of different sizes",
     predict_request({C.IMAGES_A: _x, C.IMAGES_B: _x[:1]}, signature=C.VERIFY_SIGNATURE),
     "INVALID_ARGUMENT", "same batch size"),
    ("no model name", predict_request({C.IMAGES: _x}, name=""), "INVALID_ARGUMENT",
     "Missing model name"),
]


@pytest.mark.parametrize("case", _BAD_GRPC, ids=[c[0] for c in _BAD_GRPC])
def test_bad_grpc_requests_get_the_right_code_and_the_server_keeps_serving(served, stubs, case):
    model, _, _ = served
    _, request, code, message = case
    predict_stub, _ = stubs
    with pytest.raises(grpc.RpcError) as info:
        predict_stub.Predict(request, timeout=30)
    assert info.value.code() == grpc.StatusCode[code]
    assert re.search(message, info.value.details()), info.value.details()
    good = predict_stub.Predict(predict_request({C.IMAGES: _x}), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(good.outputs[C.EMBEDDINGS]), model(_x).numpy(),
                               atol=1e-5)


def test_bad_metadata_and_status_requests(stubs):
    predict_stub, model_stub = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = NAME
    with pytest.raises(grpc.RpcError) as info:
        predict_stub.GetModelMetadata(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata_field" in info.value.details()
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = NAME
    request.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as info:
        model_stub.GetModelStatus(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7" in info.value.details()


_BAD_REST = [
    ("unknown model", "/v1/models/nobody:predict", {"instances": [[0]]}, 404, "not served"),
    ("unknown version", f"/v1/models/{NAME}/versions/9:predict", {"instances": _x.tolist()},
     404, r"Specific\(faces, 9\)"),
    ("unknown signature", f"/v1/models/{NAME}:predict",
     {"signature_name": "nope", "instances": _x.tolist()}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("outside the API", "/v2/whatever", None, 404, "Not Found"),
    ("not JSON", f"/v1/models/{NAME}:predict", b"{oops", 400, "JSON Parse error"),
    ("no instances or inputs", f"/v1/models/{NAME}:predict", {"x": 1}, 400,
     "Missing 'inputs' or 'instances'"),
    ("wrong input name", f"/v1/models/{NAME}:predict", {"inputs": {"image": _x.tolist()}},
     400, r"missing \['images'\]"),
    ("wrong size", f"/v1/models/{NAME}:predict", {"instances": pixels(1, (4, 4)).tolist()},
     400, r"expects shape \[-1, 24, 20, 3\]"),
    ("ragged", f"/v1/models/{NAME}:predict", {"instances": [[1, 2], [3]]}, 400, "ragged"),
    ("strings", f"/v1/models/{NAME}:predict", {"instances": ["a"]}, 400, "must be numbers"),
    ("empty batch", f"/v1/models/{NAME}:predict", {"instances": []}, 400,
     "No values in 'instances' array"),
    ("empty columnar batch", f"/v1/models/{NAME}:predict", {"inputs": []}, 400, "Empty batch"),
    ("batch over the limit", f"/v1/models/{NAME}:predict",
     {"instances": pixels(MAX_BATCH + 1).tolist()}, 400, "maximum batch size"),
    ("uint8 out of range", f"/v1/models/{NAME}:predict",
     {"signature_name": C.EMBED_UINT8_SIGNATURE, "instances": (_x * 0 + 300).tolist()}, 400,
     r"outside \[0, 255\]"),
]


@pytest.mark.parametrize("case", _BAD_REST, ids=[c[0] for c in _BAD_REST])
def test_bad_rest_requests_get_the_right_status(served, case):
    _, server, _ = served
    _, path, payload, status, message = case
    got, body = rest(server, path, payload)
    assert got == status and re.search(message, body["error"]), body
    got, body = rest(server, f"/v1/models/{NAME}:predict", {"instances": _x.tolist()})
    assert got == 200 and len(body["predictions"]) == 2


def test_client_errors(served):
    _, server, _ = served
    with Client(server.grpc_target, name="nobody", retries=0) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.embed(pixels(1))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with Client(server.grpc_target, name=NAME) as client:
        with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
            client.embed(np.zeros((2, 24, 20)))
        with pytest.raises(ValueError, match="same shape"):
            client.verify(pixels(2), pixels(3))


def test_client_retries_unavailable_then_gives_up():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(f"127.0.0.1:{port}", retries=2, backoff=0.05, timeout=2.0)
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        client.status()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.perf_counter() - t0 >= 0.05 * (1 + 2) * 0.5  # backed off twice
    client.close()


class _ScriptedModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus fails with the scripted codes, then answers; records each attempt."""

    def __init__(self, codes):
        self.codes = list(codes)
        self.attempts = []

    def GetModelStatus(self, request, context):
        self.attempts.append(time.perf_counter())
        if self.codes:
            context.abort(self.codes.pop(0), "scripted failure")
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add(version=1)
        status.state = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
        return response


@pytest.fixture
def scripted():
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = _ScriptedModelService([])
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("retries", [0, 1, 4])
def test_client_retry_policy_attempts_unavailable(scripted, retries):
    servicer, target = scripted
    servicer.codes = [grpc.StatusCode.UNAVAILABLE] * 10
    with Client(target, retries=retries, backoff=0.02, timeout=10.0) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.status()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.attempts) == retries + 1
    gaps = np.diff(servicer.attempts)
    # Exponential backoff, gRPC's jitter is +-20%: gap k waits about 0.02 * 2**k s.
    assert all(g >= 0.02 * 2 ** k * 0.8 - 0.005 for k, g in enumerate(gaps)), gaps


def test_client_retry_policy_recovers_and_skips_other_codes(scripted):
    servicer, target = scripted
    servicer.codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with Client(target, retries=2, backoff=0.01) as client:
        assert client.status()[0]["state"] == "AVAILABLE"
        assert len(servicer.attempts) == 3
        for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.INVALID_ARGUMENT):
            servicer.attempts.clear()
            servicer.codes = [code]
            with pytest.raises(grpc.RpcError) as info:
                client.status()
            assert info.value.code() == code and len(servicer.attempts) == 1


def test_client_retry_policy_config():
    from tfadv.serving.client import MAX_RETRIES, retry_channel_options, retry_service_config

    config = retry_service_config(retries=3, backoff=0.1)
    (method,) = config["methodConfig"]
    assert method["name"] == [{}]
    assert method["retryPolicy"] == {
        "maxAttempts": 4, "initialBackoff": "0.100000000s", "maxBackoff": "0.400000000s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    options = dict(retry_channel_options(3, 0.1))
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == config
    assert retry_channel_options(0) == [("grpc.enable_retries", 0)]
    with pytest.raises(ValueError, match="retries <= 4"):
        Client("127.0.0.1:1", retries=MAX_RETRIES + 1)
    with pytest.raises(ValueError, match="retries"):
        Client("127.0.0.1:1", retries=-1)
    with pytest.raises(ValueError, match="backoff > 0"):
        retry_service_config(2, 0.0)


# ------------------------------------------------------------------ load and hot reload


def _hammer(target, n_threads, n_requests, check, stop=None):
    """n_threads clients, each sending n_requests (or until `stop`); returns the errors."""
    errors = []
    start = threading.Barrier(n_threads)

    def worker(i):
        channel = grpc.insecure_channel(target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            start.wait()
            k = 0
            while (k < n_requests) if stop is None else not stop.is_set():
                try:
                    check(i, k, stub)
                except Exception as err:  # collected, the assertion is on the list
                    errors.append(f"client {i} request {k}: {err!r}"[:300])
                k += 1
        finally:
            channel.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    return threads, errors


@pytest.mark.slow
def test_load_32_clients_x_50_requests_without_failure(served):
    model, server, _ = served
    inputs = pixels(32 * 2).reshape(32, 2, *SIZE, 3)
    expected = model(inputs.reshape(-1, *SIZE, 3)).numpy().reshape(32, 2, -1)
    requests = [predict_request({C.IMAGES: inputs[i]}) for i in range(32)]

    def check(i, k, stub):
        out = stub.Predict(requests[i], timeout=60)
        emb = to_numpy(out.outputs[C.EMBEDDINGS])
        np.testing.assert_allclose(emb, expected[i], atol=1e-5)

    t0 = time.perf_counter()
    threads, errors = _hammer(server.grpc_target, 32, 50, check)
    for t in threads:
        t.join()
    assert errors == []
    print(f"1600 requests in {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_hot_reload_under_load(tmp_path):
    base = str(tmp_path / "base")
    models = {1: tiny_embedder(seed=1), 2: tiny_embedder(seed=2)}
    x = pixels(2)
    expected = {v: m(x).numpy() for v, m in models.items()}
    assert np.abs(expected[1] - expected[2]).max() > 1e-2  # the versions are distinguishable
    export_model(models[1], base, name=NAME, threshold=0.5)
    request = predict_request({C.IMAGES: x})
    seen = [[] for _ in range(8)]

    def check(i, k, stub):
        out = stub.Predict(request, timeout=60)
        version = out.model_spec.version.value
        np.testing.assert_allclose(to_numpy(out.outputs[C.EMBEDDINGS]), expected[version],
                                   atol=1e-5)
        seen[i].append(version)

    with ModelServer(base, name=NAME, port=0, rest_port=None, poll_interval=0.1,
                     batching=BatchingParameters(max_batch_size=8)) as server:
        stop = threading.Event()
        threads, errors = _hammer(server.grpc_target, 8, None, check, stop)
        time.sleep(0.5)
        export_model(models[2], base, name=NAME, threshold=0.5)  # while the clients query
        server.wait_for_version(2)
        counts = [len(s) for s in seen]
        deadline = time.monotonic() + 30
        while min(len(s) - c for s, c in zip(seen, counts)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        with Client(server.grpc_target, name=NAME) as client:
            states = {s["version"]: s["state"] for s in client.status()}
    assert errors == []
    assert all(s[0] == 1 and s[-1] == 2 for s in seen), [(s[0], s[-1]) for s in seen]
    for s in seen:  # each client sees version 1, then only version 2
        switch = s.index(2)
        assert set(s[switch:]) == {2} and set(s[:switch]) == {1}
    assert states == {2: "AVAILABLE", 1: "END"}


def test_new_version_is_picked_up_and_broken_one_is_skipped(tmp_path):
    base = str(tmp_path / "base")
    export_model(tiny_embedder(seed=1), base, name=NAME, threshold=0.5)
    with ModelServer(base, name=NAME, port=0, rest_port=None, poll_interval=0.1) as server:
        with Client(server.grpc_target, name=NAME) as client:
            # A version directory that does not hold a loadable SavedModel.
            os.makedirs(os.path.join(base, ".tmp-broken"))
            with open(os.path.join(base, ".tmp-broken", C.SAVED_MODEL_FILE), "wb") as f:
                f.write(b"not a protobuf")
            os.rename(os.path.join(base, ".tmp-broken"), os.path.join(base, "2"))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                states = {s["version"]: s for s in client.status()}
                if 2 in states and states[2]["error_code"] != "OK":
                    break
                time.sleep(0.05)
            assert states[2]["state"] == "END" and states[2]["error_message"]
            assert client.metadata()["version"] == 1  # still serving the good one
            shutil.rmtree(os.path.join(base, "2"))
            export_model(tiny_embedder(seed=3), base, name=NAME, threshold=0.5, version=3)
            server.wait_for_version(3)
            assert client.metadata()["version"] == 3


# ------------------------------------------------------------------ config, TLS, CLI


def test_model_config_file_with_labels(served, tmp_path):
    model, _, base = served
    config = tmp_path / "models.config"
    config.write_text(f"""
model_config_list {{
  config {{ name: "a" base_path: "{base}" model_platform: "tensorflow"
           version_labels {{ key: "stable" value: 1 }} }}
  config {{ name: "b" base_path: "{os.path.relpath(base, tmp_path)}"
           model_version_policy {{ specific {{ versions: 1 }} }} }}
}}""")
    x = pixels(1)
    with ModelServer(model_config_file=str(config), port=0, rest_port=0) as server:
        for name in ("a", "b"):
            with Client(server.grpc_target, name=name) as client:
                np.testing.assert_allclose(client.embed(x), model(x).numpy(), atol=1e-5)
        status, body = rest(server, "/v1/models/a/labels/stable:predict",
                            {"instances": x.tolist()})
        assert status == 200
        status, body = rest(server, "/v1/models/a/labels/canary:predict",
                            {"instances": x.tolist()})
        assert status == 400 and body["error"].startswith(
            "Unrecognized servable version label: canary")
    with pytest.raises(ValueError, match="ModelServerConfig text format"):
        parse_model_config("model_config_list { config { nme: 'x' } }")
    with pytest.raises(FileNotFoundError, match="tfadv export"):
        ModelServer(str(tmp_path / "missing"), port=0)


def test_tls(served, tmp_path):
    model, _, base = served
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    import ssl

    x = pixels(1)
    with ModelServer(base, name=NAME, port=0, rest_port=0, tls_cert=cert,
                     tls_key=key) as server:
        with Client(f"localhost:{server.port}", name=NAME, root_certificates=cert) as client:
            np.testing.assert_allclose(client.embed(x), model(x).numpy(), atol=1e-5)
        with Client(f"localhost:{server.port}", name=NAME, retries=0, timeout=5) as plain:
            with pytest.raises(grpc.RpcError):
                plain.embed(x)
        assert server.rest_url.startswith("https://")
        context = ssl.create_default_context(cafile=cert)
        with urllib.request.urlopen(server.rest_url + f"/v1/models/{NAME}", context=context,
                                    timeout=30) as response:
            assert json.loads(response.read())["model_version_status"][0]["state"] == "AVAILABLE"


def test_a_taken_port_is_a_clear_error(served):
    _, server, base = served
    with pytest.raises(ValueError, match="Could not bind the gRPC port"):
        ModelServer(base, name=NAME, port=server.port, rest_port=None).start()
    with pytest.raises(ValueError, match="Could not bind the REST port"):
        ModelServer(base, name=NAME, port=0, rest_port=server.rest_port).start()


@pytest.mark.slow
def test_serve_cli_exits_0_on_sigterm_after_in_flight_requests(served, tmp_path):
    _, _, base = served
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfadv.cli", "serve", base, "--name", NAME, "--port", "0",
         "--rest-port", "0", "--enable-batching", "--max-batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        target = None
        for line in proc.stdout:
            m = re.match(r"gRPC on (\S+), REST on (\S+)", line)
            if m:
                target = m.group(1)
                break
        assert target, proc.stderr.read()
        x = pixels(2)
        request = predict_request({C.IMAGES: x})
        done = []

        def check(i, k, stub):
            stub.Predict(request, timeout=60)
            done.append(1)

        stop = threading.Event()
        threads, errors = _hammer(target, 4, None, check, stop)
        while len(done) < 20:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        stop.set()
        for t in threads:
            t.join()
        # Requests arriving during the shutdown are refused (see ModelServer.stop); the
        # in-process test below checks that the ones in flight complete.
        assert all("UNAVAILABLE" in e or "CANCELLED" in e for e in errors), errors[:3]
        assert "shutting down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_finishes_in_flight_requests_and_refuses_new_ones(tmp_path, monkeypatch):
    from tfadv.serving.signature import Signature

    model = tiny_embedder(seed=4)
    base = str(tmp_path / "base")
    export_model(model, base, name=NAME, threshold=0.5)
    x = pixels(2)
    server = ModelServer(base, name=NAME, port=0, rest_port=0).start()
    running = threading.Semaphore(0)
    real = Signature._call

    def slow(self, inputs):
        running.release()
        time.sleep(1.5)
        return real(self, inputs)

    monkeypatch.setattr(Signature, "_call", slow)
    results = []

    def call():
        with Client(server.grpc_target, name=NAME, retries=0, timeout=60) as client:
            results.append(client.embed(x))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert running.acquire(timeout=60)  # all four are in the model now
    stopper = threading.Thread(target=server.stop, args=(30,))
    stopper.start()
    while not server._draining:
        time.sleep(0.01)
    with Client(server.grpc_target, name=NAME, retries=0, timeout=10) as late:
        with pytest.raises(grpc.RpcError) as info:
            late.embed(x)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.details()
    assert rest(server, f"/v1/models/{NAME}")[0] == 503
    for t in threads:
        t.join()
    stopper.join()
    assert len(results) == 4
    for emb in results:
        np.testing.assert_allclose(emb, model(x).numpy(), atol=1e-5)
    assert server.wait(0)


# ------------------------------------------------------------------ building blocks


def test_batcher_merges_concurrent_requests_and_splits_results():
    sizes = []

    def fn(inputs):
        sizes.append(len(inputs["x"]))
        time.sleep(0.01)
        return {"y": inputs["x"] * 2, "n": inputs["x"][:, 0]}

    batcher = Batcher(fn, BatchingParameters(max_batch_size=6, batch_timeout_micros=100_000,
                                             num_batch_threads=1))
    results = {}

    def call(i):
        x = np.full((2, 3), float(i))
        results[i] = batcher.submit({"x": x}, 2)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(sizes) == 18 and max(sizes) <= 6 and len(sizes) < 9
    for i, out in results.items():
        np.testing.assert_array_equal(out["y"], np.full((2, 3), 2.0 * i))
        np.testing.assert_array_equal(out["n"], [i, i])
    batcher.close()
    assert batcher.submit({"x": np.ones((1, 3))}, 1)["y"].tolist() == [[2, 2, 2]]  # inline


def test_batcher_pads_to_the_allowed_sizes():
    seen = []

    def fn(inputs):
        seen.append(len(inputs["x"]))
        return {"y": inputs["x"] + 1}

    params = BatchingParameters(max_batch_size=8, allowed_batch_sizes=(4, 8),
                                batch_timeout_micros=0)
    batcher = Batcher(fn, params)
    out = batcher.submit({"x": np.arange(3.0)[:, None]}, 3)
    assert seen == [4]  # padded ...
    np.testing.assert_array_equal(out["y"], [[1.0], [2.0], [3.0]])  # ... and cut back
    out = batcher.submit({"x": np.arange(5.0)[:, None]}, 5)
    assert seen == [4, 8] and out["y"].shape == (5, 1)
    batcher.close()


def test_batcher_errors_reach_every_caller_and_full_queue_is_unavailable():
    release = threading.Event()

    def fn(inputs):
        release.wait()
        raise ValueError("boom")

    batcher = Batcher(fn, BatchingParameters(max_batch_size=2, batch_timeout_micros=0,
                                             num_batch_threads=1, max_enqueued_batches=1))
    errors = []

    def call():
        try:
            batcher.submit({"x": np.ones((1, 1))}, 1)
        except Exception as err:
            errors.append(err)

    # One running, two queued (the bound: 1 batch of 2), the rest refused.
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.1)
    release.set()
    for t in threads:
        t.join()
    full = [e for e in errors if isinstance(e, ServingError)]
    assert len(errors) == 4 and full and len(full) < 4
    assert all(e.code == "UNAVAILABLE" and "queue is full" in e.message for e in full)
    assert all(isinstance(e, ValueError) for e in errors if e not in full)
    batcher.close()


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.uint8),
    np.array([True, False]), np.array([1.5, -2], np.float16), np.arange(3, dtype=np.int64),
    np.array([b"a", b"bc"], dtype=object), np.zeros((0, 2), np.float32)])
def test_tensor_protos_round_trip_with_tensorflow(array):
    proto = to_tensor_proto(array)
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)
    np.testing.assert_array_equal(to_numpy(tf.make_tensor_proto(array)), array)
    assert to_numpy(proto).dtype == array.dtype


def test_tensor_proto_value_fields_and_errors():
    from tensorflow.core.framework import tensor_pb2, types_pb2

    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for d in (2, 2):
        proto.tensor_shape.dim.add().size = d
    proto.float_val.append(7.0)  # one value fills the shape
    np.testing.assert_array_equal(to_numpy(proto), np.full((2, 2), 7.0, np.float32))
    proto.float_val.extend([1.0, 2.0])  # fewer values than the shape: the last repeats (TF's
    np.testing.assert_array_equal(to_numpy(proto), [[7.0, 1.0], [2.0, 2.0]])  # FromProto rule)
    proto.float_val.extend([3.0, 4.0])
    with pytest.raises(ServingError, match="do not fill shape"):
        to_numpy(proto)
    short = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                   tensor_content=np.zeros(2, np.float32).tobytes())
    short.tensor_shape.dim.add().size = 3
    with pytest.raises(ServingError, match=r"input 'x': its values do not fill shape \[3\]"):
        to_numpy(short, "input 'x'")
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_RESOURCE)
    with pytest.raises(ServingError, match="does not accept"):
        to_numpy(proto, "input 'x'")
