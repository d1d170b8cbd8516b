"""Prometheus metrics on the REST port (TF Serving's --monitoring_config_file), scraped and
parsed with prometheus_client's own parser after a mix of good and bad requests."""

import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import rest_json
from test_export import export_embedder, pixels
from tfadv.export import BatchingParameters, contract as C
from tfadv.serving import Client, ModelServer
from tfadv.serving.metrics import DEFAULT_PATH, read_monitoring_config

NAME = "faces"
PATH = "/monitoring/prometheus/metrics"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    _, _, base = export_embedder(root, NAME)
    config = root / "monitoring.config"
    config.write_text(f'prometheus_config {{ enable: true, path: "{PATH}" }}\n')
    batching = BatchingParameters.with_padding(8, batch_timeout_micros=1000)
    with ModelServer(base, name=NAME, port=0, rest_port=0, batching=batching, poll_interval=0,
                     monitoring_config_file=str(config)) as srv:
        yield srv


def scrape(server):
    with urllib.request.urlopen(server.rest_url + PATH + "?scrape=1", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    assert "_created" not in text  # TF Serving exports none
    assert 'le="32.4"' in text and "32.400000000000006" not in text  # TF Serving's bounds
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def post(server, path, payload):
    return rest_json(server, path, payload)[0]


def test_counts_latencies_batches_and_load_state_after_good_and_bad_requests(server):
    before = scrape(server)
    count = ":tensorflow:serving:request_count"
    x = pixels(3)
    with Client(server.grpc_target, name=NAME) as client:
        for _ in range(4):
            client.embed(x)
        with pytest.raises(grpc.RpcError):
            client.predict({"wrong": x})
        with pytest.raises(grpc.RpcError):
            client.predict({C.IMAGES: x}, signature_name="nope")
    assert post(server, f"/v1/models/{NAME}:predict", {"instances": x.tolist()}) == 200
    assert post(server, f"/v1/models/{NAME}:predict", {"instances": [[1]]}) == 400
    assert post(server, "/v1/models/nobody:predict", {"instances": [[1]]}) == 404
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    sig = C.SERVING_SIGNATURE
    assert delta(count, model_name=NAME, status="OK", signature_name=sig) == 5
    assert delta(count, model_name=NAME, status="INVALID_ARGUMENT", signature_name=sig) == 2
    # Names the server does not serve are counted as "(unknown)": no series per made-up name.
    assert delta(count, model_name=NAME, status="FAILED_PRECONDITION",
                 signature_name="(unknown)") == 1
    assert delta(count, model_name="(unknown)", status="NOT_FOUND", signature_name="") == 1
    assert not [k for k in after if "nobody" in str(k) or "nope" in str(k)]
    latency = ":tensorflow:serving:request_latency"
    assert delta(latency + "_count", model_name=NAME, API="Predict", entrypoint="GRPC") == 4
    assert delta(latency + "_count", model_name=NAME, API="predict", entrypoint="REST") == 1
    # TF Serving's buckets: 10 * 1.8^k microseconds; the +Inf bucket holds every request.
    assert delta(latency + "_bucket", model_name=NAME, API="Predict", entrypoint="GRPC",
                 le="+Inf") == 4
    assert delta(latency + "_sum", model_name=NAME, API="Predict", entrypoint="GRPC") > 0
    runtime = ":tensorflow:serving:runtime_latency_count"
    assert delta(runtime, model_name=NAME, API="Predict", runtime="TF2") >= 5
    # Batches of 3 padded to 4 (allowed sizes 1, 2, 4, 8): one padding example each.
    batch = ":tensorflow:serving:batching_session:"
    assert delta(batch + "input_batch_size_count") >= 5
    assert delta(batch + "processed_batch_size_sum") >= 4 * delta(
        batch + "processed_batch_size_count") - 1e-9
    assert delta(batch + "padding_size_count", execution_batch_size="4") >= 5
    base = server.configs[0].base_path
    assert value(after, ":tensorflow:cc:saved_model:load_attempt_count",
                 model_path=f"{base}/1", status="success") >= 1
    assert value(after, ":tfadv:serving:model_version_state", model_name=NAME, version="1",
                 state="AVAILABLE") == 1


def test_metrics_path_only_when_enabled(server, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as err:  # another path stays the model API's
        urllib.request.urlopen(server.rest_url + "/monitoring/other", timeout=30)
    assert err.value.code == 404
    off = tmp_path / "off.config"
    off.write_text("prometheus_config { enable: false }")
    assert read_monitoring_config(off) is None
    default = tmp_path / "default.config"
    default.write_text("prometheus_config { enable: true }")
    assert read_monitoring_config(default) == DEFAULT_PATH
    bad = tmp_path / "bad.config"
    bad.write_text("prometheus { on: 1 }")
    with pytest.raises(ValueError, match="not a MonitoringConfig"):
        read_monitoring_config(bad)
    under_api = tmp_path / "api.config"
    under_api.write_text('prometheus_config { enable: true, path: "/v1/metrics" }')
    with pytest.raises(ValueError, match="outside /v1/"):
        read_monitoring_config(under_api)
    with pytest.raises(ValueError, match="REST port"):
        ModelServer(server.configs[0].base_path, name=NAME, port=0, rest_port=None,
                    monitoring_config_file=str(default))


def test_serve_command_line_takes_the_monitoring_config_file():
    from tfadv.cli import build_parser
    from tfadv.config import ServeConfig
    from tfadv.config.options import build

    args = build_parser().parse_args(["serve", "exported", "--monitoring-config-file", "m.cfg"])
    assert build(ServeConfig, args).monitoring_config_file == "m.cfg"


def test_batching_options_pad_or_not():
    """--no-pad-batches runs merged batches at their own size (measured on FaceNet with 32
    batch-1 clients: mean batch 16 padded to 24, a third of the compute on padding)."""
    from tfadv.config import BatchingOptions
    from tfadv.serving.cli_commands import batching_parameters

    assert batching_parameters(BatchingOptions()).allowed_batch_sizes == (1, 2, 4, 8, 16, 32)
    off = batching_parameters(BatchingOptions(max_batch_size=16, pad_batches=False))
    assert off.allowed_batch_sizes == () and off.max_batch_size == 16
    base = BatchingParameters(max_batch_size=8, batch_timeout_micros=7,
                              allowed_batch_sizes=(4, 8))
    merged = batching_parameters(BatchingOptions(pad_batches=False), base)
    assert (merged.max_batch_size, merged.batch_timeout_micros,
            merged.allowed_batch_sizes) == (8, 7, ())
    assert batching_parameters(BatchingOptions(), base).allowed_batch_sizes == (4, 8)
