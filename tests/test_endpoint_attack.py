"""`tfadv attack-endpoint`: Square dodging on a served embedder, through the gRPC client only."""

import json
import socket
import time

import cv2
import grpc
import keras
import numpy as np
import pytest
from PIL import Image

from tfadv.attacks.embedding import attack_success
from tfadv.cli import main
from tfadv.export import export_model
from tfadv.serving import Client, ModelServer
from tfadv.data.faces import load_face_folder
from tfadv.serving.endpoint_attack import (attack_endpoint, served_image_size,
                                           threshold_from_verify)

NAME = "faces"
SIZE = 32
THRESHOLD = 0.8  # exported with the model: the `verify` signature's threshold
EPS, BUDGET = 16.0, 100


def tiny_embedder(seed=0):
    """Two strided convs -> dense -> unit norm: sensitive enough to local pixel changes that a
    100-query Square search dodges most faces at eps 16 pixels (no pooling: a global average
    would wash out the windows)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(h)
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(h)
    h = keras.layers.Dense(16)(keras.layers.Flatten()(h))
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


def make_faces(n=8, seed=0):
    """uint8 [n, SIZE, SIZE, 3]: smooth random images (4x4 colour grids, upsampled)."""
    small = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.stack([cv2.resize(s, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for s in small])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("endpoint")
    model = tiny_embedder()
    base = str(root / "base")
    export_model(model, base, name=NAME, threshold=THRESHOLD)
    server = ModelServer(base, name=NAME, port=0, rest_port=None, poll_interval=0,
                         warmup=False).start()
    yield model, server
    server.stop()


class CountingClient(Client):
    """The client with a tally of what it sent: images embedded, verify pairs, calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images = self.pairs = self.calls = 0

    def embed(self, images):
        self.calls += 1
        self.images += len(images)
        return super().embed(images)

    def verify(self, images_a, images_b):
        self.calls += 1
        self.pairs += len(images_a)
        return super().verify(images_a, images_b)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"injected {self._code.name}"


class FlakyClient(CountingClient):
    """Every `every`-th embed call fails with `code` before reaching the server."""

    def __init__(self, *args, every=5, code=grpc.StatusCode.UNAVAILABLE, **kwargs):
        super().__init__(*args, **kwargs)
        self.every, self.code, self.injected, self._n = every, code, 0, 0

    def embed(self, images):
        self._n += 1
        if self._n % self.every == 0:
            self.injected += 1
            raise FakeRpcError(self.code)
        return super().embed(images)


def _free_port():
    with socket.socket() as s:  # bound, closed: nobody listens on it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_attack_agrees_with_the_local_model_and_counts_every_query(served):
    model, server = served
    faces = make_faces()
    with CountingClient(server.grpc_target, name=NAME) as client:
        result = attack_endpoint(client, faces, eps=EPS, queries=BUDGET, threshold=THRESHOLD,
                                 seed=0)
    n = len(faces)
    clean = model(faces.astype("float32"))
    # The endpoint path and the local path agree on every face.
    local = attack_success(model(result.x_adv), clean, THRESHOLD, "dodging").numpy()
    np.testing.assert_array_equal(result.success, local)
    assert result.success_rate == pytest.approx(local.mean())
    assert 0 < result.success_rate < 1  # both outcomes are exercised
    local_sim = np.sum(model(result.x_adv).numpy() * clean.numpy(), -1)
    np.testing.assert_allclose(result.similarity, local_sim, atol=1e-5)
    # Inside the threat model: Linf <= eps pixels, valid pixels.
    assert result.x_adv.shape == faces.shape and result.x_adv.dtype == np.float32
    assert np.abs(result.x_adv - faces).max() <= EPS + 1e-4
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 255
    # Queries: each face's clean query plus its search, and nothing unaccounted for.
    assert result.queries.dtype == np.int64 and result.queries.shape == (n,)
    assert np.all((result.queries >= 2) & (result.queries <= BUDGET + 1))
    assert np.all(result.queries[~result.success] == BUDGET + 1)
    assert client.images == result.total_queries == result.queries.sum() + n  # + the re-query
    assert client.pairs == 0
    assert result.median_queries == np.median(result.queries[result.success])
    # The endpoint held up: no failure, the same clean answers after the attack.
    assert result.failed_requests == 0
    assert result.consistent and result.clean_drift <= 1e-5
    with Client(server.grpc_target, name=NAME) as fresh:
        np.testing.assert_allclose(fresh.embed(faces), clean, atol=1e-5)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["n"] == n and out["eps"] == EPS and out["norm"] == "inf"
    assert out["queries_budget"] == BUDGET and out["threshold"] == THRESHOLD
    assert out["threshold_source"] == "given" and out["median_queries"] == result.median_queries
    assert "x_adv" not in out


def test_the_same_seed_gives_the_same_search_and_l2_stays_in_its_ball(served):
    model, server = served
    faces = make_faces(4, seed=1)
    with Client(server.grpc_target, name=NAME) as client:
        a = attack_endpoint(client, faces, eps=EPS, queries=30, threshold=0.9, seed=3)
        b = attack_endpoint(client, faces.astype(np.float32), eps=EPS, queries=30,
                            threshold=0.9, seed=3)
        l2 = attack_endpoint(client, faces, eps=400.0, norm="L2", queries=30, threshold=0.9)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    np.testing.assert_array_equal(a.queries, b.queries)
    assert l2.norm == "2"
    norms = np.sqrt(np.sum((l2.x_adv - faces.astype(np.float32)) ** 2, (1, 2, 3)))
    assert np.all(norms <= 400.0 * (1 + 1e-4))
    local = attack_success(model(l2.x_adv), model(faces.astype("float32")), 0.9, "dodging")
    np.testing.assert_array_equal(l2.success, local.numpy())


def test_threshold_is_bracketed_from_the_served_verify_signature(served):
    model, server = served
    faces = make_faces()
    with CountingClient(server.grpc_target, name=NAME) as client:
        low, high = threshold_from_verify(client, faces)
        assert low < THRESHOLD <= high and high - low < 1e-5
        assert client.pairs > 0 and client.images == 0
        client.pairs = 0
        result = attack_endpoint(client, faces[:3], eps=EPS, queries=20)
    assert result.threshold_source == "verify" and result.threshold == low
    assert tuple(result.threshold_bracket) == (low, high)
    assert result.total_queries == client.images + client.pairs
    assert client.images == result.queries.sum() + 3 and client.pairs > 0
    local = attack_success(model(result.x_adv), model(faces[:3].astype("float32")), THRESHOLD,
                           "dodging")
    np.testing.assert_array_equal(result.success, local.numpy())


def test_a_failed_request_stops_the_attack_with_its_code(served):
    """Transient errors are retried by the client's gRPC retry policy; a call that
    still fails ends the attack (its counts would be incomplete), named by its code:
    ConnectionError for an endpoint that is down, ValueError for a refused request."""
    _, server = served
    faces = make_faces(4, seed=2)
    settings = dict(eps=EPS, queries=40, threshold=THRESHOLD, seed=1)
    with FlakyClient(server.grpc_target, name=NAME, every=4) as flaky:
        with pytest.raises(ConnectionError, match="UNAVAILABLE"):
            attack_endpoint(flaky, faces, **settings)
        assert flaky.injected == 1
    with FlakyClient(server.grpc_target, name=NAME, every=1,
                     code=grpc.StatusCode.INVALID_ARGUMENT) as refused:
        with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
            attack_endpoint(refused, faces, **settings)
        assert refused.injected == 1


def test_a_model_that_changes_during_the_attack_is_reported(served):
    _, server = served
    faces = make_faces(3)

    class Drifting(Client):
        clean_calls = 0

        def embed(self, images):
            out = super().embed(images)
            if images.shape == faces.shape and np.array_equal(images, faces):
                self.clean_calls += 1
                if self.clean_calls > 1:
                    out = out + 1e-3
            return out

    with Drifting(server.grpc_target, name=NAME) as client:
        with pytest.warns(RuntimeWarning, match="differently after the attack"):
            result = attack_endpoint(client, faces, eps=EPS, queries=10, threshold=THRESHOLD)
    assert not result.consistent and result.clean_drift == pytest.approx(1e-3, rel=1e-3)
    assert result.to_dict()["consistent"] is False


def test_impersonation_with_targets(served):
    model, server = served
    faces, targets = make_faces(4), make_faces(2, seed=5)
    with Client(server.grpc_target, name=NAME) as client:
        result = attack_endpoint(client, faces, eps=EPS, queries=30, threshold=0.7,
                                 mode="impersonation", targets=targets)
    reference = model(targets.astype("float32")).numpy()[[0, 1, 0, 1]]
    local = attack_success(model(result.x_adv), reference, 0.7, "impersonation")
    np.testing.assert_array_equal(result.success, local.numpy())
    assert result.mode == "impersonation" and np.all(result.queries <= 31)
    with Client(server.grpc_target, name=NAME) as client:  # at the served threshold
        served_at = attack_endpoint(client, faces, eps=EPS, queries=30, mode="impersonation",
                                    targets=targets)
    low, high = served_at.threshold_bracket
    assert served_at.threshold == high and low < THRESHOLD <= high
    local = attack_success(model(served_at.x_adv), reference, THRESHOLD, "impersonation")
    np.testing.assert_array_equal(served_at.success, local.numpy())


def test_bad_settings_fail_before_any_query(served):
    _, server = served
    faces = make_faces(2)
    with CountingClient(server.grpc_target, name=NAME) as client:
        with pytest.raises(ValueError, match="eps"):
            attack_endpoint(client, faces, eps=-1, threshold=0.5)
        with pytest.raises(ValueError, match="mode"):
            attack_endpoint(client, faces, mode="spoofing", threshold=0.5)
        with pytest.raises(ValueError, match="targets"):
            attack_endpoint(client, faces, mode="impersonation", threshold=0.5)
        with pytest.raises(ValueError, match="threshold"):
            attack_endpoint(client, faces, threshold=1.5)
        with pytest.raises(ValueError, match="32x32"):
            attack_endpoint(client, np.zeros((2, 16, 16, 3), np.uint8), threshold=0.5)
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            attack_endpoint(client, faces * 2.0, threshold=0.5)
        assert client.calls == 0
    with Client(server.grpc_target, name="nobody", retries=0) as client:
        with pytest.raises(ValueError, match="NOT_FOUND"):
            served_image_size(client)


def _write_faces(folder, faces):
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"face{i}.png")
    return folder


def test_cli_json_and_text(served, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TFADV_CACHE_DIR", str(tmp_path / "cache"))
    _, server = served
    folder = _write_faces(tmp_path / "faces" / "someone", make_faces(6))
    (tmp_path / "faces" / "someone" / "notes.txt").write_text("not a photo")
    args = ["attack-endpoint", server.grpc_target, "--name", NAME, "--faces",
            str(tmp_path / "faces"), "--eps", "16", "--queries", "50", "--threshold",
            str(THRESHOLD), "--limit", "4", "--no-crop", "--seed", "2"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("target", "name", "n", "eps", "norm", "queries_budget", "threshold",
                "success_rate", "success", "queries", "median_queries", "failed_requests",
                "total_queries", "clean_drift", "consistent", "seconds", "paths"):
        assert key in out, key
    assert out["n"] == 4 and out["eps"] == 16.0 and out["queries_budget"] == 50
    assert out["failed_requests"] == 0 and out["consistent"]
    assert out["paths"] == [str(folder / f"face{i}.png") for i in range(4)]
    # The command is the library call on the crops of the one face pipeline.
    faceset = load_face_folder(tmp_path / "faces", size=SIZE, detector="none")
    crops, paths = faceset.images[:4], faceset.paths[:4]
    assert paths == out["paths"]
    with Client(server.grpc_target, name=NAME) as client:
        want = attack_endpoint(client, crops, eps=16, queries=50, threshold=THRESHOLD, seed=2)
    assert out["success"] == want.success.tolist() and out["queries"] == want.queries.tolist()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "dodging success" in text and "median queries" in text and "4 faces" in text


def test_cli_errors_are_clear_and_quick(served, tmp_path, capsys):
    _, server = served
    faces = _write_faces(tmp_path / "faces", make_faces(2))
    t0 = time.perf_counter()
    assert main(["attack-endpoint", f"127.0.0.1:{_free_port()}", "--faces", str(faces),
                 "--threshold", "0.5", "--timeout", "3"]) == 2
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err
    assert "attack-endpoint: error:" in err and "UNAVAILABLE" in err
    t0 = time.perf_counter()
    assert main(["attack-endpoint", f"127.0.0.1:{_free_port()}", "--faces", str(faces),
                 "--wait", "0.5", "--timeout", "1"]) == 2
    assert time.perf_counter() - t0 < 15 and "not ready" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    base = ["attack-endpoint", server.grpc_target, "--name", NAME, "--no-crop",
            "--threshold", "0.5"]
    assert main([*base, "--faces", str(empty)]) == 2
    assert "one sub-folder of photos per identity" in capsys.readouterr().err
    assert main([*base, "--faces", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--faces", str(faces), "--mode", "impersonation"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main(["attack-endpoint", server.grpc_target, "--name", "nobody", "--faces",
                 str(faces), "--no-crop", "--threshold", "0.5"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_adds_the_result_to_a_facenet_report(served, tmp_path, capsys):
    """--report DIR --report-column C: the result lands in the report's metrics.json and
    report.md; a second run of the same setting replaces it; the committed report renders
    unchanged without one."""
    from pathlib import Path

    from tfadv.reports.facenet import report_markdown

    committed = Path(__file__).resolve().parents[1] / "reports" / "facenet"
    m = json.loads((committed / "metrics.json").read_text())
    assert report_markdown(m) == (committed / "report.md").read_text()
    assert "Black-box attack through the served endpoint" in report_markdown(m)
    del m["endpoint_attack"]
    assert "Black-box" not in report_markdown(m)
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps(m))
    _, server = served
    _write_faces(tmp_path / "faces" / "someone", make_faces(4))
    args = ["attack-endpoint", server.grpc_target, "--name", NAME, "--faces",
            str(tmp_path / "faces"), "--eps", "16", "--queries", "30", "--threshold",
            str(THRESHOLD), "--no-crop", "--report", str(report), "--json"]
    for _ in range(2):
        assert main([*args, "--report-column", "finetuned"]) == 0
        out = json.loads(capsys.readouterr().out)
    saved = json.loads((report / "metrics.json").read_text())
    (entry,) = saved["endpoint_attack"]["finetuned"]
    assert entry["success"] == out["success"] and entry["queries"] == out["queries"]
    assert {k: saved[k] for k in m} == m  # nothing else changed
    text = (report / "report.md").read_text()
    assert text.startswith(report_markdown(m).split("![")[0].rstrip("\n"))
    k = sum(out["success"])
    assert (f"| dodging, Linf eps 16, 30 queries | success | n/a | {k / 4:.3f} ({k}/4) |"
            in text)
    assert "| dodging, Linf eps 16, 30 queries | failed requests | n/a | 0 |" in text
    assert main([*args[:-1], "--eps", "8", "--report-column", "pretrained"]) == 0
    saved = json.loads((report / "metrics.json").read_text())
    assert [len(saved["endpoint_attack"][c]) for c in ("pretrained", "finetuned")] == [1, 1]
    assert "| dodging, Linf eps 8, 30 queries | faces attacked | 4 | n/a |" in (
        report / "report.md").read_text()


def test_cli_report_errors_come_before_any_query(served, tmp_path, capsys):
    _, server = served
    faces = _write_faces(tmp_path / "faces" / "someone", make_faces(2))
    base = ["attack-endpoint", f"127.0.0.1:{_free_port()}", "--faces", str(faces.parent),
            "--threshold", "0.5", "--no-crop"]
    assert main([*base, "--report", str(tmp_path)]) == 2
    assert "--report-column" in capsys.readouterr().err
    # A missing --faces folder is named before any connection is tried.
    missing = ["attack-endpoint", f"127.0.0.1:{_free_port()}", "--faces",
               str(tmp_path / "nowhere"), "--threshold", "0.5"]
    assert main(missing) == 2
    err = capsys.readouterr().err
    assert "nowhere: not found" in err and "UNAVAILABLE" not in err
    # No server listens at that port: the report is checked first.
    assert main([*base, "--report", str(tmp_path), "--report-column", "finetuned"]) == 2
    err = capsys.readouterr().err
    assert "metrics.json not found" in err and "UNAVAILABLE" not in err
    (tmp_path / "metrics.json").write_text("{\"half\": ")
    assert main([*base, "--report", str(tmp_path), "--report-column", "finetuned"]) == 2
    assert "is not the metrics of a FaceNet" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {}, "pretrained": {},
                                                       "finetuned": {}}))
    assert main([*base, "--report", str(tmp_path), "--report-column", "finetuned"]) == 2
    err = capsys.readouterr().err
    assert "cannot be rendered" in err and "UNAVAILABLE" not in err
