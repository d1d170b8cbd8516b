"""The REST gateway of the model server, as TF Serving's HTTP API.

    GET  /v1/models/NAME[/versions/V | /labels/L]            model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/V | /labels/L]:predict    {"instances": ...} or {"inputs": ...}

`rest_handler(server)` is the `http.server` request handler class of a
`ModelServer`; `_rest_predict` turns a JSON predict body into the servable's
inputs and its outputs back into JSON (row or columnar format). Errors are
answered with the matching HTTP status and a body `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import logging
import re
import time

import numpy as np
from google.protobuf import json_format

from tfadv.export import contract as C
from tfadv.serving.errors import ServingError, invalid, not_found
from tfadv.serving.grpc_service import SHUTTING_DOWN, status_response
from tfadv.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tfadv.serving.metrics import METRICS
from tfadv.serving.http_body import (DRAIN_MAX_BYTES, DRAIN_TIMEOUT_S, MB, PIECE, HTTPRefusal,
                                     chunks, decompress, header_list, peer_closed, too_big)

log = logging.getLogger("tfadv.serving")

# TF Serving's two routes (http_rest_api_util.cc), matched whole and ignoring case, on the
# raw path with its query: POST for the verbs, GET for status and metadata. The verb and the
# "metadata" suffix are then compared exactly, as TF Serving does.
_VERSION = r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
_POST_ROUTE = re.compile(r"(?i)/v1/models/(?P<name>[^/:]+)" + _VERSION
                         + r":(?P<verb>classify|regress|predict)")
_GET_ROUTE = re.compile(r"(?i)/v1/models(?:/(?P<name>[^/:]+))?" + _VERSION
                        + r"(?:/(?P<sub>metadata))?")
_API = re.compile(r"(?i)/v1/.*", re.S)
_INT64_MAX = (1 << 63) - 1
_REFUSAL_CODES = {413: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED"}


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _string_values(values, key):
    """JSON values of a string input as bytes: a string is its UTF-8 bytes, an object
    {"b64": "..."} its base64-decoded bytes (TF Serving's convention), at any nesting."""
    if isinstance(values, list):
        return [_string_values(v, key) for v in values]
    if _is_b64(values):
        text = values["b64"]
        if not isinstance(text, str):
            raise invalid(f"Input '{key}': the 'b64' value must be a string of base64.")
        text = "".join(text.split())  # TF Serving's decoder skips whitespace ...
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)  # ... and
            # takes missing padding
        except (binascii.Error, ValueError) as err:
            raise invalid(f"Input '{key}': the 'b64' value is not valid base64 ({err}).") from None
    if isinstance(values, str):
        return values.encode()
    raise invalid(f"Input '{key}' expects strings: JSON strings, or {{\"b64\": \"...\"}} "
                  "objects for binary data such as encoded images.")


def _string_array(values, spec, key):
    try:
        array = np.array(_string_values(values, key), dtype=object)
        ragged = any(isinstance(v, list) for v in array.reshape(-1))
    except ValueError:
        ragged = True
    if ragged:
        raise invalid(f"Input '{key}' is ragged; every example must have shape "
                      f"{spec.describe()}.")
    return array


def _json_array(values, spec, key):
    if spec.dtype == np.object_:
        return _string_array(values, spec, key)
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


def _shown(document) -> str:
    """A request document in an error message, cut as TF Serving cuts it (about 256 bytes)."""
    text = json.dumps(document)
    return text if len(text) <= 256 else text[:256] + "..."


def _rest_predict(registry, name, version, label, body, alive=None, counted=None):
    """A predict body in TF Serving's order of checks: JSON first, then the servable, the
    signature, the request's shape; keys other than signature_name, instances and inputs
    are ignored, as TF Serving ignores them."""
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(f"JSON Parse error: {err}") from None
    except RecursionError:
        raise invalid("JSON Parse error: the request nests JSON arrays or objects too "
                      "deeply.") from None
    if not isinstance(request, dict):
        raise invalid(f"JSON Value: {_shown(request)} Is not object")
    signature_name = request.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid(f"JSON Value: {_shown(request)} not formatted correctly. "
                      "'signature_name' key must be a string value.")
    servable = registry.lookup(name, version, label)
    signature_name = signature_name or C.SERVING_SIGNATURE
    if counted is not None:
        counted["signature"] = signature_name
    sig = servable.signature(signature_name, rest=True)
    row = "instances" in request
    if row and "inputs" in request:
        raise invalid(f"JSON Value: {_shown(request)} Not formatted correctly expecting only "
                      "one of 'inputs' or 'instances' keys to exist ")
    if row and not isinstance(request["instances"], list):
        raise invalid(f"JSON Value: {_shown(request)} Expecting 'instances' to be an list/array")
    if row and not request["instances"]:
        raise invalid(f"JSON Value: {_shown(request)} No values in 'instances' array")
    if not row and "inputs" not in request:
        raise invalid("Missing 'inputs' or 'instances' key")
    keys = list(sig.inputs)
    if row:
        rows = request["instances"]
        named = [isinstance(r, dict) and not _is_b64(r) for r in rows]
        if rows and all(named):
            columns = {}
            for r in rows:
                for k, v in r.items():
                    columns.setdefault(k, []).append(v)
            if any(len(c) != len(rows) for c in columns.values()):
                raise invalid("Every instance must name the same inputs "
                              f"(expected {sig.describe_inputs()}).")
        elif len(keys) == 1 and not any(named):
            columns = {keys[0]: rows}
        else:
            raise invalid(f"Each instance must be an object with the inputs "
                          f"{sig.describe_inputs()}.")
    else:
        given = request["inputs"]
        if isinstance(given, dict) and not _is_b64(given):  # an object names the inputs
            columns = given
        elif len(keys) == 1:
            columns = {keys[0]: given}
        else:
            raise invalid(f"'inputs' must be an object with the inputs {sig.describe_inputs()}.")
    sig.check_names(columns)
    arrays = {k: _json_array(v, sig.inputs[k], k) for k, v in columns.items()}
    outputs = servable.predict(signature_name, arrays, alive=alive)
    lists = {k: _to_json_values(k, v) for k, v in outputs.items()}
    if row:
        if len(lists) == 1:
            return {"predictions": next(iter(lists.values()))}
        n = len(next(iter(lists.values())))
        return {"predictions": [{k: lists[k][i] for k in lists} for i in range(n)]}
    if len(lists) == 1:
        return {"outputs": next(iter(lists.values()))}
    return {"outputs": lists}


def _to_json_values(key, array):
    """An output array as JSON values; strings as TF Serving writes them: {"b64": ...} for
    outputs whose name ends in '_bytes', else as UTF-8 text."""
    array = np.asarray(array)
    if array.dtype != np.object_:
        return array.tolist()
    if key.endswith("_bytes"):
        def convert(v):
            return {"b64": base64.b64encode(v).decode("ascii")}
    else:
        def convert(v):
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return np.frompyfunc(convert, 1, 1)(array).tolist()


def _to_json(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def rest_handler(server):
    """The request handler class answering REST requests for `server` (a `ModelServer`)."""
    registry = server.registry
    metrics_path = getattr(server, "metrics_path", None)
    max_body = server.max_message_mb * MB
    limit_mb = server.max_message_mb

    class Handler(http.server.BaseHTTPRequestHandler):
        """One connection. Per request: frame the body (Content-Length or chunked),
        read it within the limit, decode its Content-Encoding, route, answer. A
        body left unread by a refusal is read and dropped before the answer when
        small, else the connection closes after the answer: what follows on a
        kept-alive connection is always the start of the next request."""

        protocol_version = "HTTP/1.1"
        # Headers and body leave in two writes: with Nagle's algorithm on, the body waits for
        # the client's delayed ACK of the headers (40 ms per answer on Linux).
        disable_nagle_algorithm = True
        server_version = "tfadv-serving"
        timeout = 60  # idle keep-alive connections close after this

        def log_message(self, fmt, *args):
            log.debug("rest %s " + fmt, self.address_string(), *args)

        # ------------------------------------------------ the body on the wire

        def _frame(self):
            """Reads the framing headers (sets what is left to read of the body).

            Raises:
                HTTPRefusal: for framing this server cannot follow; the body's
                    end is then unknown, so the connection closes.
            """
            self._chunked, self._unread, self._lost = None, 0, False
            codings = header_list(self.headers, "Transfer-Encoding")
            lengths = header_list(self.headers, "Content-Length")
            if codings:
                if lengths:  # ambiguous framing: the classic request-smuggling shape
                    raise HTTPRefusal(400, "Send either Content-Length or "
                                            "Transfer-Encoding: chunked, not both.")
                if codings != ["chunked"]:
                    raise HTTPRefusal(501, f"Transfer-Encoding {', '.join(codings)} is not "
                                            "supported; send the body with Content-Length or "
                                            "Transfer-Encoding: chunked (compress it with "
                                            "Content-Encoding: gzip).")
                self._chunked = chunks(self.rfile)
            elif lengths:
                if len(set(lengths)) != 1 or not lengths[0].isdigit():
                    raise HTTPRefusal(400, f"Bad Content-Length {', '.join(lengths)!r}; "
                                            "expected one number of bytes.")
                self._unread = int(lengths[0])

        def _read_body(self) -> bytes:
            """The whole body as sent (b"" when there is none).

            Raises:
                HTTPRefusal: 413 over the limit (the rest is left to
                    `_finish_body`), 400 when it is malformed or cut short.
            """
            try:
                if self._chunked is not None:
                    parts, total = [], 0
                    for piece in self._chunked:
                        total += len(piece)
                        if total > max_body:
                            raise too_big(limit_mb, "has")
                        parts.append(piece)
                    self._chunked = None
                    return b"".join(parts)
                if self._unread > max_body:
                    raise too_big(limit_mb, f"has {self._unread} bytes,")
                want, self._unread = self._unread, 0
                body = self.rfile.read(want) if want else b""
            except OSError as err:  # timed out or reset part-way: the framing is lost
                self._lost = True
                raise HTTPRefusal(400, f"The request body could not be read ({err}).") from None
            except HTTPRefusal as err:
                self._lost = err.status != 413
                raise
            if len(body) < want:
                self._lost = True
                raise HTTPRefusal(400, f"The request body ended after {len(body)} of the "
                                        f"{want} bytes its Content-Length announced.")
            return body

        def _finish_body(self) -> bool:
            """Reads and drops what is left of the body; False if the connection must close."""
            if self._lost:
                return False
            if self._chunked is None and not self._unread:
                return True
            budget = DRAIN_MAX_BYTES
            try:
                self.connection.settimeout(DRAIN_TIMEOUT_S)
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
                    piece = self.rfile.read(min(self._unread, PIECE))
                    if not piece:
                        return False
                    self._unread -= len(piece)
                return True
            except (OSError, HTTPRefusal):
                return False
            finally:
                try:
                    self.connection.settimeout(self.timeout)
                except OSError:
                    pass

        def handle_expect_100(self):
            # Refuse an announced oversized body before the client sends it.
            lengths = header_list(self.headers, "Content-Length")
            if lengths and lengths[0].isdigit() and int(lengths[0]) > max_body:
                self.close_connection = True
                self._send(413, {"error": too_big(limit_mb, f"has {lengths[0]} bytes,").message})
                return False
            return super().handle_expect_100()

        # ------------------------------------------------ answers

        def _send(self, status, payload, content_type="application/json"):
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, status, payload, content_type="application/json"):
            if not self._finish_body():
                self.close_connection = True
            try:
                self._send(status, payload, content_type)
            except OSError:
                self.close_connection = True  # the client went away

        def _handle(self, method):
            try:
                self._frame()
            except HTTPRefusal as err:
                self._lost = True
                self._answer(err.status, {"error": err.message})
                return
            if (metrics_path is not None and method == "GET"
                    and self.path.split("?", 1)[0] == metrics_path):
                self._answer(200, METRICS.exposition(), METRICS_CONTENT_TYPE)
                return
            if not server._enter():
                self.close_connection = True
                self._answer(503, {"error": SHUTTING_DOWN})
                return
            start, self._counted = time.perf_counter(), {"model": "", "api": method.lower(),
                                                         "signature": ""}
            try:
                status, payload, code = 200, self._route(method), "OK"
            except HTTPRefusal as err:
                status, payload = err.status, {"error": err.message}
                code = _REFUSAL_CODES.get(err.status, "INVALID_ARGUMENT")
            except ServingError as err:
                status, payload, code = err.http_status, {"error": err.message}, err.code
            except Exception as err:  # the server must survive any request
                log.exception("REST request failed")
                status, payload = 500, {"error": f"{type(err).__name__}: {err}"}
                code = "INTERNAL"
            finally:
                server._leave()
            counted = self._counted  # before the answer: a client that reads it may scrape
            METRICS.request(counted["model"], code, api=counted["api"], entrypoint="REST",
                            signature_name=counted["signature"],
                            seconds=time.perf_counter() - start)
            self._answer(status, payload)

        def _route(self, method):
            path = self.path  # raw, query included: TF Serving routes on it whole
            body = self._read_body()  # whatever the method: the next request starts after it
            if body:
                body = decompress(body, header_list(self.headers, "Content-Encoding"),
                                   max_body, limit_mb)
            if not _API.fullmatch(path):
                raise not_found(f"Not Found: {method} {path} (the API lives under /v1/models)")
            malformed = invalid(f"Malformed request: {method} {path}")
            m = {"POST": _POST_ROUTE, "GET": _GET_ROUTE}.get(method)
            m = m.fullmatch(path) if m is not None else None
            if m is None:
                raise malformed
            name, label = m["name"], m["label"]
            self._counted.update(model=name or "", api=m.groupdict().get("verb") or (
                "metadata" if m.groupdict().get("sub") == "metadata" else "status"))
            version = None
            if m["version"] is not None:
                version = int(m["version"])
                if version > _INT64_MAX:
                    raise invalid(f"Failed to convert version: {m['version']} to numeric.")
            if method == "POST":
                if m["verb"] == "predict":
                    # REST has no deadline; a client that has hung up is not waited for.
                    connection = self.connection
                    return _rest_predict(registry, name, version, label, body,
                                         alive=lambda: not peer_closed(connection),
                                         counted=self._counted)
                if m["verb"] in ("classify", "regress"):
                    raise ServingError("UNIMPLEMENTED", f"{m['verb']} is not served; the "
                                                        "exported signatures are predict ones.")
                raise malformed  # the verb is compared exactly: ":PREDICT" is malformed
            if not name:
                raise invalid("Missing model name in request.")
            if m["sub"] == "metadata":
                servable = registry.lookup(name, version, label)
                defs = {k: _to_json(v) for k, v in servable.signature_defs.items()}
                return {"model_spec": {"name": servable.name, "signature_name": "",
                                       "version": str(servable.version)},
                        "metadata": {"signature_def": {"signature_def": defs}}}
            # Any other GET that matched is the model status (labels ignored, as TF Serving).
            return _to_json(status_response(registry, name, version, None))

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

        def _empty(self, status):
            """An answer without a body, after the request's body was read."""
            self._frame()
            self._finish_body()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):  # noqa: N802
            # TF Serving: no route takes HEAD (400 Malformed request); a HEAD answer has no body.
            self._empty(400)

        def do_OPTIONS(self):  # noqa: N802
            # A CORS preflight, as TF Serving answers it without --enable_cors_support: 200
            # when an Origin is given, else 400; both with an empty body.
            self._empty(200 if re.search(r"https?://", self.headers.get("Origin", "")) else 400)

    return Handler

