"""TF Serving's REST contract, case by case: the status, the body's shape and TF Serving's
message (http_rest_api_handler.cc, http_rest_api_util.cc and json_tensor.cc at
tensorflow/serving 9d981c5, and their tests). Where tfadv adds a hint, it follows TF
Serving's text, so a client matching the start of the message works on both."""

import numpy as np
import pytest

from conftest import rest_json
from test_export import pixels, save_embedder
from tfadv.export import contract as C, export_model
from tfadv.serving import ModelServer

NAME = "m"
X = pixels(1).round(2).tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    _, path = save_embedder(str(root / "model"))
    base = root / "base"
    export_model(path, str(base), name=NAME)
    config = root / "models.config"
    config.write_text(f"""model_config_list {{ config {{ name: "{NAME}" base_path: "{base}"
        model_platform: "tensorflow" version_labels {{ key: "stable" value: 1 }} }} }}""")
    with ModelServer(model_config_file=str(config), port=0, rest_port=0, poll_interval=0,
                     warmup=False) as srv:
        yield srv


def call(server, method, path, body=None):
    return rest_json(server, path, body, method)


P = f"/v1/models/{NAME}"
GOOD = {"instances": X}
# (case, method, path, body, status, the error message's start; None: a 200 answer)
CASES = [
    ("singular 'version'", "GET", f"{P}/version/2", None, 400,
     f"Malformed request: GET {P}/version/2"),
    ("singular 'version' on predict", "POST", f"{P}/version/2:predict", GOOD, 400,
     f"Malformed request: POST {P}/version/2:predict"),
    ("GET on :predict", "GET", f"{P}:predict", None, 400, f"Malformed request: GET {P}:predict"),
    ("unknown verb", "POST", f"{P}:explain", GOOD, 400, f"Malformed request: POST {P}:explain"),
    ("upper-case verb", "POST", f"{P}:PREDICT", GOOD, 400,
     f"Malformed request: POST {P}:PREDICT"),
    ("version and label", "POST", f"{P}/versions/1/labels/stable:predict", GOOD, 400,
     f"Malformed request: POST {P}/versions/1/labels/stable:predict"),
    ("non-numeric version", "POST", f"{P}/versions/abc:predict", GOOD, 400,
     f"Malformed request: POST {P}/versions/abc:predict"),
    ("non-numeric version, status", "GET", f"{P}/versions/abc", None, 400,
     f"Malformed request: GET {P}/versions/abc"),
    ("version over int64", "POST", f"{P}/versions/18446744073709551615:predict", GOOD, 400,
     "Failed to convert version: 18446744073709551615 to numeric."),
    ("no model name", "GET", "/v1/models", None, 400, "Missing model name in request."),
    ("no model name, versioned", "GET", "/v1/models/versions/1", None, 400,
     "Missing model name in request."),
    ("trailing slash", "GET", "/v1/models/", None, 400, "Malformed request: GET /v1/models/"),
    ("POST to /v1/models", "POST", "/v1/models", GOOD, 400, "Malformed request: POST /v1/models"),
    ("POST to the status URL", "POST", P, GOOD, 400, f"Malformed request: POST {P}"),
    ("POST to metadata", "POST", f"{P}/metadata", GOOD, 400,
     f"Malformed request: POST {P}/metadata"),
    ("unknown /v1 path", "GET", "/v1/foo", None, 400, "Malformed request: GET /v1/foo"),
    ("PUT", "PUT", P, GOOD, 400, f"Malformed request: PUT {P}"),
    ("DELETE", "DELETE", P, None, 400, f"Malformed request: DELETE {P}"),
    ("query string on predict", "POST", f"{P}:predict?x=1", GOOD, 400,
     f"Malformed request: POST {P}:predict?x=1"),
    ("outside /v1", "GET", "/foo", None, 404, "Not Found"),
    ("unknown model, predict", "POST", "/v1/models/x:predict", GOOD, 404,
     "Servable not found for request: Latest(x)"),
    ("unknown version, predict", "POST", f"{P}/versions/9:predict", GOOD, 404,
     f"Servable not found for request: Specific({NAME}, 9)"),
    ("unknown label, predict", "POST", f"{P}/labels/zz:predict", GOOD, 400,
     "Unrecognized servable version label: zz"),
    ("unknown model, metadata", "GET", "/v1/models/x/metadata", None, 404,
     "Servable not found for request: Latest(x)"),
    ("unknown label, metadata", "GET", f"{P}/labels/zz/metadata", None, 400,
     "Unrecognized servable version label: zz"),
    ("unknown model, status", "GET", "/v1/models/x", None, 404,
     "Could not find any versions of model x"),
    ("unknown version, status", "GET", f"{P}/versions/9", None, 404,
     f"Could not find version 9 of model {NAME}"),
    ("label on status: ignored", "GET", f"{P}/labels/zz", None, 200, None),
    ("upper-case METADATA is the status", "GET", f"{P}/METADATA", None, 200, None),
    ("empty body", "POST", f"{P}:predict", b"", 400, "JSON Parse error: The document is empty"),
    ("empty body, unknown model: JSON first", "POST", "/v1/models/x:predict", b"", 400,
     "JSON Parse error: The document is empty"),
    ("bad JSON", "POST", f"{P}:predict", b"instances = [1]", 400, "JSON Parse error: "),
    ("not an object", "POST", f"{P}:predict", [1], 400, "JSON Value: [1] Is not object"),
    ("signature_name not a string", "POST", f"{P}:predict",
     {"signature_name": 100, "instances": X}, 400, "JSON Value: "),
    ("unknown signature", "POST", f"{P}:predict", {"signature_name": "x", "instances": X}, 400,
     'Serving signature name: "x" not found in signature def'),
    ("both keys", "POST", f"{P}:predict", {"instances": X, "inputs": X}, 400, "JSON Value: "),
    ("neither key", "POST", f"{P}:predict", {"foo": 1}, 400,
     "Missing 'inputs' or 'instances' key"),
    ("instances not a list", "POST", f"{P}:predict", {"instances": 1}, 400, "JSON Value: "),
    ("empty instances", "POST", f"{P}:predict", {"instances": []}, 400, "JSON Value: "),
    ("unknown top-level key: ignored", "POST", f"{P}:predict",
     {"instances": X, "output_filter": ["nothing"], "model_spec": {}}, 200, None),
    ("classify", "POST", f"{P}:classify", {"examples": []}, 501, "classify is not served"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_answers_as_tf_serving(server, case):
    _, method, path, body, status, message = case
    got, answer = call(server, method, path, body)
    assert got == status, answer
    if message is None:
        assert "error" not in answer
    else:
        assert set(answer) == {"error"} and answer["error"].startswith(message), answer
    assert call(server, "POST", f"{P}:predict", GOOD)[0] == 200  # still serving


def test_the_documented_full_messages(server):
    _, answer = call(server, "POST", f"{P}:predict", {"signature_name": 100, "instances": X})
    assert answer["error"].endswith(
        "not formatted correctly. 'signature_name' key must be a string value.")
    _, answer = call(server, "POST", f"{P}:predict", {"instances": X, "inputs": X})
    assert answer["error"].endswith("Not formatted correctly expecting only one of 'inputs' or "
                                    "'instances' keys to exist ")
    _, answer = call(server, "POST", f"{P}:predict", {"instances": 1})
    assert answer["error"].endswith("Expecting 'instances' to be an list/array")
    _, answer = call(server, "POST", f"{P}:predict", {"instances": []})
    assert answer["error"].endswith("No values in 'instances' array")


def test_success_bodies_have_tf_servings_shape(server):
    status, body = call(server, "GET", f"{P}/labels/zz")
    assert status == 200 and body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]}
    status, body = call(server, "GET", f"{P}/labels/stable/metadata")
    assert status == 200 and body["model_spec"] == {"name": NAME, "signature_name": "",
                                                    "version": "1"}
    assert C.SERVING_SIGNATURE in body["metadata"]["signature_def"]["signature_def"]
    # An output_filter key is ignored: every output comes back, as from TF Serving.
    status, body = call(server, "POST", f"{P}:predict", {
        "signature_name": C.VERIFY_SIGNATURE, "output_filter": [C.SIMILARITY],
        "instances": [{C.IMAGES_A: X[0], C.IMAGES_B: X[0]}]})
    assert status == 200 and set(body["predictions"][0]) == {C.SIMILARITY, C.SAME_PERSON}
    assert body["predictions"][0][C.SIMILARITY] == pytest.approx(1.0, abs=1e-5)
    status, body = call(server, "POST", f"{P}:predict", {"inputs": X})
    assert status == 200 and np.asarray(body["outputs"]).shape == (1, 8)


def test_head_and_cors_preflight_as_tf_serving(server):
    """HEAD: 400 Malformed request, without a body; OPTIONS: a CORS preflight, 200 with an
    Origin header, else 400; both empty (TF Serving without --enable_cors_support)."""
    import urllib.error
    import urllib.request

    def status(method, headers=None):
        request = urllib.request.Request(server.rest_url + P, method=method,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    assert status("HEAD") == (400, b"")
    assert status("OPTIONS") == (400, b"")
    assert status("OPTIONS", {"Origin": "https://example.org"}) == (200, b"")
    assert call(server, "POST", f"{P}:predict", GOOD)[0] == 200
