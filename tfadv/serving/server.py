"""A model server speaking TensorFlow Serving's gRPC and REST protocols.

gRPC: `tensorflow.serving.PredictionService/Predict`, `/GetModelMetadata` and
`tensorflow.serving.ModelService/GetModelStatus`, so the stock
`tensorflow_serving.apis` stubs (and TF Serving clients in any language) work
unchanged. REST, as TF Serving's HTTP gateway:

    GET  /v1/models/NAME[/versions/V | /labels/L]            model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/V | /labels/L]:predict    {"instances": ...} or {"inputs": ...}

Errors carry TF Serving's status codes (NOT_FOUND for an unknown model,
version or signature; INVALID_ARGUMENT, with the expected spec, for a request
that does not fit the signature) and over REST the matching HTTP status with
a body `{"error": "..."}`. The server keeps serving after any bad request.

REST bodies may be sent with `Content-Length` or `Transfer-Encoding: chunked`,
and compressed with `Content-Encoding: gzip` (or `deflate`); the size limit
(`max_message_mb`) applies to the body on the wire and again after
decompression, which stops as soon as the limit is passed (413). Every
answer leaves the connection in step: the body is read (or, when it is too
big to read, the connection is closed after the answer), so a refused
request is never parsed as the next one.

A request whose gRPC deadline has passed, or whose client has cancelled or
disconnected, is dropped before it reaches the model (DEADLINE_EXCEEDED), also
from the batching queue.

This module runs the server (`ModelServer`, `serve`); the gRPC services are
in `tfadv.serving.grpc_service`, the REST gateway in `tfadv.serving.rest`
and the reading of REST request bodies in `tfadv.serving.http_body`.

Example:

```python
from tfadv.serving import Client, ModelServer

with ModelServer("exported/facenet", name="facenet", port=0, rest_port=0) as server:
    emb = Client(server.grpc_target, name="facenet").embed(images)
```
"""

from __future__ import annotations

import http.server
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from concurrent import futures

import grpc

from tfadv.export import contract as C
from tfadv.export.batching import BatchingParameters
from tfadv.serving import config as cfg
from tfadv.serving.grpc_service import add_services
from tfadv.serving.http_body import MB
from tfadv.serving.metrics import read_monitoring_config
from tfadv.serving.models import ModelRegistry
from tfadv.serving.rest import rest_handler

log = logging.getLogger("tfadv.serving")


class ModelServer:
    """gRPC + REST model server over TF Serving base directories.

    Args:
        base_dir: the model's base directory (numbered SavedModel versions);
            leave None when `model_config_file` is given.
        name: the model name requests address.
        host: interface to bind; 127.0.0.1 unless told otherwise.
        port: gRPC port; 0 picks a free one (see `.port` after `start()`).
        rest_port: REST port; 0 picks a free one; None turns REST off.
        model_config_file: a ModelServerConfig text file (TF Serving's
            --model_config_file) listing the models instead of `base_dir`.
        batching: `BatchingParameters` to merge concurrent requests into one
            model call; None serves every request on its own.
        max_batch_size: the largest batch one request may carry; default:
            `batching.max_batch_size` with batching, else 256.
        poll_interval: seconds between scans for new versions (0: never).
        workers: gRPC worker threads (concurrent requests in flight).
        max_message_mb: gRPC message and REST body size limit.
        tls_cert, tls_key: PEM files; with both, gRPC and REST use TLS.
        tls_client_ca: PEM file; with it, clients must present a certificate
            signed by this CA.
        warmup: replay each version's warm-up requests before serving it.
        monitoring_config_file: TF Serving's MonitoringConfig text file; with
            `prometheus_config { enable: true }` the REST port serves the
            metrics of `tfadv.serving.metrics` at its path (default
            /monitoring/prometheus/metrics).

    Raises:
        FileNotFoundError: for a missing base directory, config or TLS file.
        ValueError: for bad options.
    """

    def __init__(self, base_dir=None, *, name=C.DEFAULT_MODEL_NAME, host=C.DEFAULT_HOST,
                 port=C.DEFAULT_GRPC_PORT, rest_port=C.DEFAULT_REST_PORT,
                 model_config_file=None, batching: BatchingParameters | None = None,
                 max_batch_size: int | None = None, poll_interval: float = 1.0,
                 workers: int = 64, max_message_mb: int = 256, tls_cert=None, tls_key=None,
                 tls_client_ca=None, warmup: bool = True, monitoring_config_file=None):
        if (base_dir is None) == (model_config_file is None):
            raise ValueError("Pass exactly one of base_dir and model_config_file. Received: "
                             f"base_dir={base_dir!r}, model_config_file={model_config_file!r}")
        configs = (cfg.read_model_config(model_config_file) if model_config_file
                   else cfg.single_model(base_dir, name))
        for value, what in ((port, "port"), (rest_port, "rest_port")):
            if value is not None and not (isinstance(value, int) and 0 <= value < 65536):
                raise ValueError(f"Expected {what} in [0, 65535] (0: any free port). "
                                 f"Received: {what}={value!r}")
        if rest_port is not None and port != 0 and rest_port == port:
            raise ValueError(f"The gRPC and REST ports must differ. Received: port={port}, "
                             f"rest_port={rest_port}")
        if max_batch_size is None:
            max_batch_size = batching.max_batch_size if batching else 256
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"Expected max_batch_size >= 1. Received: {max_batch_size!r}")
        if batching is not None and max_batch_size > batching.max_batch_size:
            raise ValueError(
                f"max_batch_size={max_batch_size} exceeds the batching max_batch_size="
                f"{batching.max_batch_size}; a request must fit in one batch.")
        if poll_interval < 0:
            raise ValueError(f"Expected poll_interval >= 0. Received: {poll_interval}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files).")
        self._tls = None
        if tls_cert is not None:
            self._tls = tuple(_read(p) for p in (tls_key, tls_cert))
            self._tls_paths = (tls_cert, tls_key, tls_client_ca)
            self._client_ca = _read(tls_client_ca) if tls_client_ca else None
        self.metrics_path = (read_monitoring_config(monitoring_config_file)
                             if monitoring_config_file else None)
        if self.metrics_path is not None and rest_port is None:
            raise ValueError("Prometheus metrics are served on the REST port: give a REST port "
                             "(or leave the monitoring config out).")
        self.host = host
        self.configs = configs
        self.registry = ModelRegistry(configs, max_batch_size=max_batch_size,
                                      batching=batching, warmup=warmup)
        self.poll_interval = poll_interval
        self.workers = workers
        self.max_message_mb = max_message_mb
        self._requested = (port, rest_port)
        self.port = None
        self.rest_port = None
        self._grpc = None
        self._httpd = None
        self._http_thread = None
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self._draining = False
        self._stopped = threading.Event()

    # Requests in flight (gRPC and REST), so stop() can wait for them.
    def _enter(self) -> bool:
        with self._inflight_cond:
            if self._draining:
                return False
            self._inflight += 1
            return True

    def _leave(self):
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()

    @property
    def grpc_target(self) -> str:
        """'host:port' of the gRPC endpoint (after `start()`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def rest_url(self) -> str | None:
        """Base URL of the REST endpoint (after `start()`), None if REST is off."""
        if self.rest_port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls else 'http'}://{host}:{self.rest_port}"

    def start(self) -> "ModelServer":
        """Loads the newest versions, then opens the ports. Returns self."""
        self.registry.poll()
        for c in self.configs:
            if not self.registry.model(c.name).available:
                log.warning("model %s: no version in %s yet; waiting for one", c.name,
                            c.base_path)
        options = [("grpc.max_receive_message_length", self.max_message_mb * MB),
                   ("grpc.max_send_message_length", self.max_message_mb * MB),
                   ("grpc.so_reuseport", 0)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers,
                                                        thread_name_prefix="grpc"),
                             options=options)
        add_services(server, self)
        host = f"[{self.host}]" if ":" in self.host else self.host
        address = f"{host}:{self._requested[0]}"
        try:
            if self._tls:
                creds = grpc.ssl_server_credentials(
                    [self._tls], root_certificates=self._client_ca,
                    require_client_auth=self._client_ca is not None)
                bound = server.add_secure_port(address, creds)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            self.registry.close()
            raise ValueError(f"Could not bind the gRPC port {address}; is another server using "
                             "it? Pick another port (0 picks a free one).")
        self.port = bound
        if self._requested[1] is not None:
            try:
                self._start_rest()
            except OSError as err:
                server.stop(None)  # releases the gRPC port bound above
                self.registry.close()
                raise ValueError(f"Could not bind the REST port {self._requested[1]} ({err}); "
                                 "pick another port (0 picks a free one).") from None
        server.start()
        self._grpc = server
        self.registry.start_polling(self.poll_interval)
        return self

    def _start_rest(self):
        handler = rest_handler(self)

        class HTTPServer(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            daemon_threads = True  # idle keep-alive connections must not block exit
            request_queue_size = 128

        httpd = HTTPServer((self.host, self._requested[1]), handler)
        if self._tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self._tls_paths[0], self._tls_paths[1])
            if self._tls_paths[2]:
                ctx.load_verify_locations(self._tls_paths[2])
                ctx.verify_mode = ssl.CERT_REQUIRED
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self.rest_port = httpd.server_address[1]
        self._httpd = httpd
        self._http_thread = threading.Thread(target=httpd.serve_forever, name="rest",
                                             kwargs={"poll_interval": 0.2}, daemon=True)
        self._http_thread.start()

    def stop(self, grace: float = 10.0):
        """Graceful shutdown: requests already running finish (up to `grace`
        seconds), requests arriving meanwhile get UNAVAILABLE (HTTP 503), then
        the ports close and the models are released.

        A call that reaches gRPC's transport in the instant the listener
        closes may still be refused by gRPC itself (CANCELLED) before this
        server sees it; clients should treat both codes as "try again".
        """
        if self._stopped.is_set():
            return
        deadline = time.monotonic() + grace
        with self._inflight_cond:
            self._draining = True
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cond.wait(deadline - time.monotonic())
        done = None
        if self._grpc is not None:
            done = self._grpc.stop(max(0.5, deadline - time.monotonic()))
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if done is not None:
            done.wait()
        self.registry.close()
        self._stopped.set()

    def wait(self, timeout=None) -> bool:
        """Blocks until `stop()` has finished; returns whether it did."""
        return self._stopped.wait(timeout)

    def wait_for_version(self, version: int, name: str | None = None, timeout: float = 30.0):
        """Blocks until `version` of the model is being served.

        Raises:
            TimeoutError: if it is not within `timeout` seconds.
        """
        name = name or self.configs[0].name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if version in self.registry.model(name).available:
                return
            time.sleep(0.05)
        raise TimeoutError(f"Version {version} of model {name!r} was not loaded within "
                           f"{timeout} s.")

    def __enter__(self):
        return self.start() if self._grpc is None else self

    def __exit__(self, *exc):
        self.stop()


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"No TLS file at {path!r}; pass PEM files.") from None


def serve(base_dir=None, *, name=C.DEFAULT_MODEL_NAME, port=C.DEFAULT_GRPC_PORT,
          rest_port=C.DEFAULT_REST_PORT, host=C.DEFAULT_HOST, grace: float = 30.0,
          out=None, **options) -> int:
    """Serves until SIGTERM or SIGINT, then finishes in-flight requests and returns 0.

    Args:
        base_dir, name, port, rest_port, host: as in `ModelServer`.
        grace: seconds in-flight requests get to finish on shutdown.
        out: stream for the one-line startup and shutdown notes (default stdout).
        **options: the other `ModelServer` arguments (model_config_file,
            batching, max_batch_size, poll_interval, workers, tls_cert, ...).

    Returns:
        0, the process exit code.
    """
    out = out or sys.stdout
    server = ModelServer(base_dir, name=name, port=port, rest_port=rest_port, host=host,
                         **options).start()
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for c in server.configs:
            versions = sorted(server.registry.model(c.name).available)
            print(f"serving model '{c.name}' versions {versions} from {c.base_path}",
                  file=out, flush=True)
        rest = f", REST on {server.rest_url}" if server.rest_url else ""
        if server.metrics_path:
            rest += f", metrics at {server.rest_url}{server.metrics_path}"
        print(f"gRPC on {server.grpc_target}{rest}", file=out, flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down: finishing in-flight requests", file=out, flush=True)
        server.stop(grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop(grace)
    return 0
