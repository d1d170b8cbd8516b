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

import http.server
import json
import logging
import re

import numpy as np
from google.protobuf import json_format

from tfadv.export import contract as C
from tfadv.serving.errors import ServingError, invalid, not_found
from tfadv.serving.grpc_service import SHUTTING_DOWN, status_response
from tfadv.serving.http_body import (DRAIN_MAX_BYTES, DRAIN_TIMEOUT_S, MB, PIECE, HTTPRefusal,
                                     chunks, decompress, header_list, peer_closed, too_big)

log = logging.getLogger("tfadv.serving")

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


def _to_json(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def rest_handler(server):
    """The request handler class answering REST requests for `server` (a `ModelServer`)."""
    registry = server.registry
    max_body = server.max_message_mb * MB
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
            except HTTPRefusal as err:
                self._lost = True
                self._answer(err.status, {"error": err.message})
                return
            if not server._enter():
                self.close_connection = True
                self._answer(503, {"error": SHUTTING_DOWN})
                return
            try:
                status, payload = 200, self._route(method)
            except HTTPRefusal as err:
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
                body = decompress(body, header_list(self.headers, "Content-Encoding"),
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
                return _to_json(status_response(registry, name, version, label))
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
                                     alive=lambda: not peer_closed(connection))
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

