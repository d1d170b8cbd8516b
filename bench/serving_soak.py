"""Soak: many clients, good and bad requests mixed, a version published in the middle.

`soak()` drives a running server over gRPC and REST with a fixed mix of
requests (per six: REST b64 crops, gRPC uint8 pixels, gRPC encoded crops, a
file that does not decode, an unknown signature over REST, an unknown model),
publishes a new version (a callable) once half of them are done, and counts
good requests that failed and bad ones answered with another status than
TF Serving's. With the server's process id it also samples the server's
resident memory after the first 1,000 requests and at the end (a leak shows
as growth).

    python bench/serving_soak.py [--requests 20000] [--clients 16] [--preset PRESET]

Targets: no failed good request, every bad one answered with its status, and
the resident memory at the end within 10% of after the first 1,000 requests.
The test suite runs a short version (tests/test_serving_soak.py).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfadv.export import contract as C  # noqa: E402
from tfadv.serving import Client  # noqa: E402

RSS_TARGET = 0.10
FIRST = 1000


def rss_mb(pid) -> float:
    """Resident memory of a process (Linux /proc), MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _kinds(rest_port, name, pixels, files):
    """The six requests of the mix: (label, expected outcome, call(client, connection))."""
    good_rest = json.dumps({"signature_name": C.EMBED_IMAGES_SIGNATURE, "instances": [
        {"b64": base64.b64encode(f).decode()} for f in files]}).encode()
    bad_rest = json.dumps({"signature_name": "nope", "instances": [[0]]}).encode()

    def rest(body):
        def call(client, other, connection):
            connection.request("POST", f"/v1/models/{name}:predict", body)
            response = connection.getresponse()
            response.read()
            return response.status
        return call

    def grpc_call(fn, unknown=False):
        def call(client, other, connection):
            try:
                fn(other if unknown else client)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name
        return call

    return [
        ("REST b64 crops", 200, rest(good_rest)),
        ("gRPC uint8", "OK", grpc_call(lambda c: c.embed(pixels))),
        ("gRPC crops", "OK", grpc_call(lambda c: c.embed_encoded(files))),
        ("gRPC bad file", "INVALID_ARGUMENT",
         grpc_call(lambda c: c.embed_encoded([files[0], b"not an image"]))),
        ("REST unknown signature", 400, rest(bad_rest)),
        ("gRPC unknown model", "NOT_FOUND", grpc_call(lambda c: c.embed(pixels), unknown=True)),
    ]


def soak(target, rest_port, name, pixels, files, *, requests=20000, clients=16, publish=None,
         server_pid=None, progress=True) -> dict:
    """Runs the mix; returns counts, failures and memory samples.

    Args:
        target: gRPC HOST:PORT; rest_port: the REST port on 127.0.0.1.
        name: the model name.
        pixels: uint8 [N, H, W, 3] for the pixel requests; files: encoded crops.
        requests: total requests; clients: threads, each with its own connections.
        publish: called once, when half the requests are done (e.g. an export).
        server_pid: the server process, for resident memory samples.

    Returns:
        {"requests", "good", "bad", "good_failed": [(kind, status)], "bad_wrong":
        [(kind, status)], "rss_mb_first", "rss_mb_end", "seconds", "published_at"}.
    """
    kinds = _kinds(rest_port, name, pixels, files)
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "rss_first": None, "published_at": None}
    good_failed, bad_wrong, counts = [], [], {"good": 0, "bad": 0}

    def take():
        with lock:
            k = state["next"]
            state["next"] += 1
            return k if k < requests else None

    def finished():
        with lock:
            state["done"] += 1
            done = state["done"]
        if done == FIRST and server_pid:
            state["rss_first"] = rss_mb(server_pid)
        if done == requests // 2 and publish is not None:
            state["published_at"] = done
            state["publisher"] = threading.Thread(target=publish, daemon=True)
            state["publisher"].start()
        if progress and done % 1000 == 0:
            print(f"  {done} / {requests} requests", flush=True)

    def worker():
        client = Client(target, name=name, timeout=120, retries=0)
        other = Client(target, name="nobody", timeout=120, retries=0)
        connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=120)
        try:
            while (k := take()) is not None:
                label, want, call = kinds[k % len(kinds)]
                try:
                    got = call(client, other, connection)
                except (OSError, http.client.HTTPException) as err:
                    connection.close()
                    got = f"{type(err).__name__}: {err}"
                good = want in ("OK", 200)
                with lock:
                    counts["good" if good else "bad"] += 1
                    if got != want:
                        (good_failed if good else bad_wrong).append((label, got))
                finished()
        finally:
            client.close()
            other.close()
            connection.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state.get("publisher") is not None:
        state["publisher"].join()
    return {"requests": requests, **counts, "good_failed": good_failed, "bad_wrong": bad_wrong,
            "rss_mb_first": state["rss_first"],
            "rss_mb_end": rss_mb(server_pid) if server_pid else None,
            "seconds": time.perf_counter() - t0, "published_at": state["published_at"]}


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from serving import face_crops, small_embedder, start_server

    from tfadv.data.images import encode_image
    from tfadv.export import export_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--preset", default=None, help="a FaceNet preset (default: a small CNN)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    name = "soak"
    base = os.path.join(tempfile.mkdtemp(prefix="tfadv-soak-"), "base")
    if args.preset:
        from tfadv.recipes.facenet import pretrained

        model = pretrained(args.preset)
    else:
        model = small_embedder(160, width=8)
    export_model(model, base, name=name, threshold=0.5)
    crops, source = face_crops(4, 160)
    files = [encode_image(c, "jpeg") for c in crops[:2]]
    proc, target, port = start_server(base, name, 5000, 32, poll=1.0)
    try:
        result = soak(target, port, name, crops[:2], files, requests=args.requests,
                      clients=args.clients, server_pid=proc.pid,
                      publish=lambda: export_model(model, base, name=name, threshold=0.5))
        with Client(target, name=name) as client:
            versions = {s["version"]: s["state"] for s in client.status()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    growth = result["rss_mb_end"] / result["rss_mb_first"] - 1
    print(f"{result['requests']} requests ({result['good']} good, {result['bad']} bad) from "
          f"{args.clients} clients in {result['seconds']:.0f} s; version 2 published after "
          f"{result['published_at']} requests; versions at the end {versions} (version 2 "
          "must be serving before the last request: the switch happened under load)")
    print(f"good requests failed: {len(result['good_failed'])} {result['good_failed'][:5]}")
    print(f"bad requests with another status: {len(result['bad_wrong'])} "
          f"{result['bad_wrong'][:5]}")
    print(f"server RSS after {FIRST} requests {result['rss_mb_first']:.0f} MB, at the end "
          f"{result['rss_mb_end']:.0f} MB: {growth:+.1%} (target within {RSS_TARGET:.0%})")
    ok = (not result["good_failed"] and not result["bad_wrong"] and abs(growth) <= RSS_TARGET
          and versions.get(2) == "AVAILABLE")
    print("ok" if ok else "TARGET MISSED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "versions": versions, "rss_growth": growth,
                       "crops": source}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
