"""REST bodies as HTTP clients send them: gzip, chunked, oversized, malformed; the
connection stays in step whatever the answer."""

import gzip
import json
import socket
import tracemalloc
import zlib

import numpy as np
import pytest

from test_export import SIZE, export_embedder, pixels
from tfadv.export import contract as C
from tfadv.serving import ModelServer
from tfadv.serving.http_body import HTTPRefusal, decompress

NAME = "faces"
LIMIT_MB = 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    model, _, base = export_embedder(root, NAME)
    with ModelServer(base, name=NAME, port=0, rest_port=0, max_message_mb=LIMIT_MB,
                     poll_interval=0, warmup=False) as server:
        yield model, server


X = pixels(2)
PAYLOAD = json.dumps({"instances": X.round(3).tolist()}).encode()
PREDICT = f"/v1/models/{NAME}:predict"


class Connection:
    """One raw HTTP/1.1 connection: send bytes, read answers one by one."""

    def __init__(self, server):
        host, port = server.rest_url.rsplit("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def answer(self):
        """(status, headers (lower-cased names), JSON body) of the next answer."""
        line = self.file.readline()
        assert line.startswith(b"HTTP/1.1 "), line
        status = int(line.split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", 0)))
        return status, headers, json.loads(body) if body else None

    def closed_by_server(self):
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.file.close()
        self.sock.close()


def request(method="POST", path=PREDICT, body=b"", headers=(), length=True):
    head = [f"{method} {path} HTTP/1.1", "Host: test"]
    if length:
        head.append(f"Content-Length: {len(body)}")
    head += list(headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(body, sizes=(7, 100, 1)):
    out, i, k = b"", 0, 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        piece = body[i:i + n]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        i, k = i + n, k + 1
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


def expected(model):
    return model(np.asarray(json.loads(PAYLOAD)["instances"], np.float32)).numpy()


def assert_in_step(conn, model):
    """The next valid request on this connection gets its own answer."""
    conn.send(request(body=PAYLOAD))
    status, _, answer = conn.answer()
    assert status == 200, answer
    np.testing.assert_allclose(answer["predictions"], expected(model), atol=1e-5)


# ------------------------------------------------------------------ accepted bodies


@pytest.mark.parametrize("coding,compress", [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
    ("gzip, identity", gzip.compress),
])
def test_compressed_bodies_are_decoded(served, coding, compress):
    model, server = served
    conn = Connection(server)
    conn.send(request(body=compress(PAYLOAD), headers=[f"Content-Encoding: {coding}"]))
    status, _, answer = conn.answer()
    assert status == 200, answer
    np.testing.assert_allclose(answer["predictions"], expected(model), atol=1e-5)
    assert_in_step(conn, model)
    conn.close()


def test_chunked_bodies_are_read_and_the_connection_stays_in_step(served):
    model, server = served
    conn = Connection(server)
    # Chunked, then chunked + gzip, then a plain request: all on one kept-alive connection.
    conn.send(request(body=chunked(PAYLOAD), headers=["Transfer-Encoding: chunked"],
                      length=False))
    conn.send(request(body=chunked(gzip.compress(PAYLOAD), sizes=(50,)),
                      headers=["Transfer-Encoding: chunked", "Content-Encoding: gzip"],
                      length=False))
    for _ in range(2):
        status, headers, answer = conn.answer()
        assert status == 200, answer
        assert headers.get("connection") != "close"
        np.testing.assert_allclose(answer["predictions"], expected(model), atol=1e-5)
    assert_in_step(conn, model)
    conn.close()


def test_a_get_with_a_body_leaves_the_connection_in_step(served):
    model, server = served
    conn = Connection(server)
    conn.send(request("GET", f"/v1/models/{NAME}", body=b'{"junk": "GET /x HTTP/1.1"}'))
    status, _, answer = conn.answer()
    assert status == 200 and answer["model_version_status"][0]["state"] == "AVAILABLE"
    assert_in_step(conn, model)
    conn.send(request("PUT", PREDICT, body=PAYLOAD))
    status, _, answer = conn.answer()
    assert status == 400 and answer["error"] == f"Malformed request: PUT {PREDICT}"
    assert_in_step(conn, model)
    conn.close()


# ------------------------------------------------------------------ refused, still in step


def _bomb(expanded_mb):
    """gzip of `expanded_mb` MB of zeros (about a thousandth of that on the wire)."""
    zero = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join([packer.compress(zero) for _ in range(expanded_mb)] + [packer.flush()])


@pytest.mark.parametrize("case", [
    ("gzip bomb", _bomb(64), ["Content-Encoding: gzip"], 413, "decompresses"),
    ("unknown coding", PAYLOAD, ["Content-Encoding: br"], 415, "'br' is not supported"),
    ("bad gzip", b"\x1f\x8b\x08\x00garbage", ["Content-Encoding: gzip"], 400, "not valid gzip"),
    ("cut gzip", gzip.compress(PAYLOAD)[:-12], ["Content-Encoding: gzip"], 400,
     "not valid gzip"),
    ("bad deflate", b"not zlib", ["Content-Encoding: deflate"], 400, "not valid deflate"),
    ("not JSON", b"{nope", [], 400, "JSON Parse error: "),
    ("deep JSON", b"[" * 100000, [], 400, "too deeply"),
    ("over the limit", bytes(LIMIT_MB * (1 << 20) + 1), [], 413, "more than the limit"),
], ids=lambda c: c[0])
def test_refused_bodies_get_their_status_and_the_connection_stays_in_step(served, case):
    model, server = served
    _, body, headers, status, message = case
    conn = Connection(server)
    conn.send(request(body=body, headers=headers))
    got, answer_headers, answer = conn.answer()
    assert got == status and message in answer["error"], answer
    assert answer_headers.get("connection") != "close"  # the body was read: keep going
    assert_in_step(conn, model)
    conn.close()


def test_an_oversized_chunked_body_is_refused_with_413(served):
    model, server = served
    conn = Connection(server)
    big = bytes(LIMIT_MB * (1 << 20) + 10)
    conn.send(request(body=chunked(big, sizes=(1 << 16,)), headers=["Transfer-Encoding: chunked"],
                      length=False))
    status, _, answer = conn.answer()
    assert status == 413 and "more than the limit" in answer["error"]
    assert_in_step(conn, model)  # the rest was read and dropped (it is small)
    conn.close()


def test_a_body_too_big_to_drain_is_refused_and_the_connection_closed(served):
    model, server = served
    conn = Connection(server)
    # 64 MB announced, 1 MB sent: answered at once, then closed (never parsed as requests).
    conn.send(request(body=b"", headers=[]).replace(b"Content-Length: 0",
                                                     f"Content-Length: {64 << 20}".encode())
              + b"POST /x HTTP/1.1\r\n" * 1000)
    status, headers, answer = conn.answer()
    assert status == 413 and headers["connection"] == "close"
    assert "more than the limit" in answer["error"]
    assert conn.closed_by_server()
    conn.close()


def test_expect_100_continue_is_refused_before_the_body(served):
    model, server = served
    conn = Connection(server)
    conn.send(request(headers=["Expect: 100-continue"]).replace(
        b"Content-Length: 0", f"Content-Length: {LIMIT_MB * (1 << 20) + 1}".encode()))
    status, headers, answer = conn.answer()
    assert status == 413 and headers["connection"] == "close"
    assert conn.closed_by_server()
    conn.close()
    conn = Connection(server)  # within the limit: 100 Continue, then the answer
    conn.send(request(body=b"", headers=["Expect: 100-continue"]).replace(
        b"Content-Length: 0", f"Content-Length: {len(PAYLOAD)}".encode()))
    assert conn.file.readline().startswith(b"HTTP/1.1 100")
    assert conn.file.readline() == b"\r\n"
    conn.send(PAYLOAD)
    status, _, answer = conn.answer()
    assert status == 200
    assert_in_step(conn, model)
    conn.close()


@pytest.mark.parametrize("case", [
    ("bad length", ["Content-Length: 12abc"], b"", 400, "Bad Content-Length"),
    ("two lengths", ["Content-Length: 5", "Content-Length: 6"], b"hello", 400,
     "Bad Content-Length"),
    ("length and chunked", ["Content-Length: 5", "Transfer-Encoding: chunked"], b"5\r\nhello",
     400, "not both"),
    ("gzip transfer coding", ["Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n", 501,
     "not supported"),
    ("bad chunk size", ["Transfer-Encoding: chunked"], b"zz\r\nhello\r\n0\r\n\r\n", 400,
     "Bad chunk size"),
    ("chunk without CRLF", ["Transfer-Encoding: chunked"], b"5\r\nhelloXX0\r\n\r\n", 400,
     "not followed by CRLF"),
], ids=lambda c: c[0])
def test_unframeable_bodies_are_refused_and_the_connection_closed(served, case):
    _, server = served
    _, headers, body, status, message = case
    conn = Connection(server)
    conn.send(request(body=body, headers=headers, length=False) + request(body=PAYLOAD))
    got, answer_headers, answer = conn.answer()
    assert got == status and message in answer["error"], answer
    assert answer_headers["connection"] == "close"
    assert conn.closed_by_server()  # what followed was never taken for a request
    conn.close()


def test_a_body_cut_short_is_refused_and_the_connection_closed(served):
    _, server = served
    conn = Connection(server)
    conn.send(request(body=PAYLOAD).replace(f"Content-Length: {len(PAYLOAD)}".encode(),
                                            f"Content-Length: {len(PAYLOAD) + 10}".encode()))
    conn.sock.shutdown(socket.SHUT_WR)
    status, headers, answer = conn.answer()
    assert status == 400 and "ended after" in answer["error"]
    assert headers["connection"] == "close"
    conn.close()


def test_decompression_stops_at_the_limit():
    bomb = _bomb(64)
    tracemalloc.start()
    try:
        with pytest.raises(HTTPRefusal) as info:
            decompress(bomb, ["gzip"], 1 << 20, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 413
    assert peak < 8 << 20  # a few MB, not the 64 MB the body expands to
    assert decompress(gzip.compress(b"abc") + gzip.compress(b"def"), ["gzip"], 10, 1) == (
        b"abcdef")  # several gzip members, as `cat a.gz b.gz` makes


def test_grpc_gzip_compressed_requests_are_served_and_limited(served):
    import grpc

    from tfadv.serving import Client

    model, server = served
    with Client(server.grpc_target, name=NAME, retries=0) as client:
        channel = grpc.insecure_channel(server.grpc_target,
                                        compression=grpc.Compression.Gzip)
        client_gz = type(client)(server.grpc_target, name=NAME, retries=0, channel=channel)
        np.testing.assert_allclose(client_gz.embed(X), model(X).numpy(), atol=1e-5)
        # Zeros compress ~1000:1: under the limit on the wire, over it once decompressed.
        big = np.zeros((2 * LIMIT_MB * (1 << 20) // (SIZE[0] * SIZE[1] * 12) + 1, *SIZE, 3),
                       np.float32)
        with pytest.raises(grpc.RpcError) as info:
            client_gz.predict({C.IMAGES: big})
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        np.testing.assert_allclose(client_gz.embed(X), model(X).numpy(), atol=1e-5)
        channel.close()


def test_the_shutdown_answer_reads_the_body_first(served):
    model, server = served
    conn = Connection(server)
    server._draining = True  # what stop() sets while in-flight requests finish
    try:
        conn.send(request(body=PAYLOAD))
        status, headers, answer = conn.answer()
    finally:
        server._draining = False
    assert status == 503 and "shutting down" in answer["error"]
    assert headers["connection"] == "close"
    assert conn.closed_by_server()  # closed after the whole body was read: no reset
    conn.close()
