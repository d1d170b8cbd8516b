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

Example:

```python
from tfadv.serving import Client, ModelServer

with ModelServer("exported/facenet", name="facenet", port=0, rest_port=0) as server:
    emb = Client(server.grpc_target, name="facenet").embed(images)
```
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import logging
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import zlib
from concurrent import futures

import numpy as np

from tfadv.export import contract as C
from tfadv.export.batching import BatchingParameters
from tfadv.serving import config as cfg
from tfadv.serving.batcher import check_alive
from tfadv.serving.errors import ServingError, invalid, not_found
from tfadv.serving.models import ModelRegistry

log = logging.getLogger("tfadv.serving")

_MB = 1 << 20


def _grpc_modules():
    import grpc
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    return (grpc, get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
            predict_pb2, prediction_service_pb2_grpc)


def _version_of(spec):
    version = spec.version.value if spec.HasField("version") else None
    return version, (spec.version_label or None)


def _metadata_response(registry, request):
    from tensorflow_serving.apis import get_model_metadata_pb2

    fields = list(request.metadata_field)
    if not fields:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field; "
                      "use metadata_field: ['signature_def'].")
    unsupported = [f for f in fields if f != "signature_def"]
    if unsupported:
        raise invalid(f"Metadata field(s) {unsupported} not supported; only 'signature_def' is.")
    servable = registry.lookup(request.model_spec.name, *_version_of(request.model_spec))
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    defs = get_model_metadata_pb2.SignatureDefMap()
    for key, sig_def in servable.signature_defs.items():
        defs.signature_def[key].CopyFrom(sig_def)
    response.metadata["signature_def"].Pack(defs)
    return response


def _status_response(registry, name, version=None, label=None):
    from tensorflow_serving.apis import get_model_status_pb2, status_pb2

    codes = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state in registry.status(name, version, label):
        entry = response.model_version_status.add()
        entry.version = version
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
        code = codes.values_by_name.get(state.error_code, codes.values_by_name["UNKNOWN"])
        entry.status.error_code = code.number
        entry.status.error_message = state.error_message
    return response


def _predict(registry, request, deadline=None, alive=None):
    from tensorflow_serving.apis import predict_pb2

    from tfadv.serving.tensors import to_numpy, to_tensor_proto

    check_alive(deadline, alive, "before it was decoded")  # e.g. it waited for a worker
    servable = registry.lookup(request.model_spec.name, *_version_of(request.model_spec))
    signature_name = request.model_spec.signature_name or C.SERVING_SIGNATURE
    servable.signature(signature_name)  # NOT_FOUND before any input is decoded
    inputs = {k: to_numpy(v, f"input '{k}'") for k, v in request.inputs.items()}
    outputs = servable.predict(signature_name, inputs, tuple(request.output_filter),
                               deadline=deadline, alive=alive)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
        to_tensor_proto(value, out=response.outputs[key])
    return response


_SHUTTING_DOWN = "The server is shutting down; retry on another server or after it restarts."


def _guard(server, context, fn, *args):
    """Runs a handler; ServingErrors become their status code, anything else INTERNAL."""
    import grpc

    if not server._enter():
        context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
    try:
        return fn(*args)
    except ServingError as err:
        context.abort(err.grpc_code, err.message)
    except Exception as err:  # the server must survive any request
        log.exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
    finally:
        server._leave()


def _liveness(context):
    """(deadline in `time.monotonic()` seconds or None, alive check) of a gRPC call."""
    remaining = context.time_remaining()  # about 9.2e18 s for a call without a deadline
    deadline = None if remaining is None or remaining > 1e9 else time.monotonic() + remaining
    return deadline, context.is_active


def _servicers(server):
    (_, _, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _grpc_modules()
    registry = server.registry

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC method names)
            return _guard(server, context, _predict, registry, request, *_liveness(context))

        def GetModelMetadata(self, request, context):  # noqa: N802
            return _guard(server, context, _metadata_response, registry, request)

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):  # noqa: N802
            spec = request.model_spec
            return _guard(server, context, _status_response, registry, spec.name,
                          *_version_of(spec))

    return PredictionService(), ModelService()


# ---------------------------------------------------------------- REST

_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                    r"(?P<tail>/metadata|:[a-zA-Z]+)?/?$")


def _json_array(values, spec, key):
    try:
        array = np.asarray(values)
    except ValueError:
        raise invalid(f"Input '{key}' is ragged; every example must have shape "
                      f"{spec.describe()}.") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise invalid(f"Input '{key}' must be numbers (expected {spec.describe()}).")
    if array.size and np.dtype(spec.dtype).kind in "iu":
        if array.dtype.kind == "f" and not np.all(np.floor(array) == array):
            raise invalid(f"Input '{key}' expects integers (expected {spec.describe()}).")
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise invalid(f"Input '{key}' has values outside [{info.min}, {info.max}] "
                          f"(expected {spec.describe()}).")
    if array.size == 0 and spec.shape is not None and len(spec.shape) > 1:
        array = array.reshape((0,) + tuple(d or 0 for d in spec.shape[1:]))
    return array.astype(spec.dtype, copy=False)


def _rest_predict(registry, name, version, label, body, alive=None):
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(f"The request body is not valid JSON: {err}.") from None
    except RecursionError:
        raise invalid("The request body nests JSON arrays or objects too deeply.") from None
    if not isinstance(request, dict):
        raise invalid("The request body must be a JSON object with 'instances' or 'inputs'.")
    servable = registry.lookup(name, version, label)
    signature_name = request.get("signature_name") or C.SERVING_SIGNATURE
    sig = servable.signature(signature_name)
    row = "instances" in request
    if row == ("inputs" in request):
        raise invalid("Missing 'inputs' or 'instances' key" if not row else
                      "Send either 'instances' (row format) or 'inputs' (columnar), not both.")
    keys = list(sig.inputs)
    if row:
        rows = request["instances"]
        if not isinstance(rows, list):
            raise invalid("'instances' must be a list with one entry per example.")
        if rows and all(isinstance(r, dict) for r in rows):
            columns = {}
            for r in rows:
                for k, v in r.items():
                    columns.setdefault(k, []).append(v)
            if any(len(c) != len(rows) for c in columns.values()):
                raise invalid("Every instance must name the same inputs "
                              f"(expected {sig.describe_inputs()}).")
        elif len(keys) == 1 and not any(isinstance(r, dict) for r in rows):
            columns = {keys[0]: rows}
        else:
            raise invalid(f"Each instance must be an object with the inputs "
                          f"{sig.describe_inputs()}.")
    else:
        given = request["inputs"]
        if isinstance(given, dict):  # values are arrays, so an object always names inputs
            columns = given
        elif len(keys) == 1:
            columns = {keys[0]: given}
        else:
            raise invalid(f"'inputs' must be an object with the inputs {sig.describe_inputs()}.")
    sig.check_names(columns)
    arrays = {k: _json_array(v, sig.inputs[k], k) for k, v in columns.items()}
    output_filter = request.get("output_filter", [])
    if not isinstance(output_filter, list) or not all(isinstance(k, str) for k in output_filter):
        raise invalid("'output_filter' must be a list of output names.")
    outputs = servable.predict(signature_name, arrays, tuple(output_filter), alive=alive)
    if row:
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values())).tolist()}
        n = len(next(iter(outputs.values())))
        lists = {k: v.tolist() for k, v in outputs.items()}
        return {"predictions": [{k: lists[k][i] for k in lists} for i in range(n)]}
    if len(outputs) == 1:
        return {"outputs": next(iter(outputs.values())).tolist()}
    return {"outputs": {k: v.tolist() for k, v in outputs.items()}}


class _HTTPRefusal(Exception):
    """A REST request refused for the way its body was sent (statuses outside TF's codes)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_MAX_LINE = 65536  # longest chunk-size or trailer line
_MAX_TRAILERS = 100
_PIECE = 1 << 20  # chunk data is read in pieces, whatever size a chunk claims
_DRAIN_MAX_BYTES = 8 * _MB  # a refused body up to this size is read and dropped ...
_DRAIN_TIMEOUT_S = 2.0  # ... if it keeps arriving; otherwise the connection is closed
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


def _chunks(rfile):
    """Yields the data of a `Transfer-Encoding: chunked` body (RFC 9112 section 7.1)
    in pieces of at most 1 MB, then reads the trailer section.

    Raises:
        _HTTPRefusal: 400 for a malformed or truncated body.
        OSError: when the connection fails or times out.
    """
    while True:
        line = rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE or not line.endswith(b"\n"):
            raise _HTTPRefusal(400, "The chunked request body ended early or has a chunk-size "
                                    "line longer than 64 KB.")
        size_text = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise _HTTPRefusal(400, f"Bad chunk size {size_text[:20]!r} in the chunked request "
                                    "body; expected hexadecimal digits.")
        size = int(size_text, 16)
        if size == 0:
            break
        while size:
            piece = rfile.read(min(size, _PIECE))
            if not piece:
                raise _HTTPRefusal(400, "The chunked request body ended inside a chunk.")
            size -= len(piece)
            yield piece
        if rfile.read(2) != b"\r\n":
            raise _HTTPRefusal(400, "Chunk data in the request body is not followed by CRLF.")
    for _ in range(_MAX_TRAILERS):
        line = rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE or not line.endswith(b"\n"):
            raise _HTTPRefusal(400, "The chunked request body ended inside its trailer section.")
        if line in (b"\r\n", b"\n"):
            return
    raise _HTTPRefusal(400, f"The chunked request body has more than {_MAX_TRAILERS} trailer "
                            "lines.")


def _too_big(limit_mb, what):
    return _HTTPRefusal(413, f"The request body {what} more than the limit of {limit_mb} MB; "
                             "send fewer examples per request (or start the server with a "
                             "larger --max-message-mb).")


def _decompress(body: bytes, codings: list, limit: int, limit_mb) -> bytes:
    """Undoes the request's Content-Encoding, stopping once `limit` bytes are passed.

    Raises:
        _HTTPRefusal: 415 for an unknown coding, 413 when the decoded body is
            over the limit (it is never expanded further), 400 for bad data.
    """
    for coding in reversed(codings):
        if coding == "identity":
            continue
        try:
            if coding in ("gzip", "x-gzip"):
                with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
                    decoded = f.read(limit + 1)
            elif coding == "deflate":
                inflater = zlib.decompressobj()
                decoded = inflater.decompress(body, limit + 1)
                if len(decoded) <= limit and (not inflater.eof or inflater.unused_data):
                    raise zlib.error("truncated data or data after the end of the stream")
            else:
                raise _HTTPRefusal(415, f"Content-Encoding {coding!r} is not supported; send "
                                        "the body uncompressed or with Content-Encoding: gzip.")
        except (OSError, EOFError, zlib.error) as err:
            raise _HTTPRefusal(400, f"The request body is not valid {coding} data ({err}); "
                                    "compress it whole, or drop the Content-Encoding "
                                    "header.") from None
        if len(decoded) > limit:
            raise _too_big(limit_mb, f"decompresses ({coding}) to")
        body = decoded
    return body


def _header_list(headers, name):
    """The comma-separated values of every `name` header, lower-cased."""
    return [v.strip().lower() for line in headers.get_all(name, [])
            for v in line.split(",") if v.strip()]


def _peer_closed(sock) -> bool:
    """Whether the client is gone: its connection was reset (or is no longer usable).

    A FIN alone is not "gone": HTTP allows a client to half-close after
    sending its request(s) and still read the answers (`nc -N`, pipelining
    tools), so end of stream is not a reason to drop a request. A reset
    (a client that aborted, or closed with unread data) is.
    """
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            events = poller.poll(0)
            if any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in events):
                return True
            readable = bool(events)
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        if readable:
            # Peek at the TCP stream itself (TLS too): raises on a reset.
            socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return False
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True


def _to_json(message):
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _rest_handler(server):
    registry = server.registry
    max_body = server.max_message_mb * _MB
    limit_mb = server.max_message_mb

    class Handler(http.server.BaseHTTPRequestHandler):
        """One connection. Per request: frame the body (Content-Length or chunked),
        read it within the limit, decode its Content-Encoding, route, answer. A
        body left unread by a refusal is read and dropped before the answer when
        small, else the connection closes after the answer: what follows on a
        kept-alive connection is always the start of the next request."""

        protocol_version = "HTTP/1.1"
        server_version = "tfadv-serving"
        timeout = 60  # idle keep-alive connections close after this

        def log_message(self, fmt, *args):
            log.debug("rest %s " + fmt, self.address_string(), *args)

        # ------------------------------------------------ the body on the wire

        def _frame(self):
            """Reads the framing headers (sets what is left to read of the body).

            Raises:
                _HTTPRefusal: for framing this server cannot follow; the body's
                    end is then unknown, so the connection closes.
            """
            self._chunked, self._unread, self._lost = None, 0, False
            codings = _header_list(self.headers, "Transfer-Encoding")
            lengths = _header_list(self.headers, "Content-Length")
            if codings:
                if lengths:  # ambiguous framing: the classic request-smuggling shape
                    raise _HTTPRefusal(400, "Send either Content-Length or "
                                            "Transfer-Encoding: chunked, not both.")
                if codings != ["chunked"]:
                    raise _HTTPRefusal(501, f"Transfer-Encoding {', '.join(codings)} is not "
                                            "supported; send the body with Content-Length or "
                                            "Transfer-Encoding: chunked (compress it with "
                                            "Content-Encoding: gzip).")
                self._chunked = _chunks(self.rfile)
            elif lengths:
                if len(set(lengths)) != 1 or not lengths[0].isdigit():
                    raise _HTTPRefusal(400, f"Bad Content-Length {', '.join(lengths)!r}; "
                                            "expected one number of bytes.")
                self._unread = int(lengths[0])

        def _read_body(self) -> bytes:
            """The whole body as sent (b"" when there is none).

            Raises:
                _HTTPRefusal: 413 over the limit (the rest is left to
                    `_finish_body`), 400 when it is malformed or cut short.
            """
            try:
                if self._chunked is not None:
                    parts, total = [], 0
                    for piece in self._chunked:
                        total += len(piece)
                        if total > max_body:
                            raise _too_big(limit_mb, "has")
                        parts.append(piece)
                    self._chunked = None
                    return b"".join(parts)
                if self._unread > max_body:
                    raise _too_big(limit_mb, f"has {self._unread} bytes,")
                want, self._unread = self._unread, 0
                body = self.rfile.read(want) if want else b""
            except OSError as err:  # timed out or reset part-way: the framing is lost
                self._lost = True
                raise _HTTPRefusal(400, f"The request body could not be read ({err}).") from None
            except _HTTPRefusal as err:
                self._lost = err.status != 413
                raise
            if len(body) < want:
                self._lost = True
                raise _HTTPRefusal(400, f"The request body ended after {len(body)} of the "
                                        f"{want} bytes its Content-Length announced.")
            return body

        def _finish_body(self) -> bool:
            """Reads and drops what is left of the body; False if the connection must close."""
            if self._lost:
                return False
            if self._chunked is None and not self._unread:
                return True
            budget = _DRAIN_MAX_BYTES
            try:
                self.connection.settimeout(_DRAIN_TIMEOUT_S)
                if self._chunked is not None:
                    for piece in self._chunked:
                        budget -= len(piece)
                        if budget < 0:
                            return False
                    self._chunked = None
                    return True
                if self._unread > budget:
                    return False
                while self._unread:
                    piece = self.rfile.read(min(self._unread, _PIECE))
                    if not piece:
                        return False
                    self._unread -= len(piece)
                return True
            except (OSError, _HTTPRefusal):
                return False
            finally:
                try:
                    self.connection.settimeout(self.timeout)
                except OSError:
                    pass

        def handle_expect_100(self):
            # Refuse an announced oversized body before the client sends it.
            lengths = _header_list(self.headers, "Content-Length")
            if lengths and lengths[0].isdigit() and int(lengths[0]) > max_body:
                self.close_connection = True
                self._send(413, {"error": _too_big(limit_mb, f"has {lengths[0]} bytes,").message})
                return False
            return super().handle_expect_100()

        # ------------------------------------------------ answers

        def _send(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, status, payload):
            if not self._finish_body():
                self.close_connection = True
            try:
                self._send(status, payload)
            except OSError:
                self.close_connection = True  # the client went away

        def _handle(self, method):
            try:
                self._frame()
            except _HTTPRefusal as err:
                self._lost = True
                self._answer(err.status, {"error": err.message})
                return
            if not server._enter():
                self.close_connection = True
                self._answer(503, {"error": _SHUTTING_DOWN})
                return
            try:
                status, payload = 200, self._route(method)
            except _HTTPRefusal as err:
                status, payload = err.status, {"error": err.message}
            except ServingError as err:
                status, payload = err.http_status, {"error": err.message}
            except Exception as err:  # the server must survive any request
                log.exception("REST request failed")
                status, payload = 500, {"error": f"{type(err).__name__}: {err}"}
            finally:
                server._leave()
            self._answer(status, payload)

        def _route(self, method):
            path = self.path.split("?", 1)[0]
            m = _ROUTE.match(path)
            body = self._read_body()  # whatever the method: the next request starts after it
            if body:
                body = _decompress(body, _header_list(self.headers, "Content-Encoding"),
                                   max_body, limit_mb)
            if m is None:
                raise not_found(f"Malformed request: {method} {path}")
            name, label, tail = m["name"], m["label"], m["tail"]
            version = None
            if m["version"] is not None:
                if not m["version"].isdigit():
                    raise not_found(f"Malformed request: {method} {path} (versions are integers)")
                version = int(m["version"])
            if method == "GET" and tail is None:
                return _to_json(_status_response(registry, name, version, label))
            if method == "GET" and tail == "/metadata":
                servable = registry.lookup(name, version, label)
                defs = {k: _to_json(v) for k, v in servable.signature_defs.items()}
                return {"model_spec": {"name": servable.name, "signature_name": "",
                                       "version": str(servable.version)},
                        "metadata": {"signature_def": {"signature_def": defs}}}
            if method == "POST" and tail == ":predict":
                # REST has no deadline; a client that has hung up is not waited for.
                connection = self.connection
                return _rest_predict(registry, name, version, label, body,
                                     alive=lambda: not _peer_closed(connection))
            if method == "POST" and tail in (":classify", ":regress"):
                raise ServingError("UNIMPLEMENTED", f"{tail[1:]} is not served; use :predict.")
            raise not_found(f"Malformed request: {method} {path}")

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        # Other methods get a JSON 404 like any unknown route, after their body is read.
        def do_PUT(self):  # noqa: N802
            self._handle("PUT")

        def do_DELETE(self):  # noqa: N802
            self._handle("DELETE")

        def do_PATCH(self):  # noqa: N802
            self._handle("PATCH")

    return Handler


# ---------------------------------------------------------------- the server


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

    Raises:
        FileNotFoundError: for a missing base directory, config or TLS file.
        ValueError: for bad options.
    """

    def __init__(self, base_dir=None, *, name=C.DEFAULT_MODEL_NAME, host=C.DEFAULT_HOST,
                 port=C.DEFAULT_GRPC_PORT, rest_port=C.DEFAULT_REST_PORT,
                 model_config_file=None, batching: BatchingParameters | None = None,
                 max_batch_size: int | None = None, poll_interval: float = 1.0,
                 workers: int = 64, max_message_mb: int = 256, tls_cert=None, tls_key=None,
                 tls_client_ca=None, warmup: bool = True):
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
        grpc = _grpc_modules()[0]
        (_, _, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _grpc_modules()
        self.registry.poll()
        for c in self.configs:
            if not self.registry.model(c.name).available:
                log.warning("model %s: no version in %s yet; waiting for one", c.name,
                            c.base_path)
        options = [("grpc.max_receive_message_length", self.max_message_mb * _MB),
                   ("grpc.max_send_message_length", self.max_message_mb * _MB),
                   ("grpc.so_reuseport", 0)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers,
                                                        thread_name_prefix="grpc"),
                             options=options)
        prediction, models = _servicers(self)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(models, server)
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
        handler = _rest_handler(self)

        class HTTPServer(http.server.ThreadingHTTPServer):
            address_family = (__import__("socket").AF_INET6 if ":" in self.host
                              else __import__("socket").AF_INET)
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
