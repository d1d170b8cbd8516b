"""Prometheus metrics of the model server, under TF Serving's names (prometheus_client).

TF Serving exports its `tensorflow::monitoring` cells on the REST port when
started with `--monitoring_config_file` holding

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

and so does `tfadv serve`. The names are TF Serving's, with its exporter's
'/' -> ':' mapping (tensorflow_serving/servables/tensorflow/util.cc,
batching/batching_util.h, tensorflow/cc/saved_model/loader.cc):

    :tensorflow:serving:request_count{model_name, status, signature_name}
        requests by final status (OK, INVALID_ARGUMENT, ...): Predict over gRPC
        and every REST request (status and metadata too), as TF Serving counts
        them; tfadv adds the signature_name label, and counts names the server
        does not serve as "(unknown)" (TF Serving makes a series per name sent).
    :tensorflow:serving:request_latency{model_name, API, entrypoint}
        histogram, microseconds, successful requests (entrypoint GRPC or REST).
    :tensorflow:serving:runtime_latency{model_name, API, runtime}
        histogram, microseconds: the model call itself (runtime "TF2").
    :tensorflow:serving:batching_session:input_batch_size
    :tensorflow:serving:batching_session:processed_batch_size
    :tensorflow:serving:batching_session:padding_size{execution_batch_size}
        histograms of server-side batching.
    :tensorflow:cc:saved_model:load_attempt_count{model_path, status}
        version loads, status "success" or "fail".
    :tfadv:serving:model_version_state{model_name, version, state}
        1 for each loaded or tried version's state (LOADING, AVAILABLE, END);
        TF Serving has no such metric (its ModelService reports the states).

The buckets are TF Serving's: latencies 10 * 1.8^k microseconds (33
buckets), batch sizes 2^k (14). The metrics are process-wide, like TF's
monitoring cells. Counts are exposed untyped: prometheus_client would rename a
counter to `..._total`, and TF Serving's names have no such suffix.
"""

from __future__ import annotations

import collections
import threading
import weakref

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from prometheus_client import (CollectorRegistry, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "DEFAULT_PATH", "METRICS", "ServingMetrics", "read_monitoring_config"]

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format written
# TF Serving's bounds, printed as TF Serving prints them (32.4, not 32.400000000000006).
LATENCY_BUCKETS_US = tuple(float(f"{10 * 1.8 ** k:.6g}") for k in range(33))
BATCH_BUCKETS = tuple(float(2 ** k) for k in range(14))
_PREFIX = ":tensorflow:serving:"
UNKNOWN = "(unknown)"  # the label of a model or signature name the server does not serve


def _monitoring_config_class():
    """tensorflow.serving.MonitoringConfig (monitoring_config.proto), which the
    tensorflow-serving-api wheel does not ship: built from its two-message schema."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="tfadv/monitoring_config.proto", package="tensorflow.serving", syntax="proto3")
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=8, label=1)  # bool
    prometheus.field.add(name="path", number=2, type=9, label=1)  # string
    config = proto.message_type.add(name="MonitoringConfig")
    config.field.add(name="prometheus_config", number=1, type=11, label=1,
                     type_name=".tensorflow.serving.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


def read_monitoring_config(path) -> str | None:
    """The metrics path a TF Serving `--monitoring_config_file` turns on.

    Args:
        path: a text-format MonitoringConfig file.

    Returns:
        The URL path (default `/monitoring/prometheus/metrics`), or None when
        `prometheus_config.enable` is false.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a MonitoringConfig in text format, or a path that does
            not start with '/' or lies under /v1/ (the model API).
    """
    with open(path) as f:
        text = f.read()
    config = _monitoring_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise ValueError(f"{path}: not a MonitoringConfig in text format ({err}); expected "
                         "e.g. prometheus_config { enable: true, path: "
                         f'"{DEFAULT_PATH}" }}') from None
    if not config.prometheus_config.enable:
        return None
    where = config.prometheus_config.path or DEFAULT_PATH
    if not where.startswith("/") or where.lower().startswith("/v1/"):
        raise ValueError(f"{path}: prometheus_config.path must start with '/' and lie outside "
                         f"/v1/ (the model API). Received: {where!r}")
    return where


class ServingMetrics:
    """The server's metrics; `exposition()` is the text Prometheus scrapes."""

    def __init__(self):
        # TF Serving exports no "_created" series; prometheus_client's switch is process-wide.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._requests = collections.Counter()  # (model_name, status, signature_name)
        self._loads = collections.Counter()  # (model_path, status)
        # The registries of the servers in this process: the version states and the names
        # requests may be counted under are read from them, not kept twice.
        self._registries = weakref.WeakSet()

        def histogram(name, doc, labels=(), buckets=LATENCY_BUCKETS_US):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.request_latency = histogram(
            _PREFIX + "request_latency", "Distribution of wall time (in microseconds) for "
            "Tensorflow Serving request.", ("model_name", "API", "entrypoint"))
        self.runtime_latency = histogram(
            _PREFIX + "runtime_latency", "Distribution of wall time (in microseconds) for "
            "Tensorflow runtime.", ("model_name", "API", "runtime"))
        batching = _PREFIX + "batching_session:"
        self.input_batch_size = histogram(
            batching + "input_batch_size", "Tracks the batch size distribution on the inputs.",
            buckets=BATCH_BUCKETS)
        self.processed_batch_size = histogram(
            batching + "processed_batch_size", "Tracks the batch size distribution on "
            "processing.", buckets=BATCH_BUCKETS)
        self.padding_size = histogram(
            batching + "padding_size", "Tracks the padding size distribution on batches.",
            ("execution_batch_size",), buckets=BATCH_BUCKETS)
        self.registry.register(self)

    # -- recording -------------------------------------------------------------------
    def watch(self, registry):
        """Reads version states and served names from a `ModelRegistry` (held weakly)."""
        self._registries.add(registry)

    def request(self, model_name, status, *, api, entrypoint, seconds, signature_name=""):
        """One finished request: its final status code name ("OK", ...) and wall time.

        Names no watched registry serves are counted as "(unknown)", so a client sending
        made-up model or signature names cannot grow the series without bound.
        """
        registries = list(self._registries)
        if model_name and not any(r.serves(model_name) for r in registries):
            model_name = UNKNOWN
        if signature_name and not any(r.serves(model_name, signature_name) for r in registries):
            signature_name = UNKNOWN
        with self._lock:
            self._requests[(model_name or "", status, signature_name or "")] += 1
        if status == "OK":  # TF Serving records the latency of successful requests only
            self.request_latency.labels(model_name or "", api, entrypoint).observe(
                seconds * 1e6)

    def runtime(self, model_name, seconds, api="Predict"):
        self.runtime_latency.labels(model_name, api, "TF2").observe(seconds * 1e6)

    def batch(self, inputs, processed):
        """One merged batch: the requests' batch sizes and the padded size it ran at."""
        for n in inputs:
            self.input_batch_size.observe(n)
        self.processed_batch_size.observe(processed)
        self.padding_size.labels(str(processed)).observe(processed - sum(inputs))

    def load(self, model_path, ok: bool):
        with self._lock:
            self._loads[(model_path, "success" if ok else "fail")] += 1

    # -- exposing ----------------------------------------------------------------------
    def collect(self):
        """The counts and states, under their exact names (prometheus_client's collector API)."""
        with self._lock:
            requests, loads = dict(self._requests), dict(self._loads)
        states = {(name, str(v), s): 1 for r in list(self._registries)
                  for (name, v), s in r.version_states().items()}
        families = [
            (_PREFIX + "request_count", "The total number of requests.",
             ("model_name", "status", "signature_name"), requests),
            (":tensorflow:cc:saved_model:load_attempt_count",
             "The number of times a SavedModel was successfully loaded.",
             ("model_path", "status"), loads),
            (":tfadv:serving:model_version_state",
             "1 for the state each version of each model is in.",
             ("model_name", "version", "state"), states),
        ]
        for name, doc, labels, values in families:
            metric = Metric(name, doc, "unknown")
            for key, value in sorted(values.items()):
                metric.add_sample(name, dict(zip(labels, key)), value)
            yield metric

    def exposition(self) -> bytes:
        """Prometheus' text format (version 0.0.4)."""
        return generate_latest(self.registry)


METRICS = ServingMetrics()
