"""Requests whose deadline passed or whose client left are never computed (batcher, gRPC, REST)."""

import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from test_export import pixels, tiny_embedder
from tfadv.export import BatchingParameters, export_model
from tfadv.serving import Client, ModelServer
from tfadv.serving.batcher import Batcher
from tfadv.serving.errors import ServingError

NAME = "faces"


class SlowFn:
    """Doubles its input; the first call blocks until `release` is set; records what it saw."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.seen = []  # the inputs of every call, in order
        self.lock = threading.Lock()

    def __call__(self, inputs):
        with self.lock:
            self.seen.append(inputs["x"].copy())
        self.started.set()
        self.release.wait(30)
        return {"y": inputs["x"] * 2}

    def examples(self):
        return np.concatenate(self.seen)[:, 0].tolist() if self.seen else []


def _submit_all(batcher, values, **kwargs):
    """Submits one 1-example task per value from its own thread; returns (threads, results)."""
    results = {}

    def call(v):
        try:
            results[v] = batcher.submit({"x": np.full((1, 1), float(v))}, 1, **kwargs)
        except ServingError as err:
            results[v] = err

    threads = [threading.Thread(target=call, args=(v,)) for v in values]
    for t in threads:
        t.start()
    return threads, results


def test_batcher_never_runs_expired_tasks_and_answers_the_live_one_behind_them():
    fn = SlowFn()
    batcher = Batcher(fn, BatchingParameters(max_batch_size=4, batch_timeout_micros=0,
                                             num_batch_threads=1))
    # The batch thread is busy with request 0 ...
    first, first_result = _submit_all(batcher, [0])
    assert fn.started.wait(10)
    # ... while 12 requests with a 50 ms deadline queue up behind it, then a live one.
    expired, expired_results = _submit_all(batcher, range(100, 112),
                                           deadline=time.monotonic() + 0.05)
    for t in expired:  # each caller gives up at its deadline, before the model is free
        t.join(10)
        assert not t.is_alive()
    assert fn.examples() == [0.0]
    live, live_result = _submit_all(batcher, [7], deadline=time.monotonic() + 30)
    fn.release.set()
    for t in first + live:
        t.join(10)
    # The model computed request 0 and the live request, and nothing of the 12 expired ones.
    assert fn.examples() == [0.0, 7.0]
    assert live_result[7]["y"].tolist() == [[14.0]]
    assert first_result[0]["y"].tolist() == [[0.0]]
    for err in expired_results.values():
        assert isinstance(err, ServingError) and err.code == "DEADLINE_EXCEEDED"
        assert "deadline passed" in err.message
    batcher.close()
    assert batcher._queued_examples == 0


def test_batcher_drops_tasks_whose_client_left_and_refuses_expired_ones_at_once():
    fn = SlowFn()
    batcher = Batcher(fn, BatchingParameters(max_batch_size=4, batch_timeout_micros=0,
                                             num_batch_threads=1))
    first, _ = _submit_all(batcher, [0])
    assert fn.started.wait(10)
    connected = {"yes": True}
    gone, gone_results = _submit_all(batcher, [1, 2, 3], alive=lambda: connected["yes"])
    live, live_results = _submit_all(batcher, [4], alive=lambda: True)
    while batcher._queued_examples < 4:
        time.sleep(0.001)
    connected["yes"] = False  # the three clients hang up while queued
    for t in gone:
        t.join(10)
        assert not t.is_alive()
    fn.release.set()
    for t in first + live:
        t.join(10)
    assert fn.examples() == [0.0, 4.0]
    assert live_results[4]["y"].tolist() == [[8.0]]
    assert all(e.code == "DEADLINE_EXCEEDED" and "went away" in e.message
               for e in gone_results.values())
    # A deadline already in the past is refused without queueing.
    with pytest.raises(ServingError, match="deadline passed") as info:
        batcher.submit({"x": np.ones((1, 1))}, 1, deadline=time.monotonic() - 1)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert fn.examples() == [0.0, 4.0]
    batcher.close()


def test_batcher_drops_expired_tasks_when_forming_a_batch():
    # Tasks put straight into the queue have no caller waiting on them, so only the batch
    # thread can drop them: it must skip the ones that expired while it was busy.
    fn = SlowFn()
    batcher = Batcher(fn, BatchingParameters(max_batch_size=8, batch_timeout_micros=0,
                                             num_batch_threads=1))
    first, _ = _submit_all(batcher, [0])
    assert fn.started.wait(10)
    from tfadv.serving import batcher as batcher_module

    tasks = [batcher_module._Task({"x": np.full((1, 1), float(v))}, 1,
                                  deadline=time.monotonic() + 0.02) for v in (1, 2)]
    with batcher._cond:
        for task in tasks:
            batcher._queue.append(task)
            batcher._queued_examples += 1
    time.sleep(0.05)
    live, live_results = _submit_all(batcher, [3])
    while batcher._queued_examples < 3:
        time.sleep(0.001)
    fn.release.set()
    for t in first + live:
        t.join(10)
    for task in tasks:
        assert task.done.wait(10) and task.error.code == "DEADLINE_EXCEEDED"
    assert fn.examples() == [0.0, 3.0]
    batcher.close()


# ------------------------------------------------------------------ through the server


@pytest.fixture(params=["batching"])
def slow_server(request, tmp_path, monkeypatch):
    """A server whose model blocks until released and counts the examples it ran: with
    batching (one batch thread), or without batching and with one gRPC worker thread."""
    from tfadv.serving.signature import Signature

    model = tiny_embedder(seed=5)
    base = str(tmp_path / "base")
    export_model(model, base, name=NAME, threshold=0.5)
    real = Signature._call
    state = {"release": threading.Event(), "started": threading.Event(), "seen": [],
             "lock": threading.Lock()}

    def slow(self, inputs):
        with state["lock"]:
            state["seen"].append(len(next(iter(inputs.values()))))
        state["started"].set()
        state["release"].wait(30)
        return real(self, inputs)

    if request.param == "batching":
        options = dict(batching=BatchingParameters(max_batch_size=32, batch_timeout_micros=0,
                                                   num_batch_threads=1))
    else:  # requests wait for the one worker thread instead of in the batching queue
        options = dict(workers=1)
    monkeypatch.setattr(Signature, "_call", slow)  # before the batchers bind it
    server = ModelServer(base, name=NAME, port=0, rest_port=0, max_batch_size=32,
                         warmup=False, **options).start()
    yield model, server, state
    state["release"].set()
    server.stop()


@pytest.mark.parametrize("slow_server", ["batching", "one worker"], indirect=True)
def test_grpc_requests_past_their_deadline_are_not_computed(slow_server):
    model, server, state = slow_server
    errors, answers = [], {}

    def call(i, n, timeout):
        with Client(server.grpc_target, name=NAME, retries=0, timeout=timeout) as client:
            try:
                answers[i] = client.embed(pixels(n, seed=i))
            except grpc.RpcError as err:
                errors.append(err.code())

    blocker = threading.Thread(target=call, args=(0, 1, 60))
    blocker.start()
    assert state["started"].wait(30)
    # 12 concurrent 16-image requests with a 50 ms deadline, while the model is busy.
    expired = [threading.Thread(target=call, args=(i, 16, 0.05)) for i in range(1, 13)]
    for t in expired:
        t.start()
    for t in expired:
        t.join(30)
    assert errors == [grpc.StatusCode.DEADLINE_EXCEEDED] * 12
    live = threading.Thread(target=call, args=(99, 2, 60))
    live.start()
    time.sleep(0.2)  # the live request is queued behind the expired ones' slots
    state["release"].set()
    for t in (blocker, live):
        t.join(60)
    # The model ran the first request and the live one: not one of the 192 expired images.
    assert state["seen"] == [1, 2]
    np.testing.assert_allclose(answers[99], model(pixels(2, seed=99)).numpy(), atol=1e-5)


def test_rest_request_of_a_client_that_hung_up_is_not_computed(slow_server):
    import json

    model, server, state = slow_server
    blocker = threading.Thread(target=lambda: Client(server.grpc_target, name=NAME,
                                                     timeout=60).embed(pixels(1)))
    blocker.start()
    assert state["started"].wait(30)
    body = json.dumps({"instances": pixels(3, seed=1).tolist()}).encode()
    host, port = server.rest_url.rsplit("//", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.3)  # the request is queued behind the blocker
    # The client aborts: a reset, as a killed or timed-out client's socket sends when
    # answers are pending. (A FIN alone is a legal half-close: see the test below.)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(0.3)  # the waiting handler notices (it polls every 50 ms)
    state["release"].set()
    blocker.join(60)
    # Then a live REST request still gets its answer.
    from test_serving import rest

    status, answer = rest(server, f"/v1/models/{NAME}:predict",
                          {"instances": pixels(2, seed=2).tolist()})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], model(pixels(2, seed=2)).numpy(),
                               atol=1e-5)
    assert state["seen"] == [1, 2]  # the hung-up request's 3 images never ran


def test_rest_half_close_after_the_request_still_gets_every_answer(slow_server):
    import json

    model, server, state = slow_server
    state["release"].set()
    body = json.dumps({"instances": pixels(2, seed=5).tolist()}).encode()
    host, port = server.rest_url.rsplit("//", 1)[1].rsplit(":", 1)
    request = (f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(request + request)  # two pipelined requests
        sock.shutdown(socket.SHUT_WR)  # done sending, still reading
        sock.settimeout(30)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    expected = model(pixels(2, seed=5)).numpy()
    for _ in range(2):
        head, data = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
        length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")][0])
        answer, data = json.loads(data[:length]), data[length:]
        np.testing.assert_allclose(answer["predictions"], expected, atol=1e-5)
    assert data == b""
