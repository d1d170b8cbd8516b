"""Benchmark: serving embeddings over gRPC and REST (`tfadv serve`) against the in-process
SavedModel, on the model we serve (`--preset facenet-mscele1m-128`) or a small CNN.

Exports the model, starts two `tfadv serve` processes on loopback (one with
server-side batching, one without) and drives them with client threads.
Measures, in one run, configurations interleaved across repeats (medians):

1. Served / in-process at batch 32: gRPC throughput over calling the same
   SavedModel signature in this process on the same batches, for uint8
   pixels (`embed_uint8`) and for encoded face crops (`embed_images`).
   Target >= 0.9 (`--target-inprocess`).
2. Batching: batch-1 requests from 32 clients with server-side batching, per
   image, over the in-process batch-32 throughput (the limit batching can
   reach). Target >= 0.8; with p50/p99 latency, and over no batching. Merged
   batches run at their own size (`--no-pad-batches`); a second server pads
   them to 1, 2, 4, ..., 32 (the default), to show what padding costs.
3. REST with `{"b64": ...}` crops over gRPC with the same crops, batch 8.
4. Where a request's CPU goes: server and client CPU ms per request next to
   the in-process call's (the difference is the protocol's cost).

Encoded crops are PNG (lossless) of the demo faces when `tfadv assets fetch`
has run, else of synthetic smooth images. Client and server share the
machine's cores, as they do on a single host.

    python bench/serving.py --preset facenet-mscele1m-128 [--quick] [--json out.json]
    python bench/serving.py [--model PATH.keras]       # default: the small CNN
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import base64  # noqa: E402
import http.client  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfadv.export import contract as C  # noqa: E402
from tfadv.export import export_model  # noqa: E402
from tfadv.serving import Client  # noqa: E402

TARGET_INPROCESS = 0.9
TARGET_BATCHING = 0.8
BIG, REST_BATCH, MANY = 32, 8, 32


def small_embedder(size=160, dim=128, width=32):
    """A small conv embedder (~0.1 GMAC per 160x160 image; FaceNet is ~1.4)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    for i in range(4):
        h = keras.layers.Conv2D(width * 2 ** i, 3, strides=2, padding="same",
                                activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(dim)(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


def start_server(base, name, batching, max_batch, threads=1, pad=False, poll=0.0):
    """A `tfadv serve` process: (process, gRPC target, REST port)."""
    cmd = [sys.executable, "-m", "tfadv.cli", "serve", base, "--name", name, "--port", "0",
           "--rest-port", "0", "--max-request-batch", str(max_batch), "--poll-interval",
           str(poll)]
    if batching:
        cmd += ["--enable-batching", "--max-batch-size", str(max_batch),
                "--batch-timeout-micros", str(batching), "--num-batch-threads", str(threads),
                "--pad-batches" if pad else "--no-pad-batches"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    for line in proc.stdout:
        m = re.match(r"gRPC on (\S+), REST on http://[^:]+:(\d+)", line)
        if m:
            return proc, m.group(1), int(m.group(2))
    raise RuntimeError(f"the server did not start: {' '.join(cmd)}")


def cpu_seconds(pid):
    """User + system CPU time of a process (Linux /proc), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_caller(target, name, batch):
    """One connection; a call embeds `batch`: uint8 pixels [N, H, W, 3] or encoded files."""
    client = Client(target, name=name, timeout=120, batch_size=len(batch))
    if isinstance(batch, list):
        return client, lambda: client.embed_encoded(batch)
    return client, lambda: client.embed(batch)


def rest_caller(port, name, files):
    """One keep-alive HTTP connection; a call posts the files as {"b64": ...} instances."""
    body = json.dumps({"signature_name": C.EMBED_IMAGES_SIGNATURE, "instances": [
        {"b64": base64.b64encode(f).decode()} for f in files]}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call():
        connection.request("POST", f"/v1/models/{name}:predict", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST {response.status}: {answer[:200]!r}")
        return answer

    return connection, call


def drive(make_caller, per_request, clients, seconds, server_pid=None):
    """`clients` threads calling for `seconds`; throughput, latencies and CPU per request."""
    latencies = [[] for _ in range(clients)]
    errors = []
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()

    def worker(i):
        owner, call = make_caller()
        try:
            call()  # connect before the clock starts
            barrier.wait()
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    call()
                except Exception as err:  # counted; a benchmark must not hide failures
                    errors.append(repr(err))
                    continue
                latencies[i].append(time.perf_counter() - t)
        finally:
            owner.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    s0 = cpu_seconds(server_pid) if server_pid else 0.0
    time.sleep(seconds)
    stop.set()
    s1 = cpu_seconds(server_pid) if server_pid else 0.0
    c1 = time.process_time()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = sorted(x for lat in latencies for x in lat)
    return {"emb_per_s": len(flat) * per_request / wall,
            "p50_ms": 1e3 * flat[len(flat) // 2] if flat else float("nan"),
            "p99_ms": 1e3 * flat[min(len(flat) - 1, int(len(flat) * 0.99))] if flat
            else float("nan"),
            "server_cpu_ms": 1e3 * (s1 - s0) / max(1, len(flat)),
            "client_cpu_ms": 1e3 * (c1 - c0) / max(1, len(flat)),
            "requests": len(flat), "errors": len(errors)}


def in_process(fn, batch, seconds):
    """(embeddings/s, CPU ms per call) calling a SavedModel signature in this process."""
    if isinstance(batch, list):
        def call():
            return fn(images_bytes=tf.constant(batch))[C.EMBEDDINGS].numpy()
    else:
        def call():
            return fn(images=tf.constant(batch))[C.EMBEDDINGS].numpy()
    for _ in range(2):
        call()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or n < 2:
        call()
        n += 1
    return n * len(batch) / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / n


def face_crops(n, size):
    """n uint8 face crops [n, size, size, 3]: the demo faces when fetched, else synthetic."""
    from tfadv import assets

    root = assets.demo_faces_dir()
    paths = sorted(root.glob("*/*/*.jpg")) if root.is_dir() else []
    if paths:
        from tfadv.data.face_crops import load_face

        crops = []
        for p in paths:
            try:
                crops.append(load_face(p, size=size, detector="mtcnn"))
            except (OSError, ValueError):
                continue
            if len(crops) == n:
                break
        if crops:
            return np.stack([crops[i % len(crops)] for i in range(n)]), "demo faces"
    yy, xx = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(0)
    out = [np.clip(np.stack([128 + 90 * np.sin(xx / (7 + k) + c) * np.cos(yy / 9)
                             for c in range(3)], -1) + rng.normal(0, 8, (size, size, 3)),
                   0, 255).astype(np.uint8) for k in range(n)]
    return np.stack(out), "synthetic images"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .keras embedder (default: a small CNN)")
    p.add_argument("--preset", default=None,
                   help="a pretrained FaceNet preset, e.g. facenet-mscele1m-128")
    p.add_argument("--image-size", type=int, default=160, help="for the built-in model")
    p.add_argument("--width", type=int, default=8,
                   help="filters of the built-in model's first conv (doubling per layer)")
    p.add_argument("--encoding", choices=["png", "jpeg"], default="png")
    p.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-timeout-micros", type=int, default=20000)
    p.add_argument("--num-batch-threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 s per measurement, one repeat")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 2.0, 1

    name = "bench"
    work = tempfile.mkdtemp(prefix="tfadv-bench-serving-")
    if args.model:
        version_dir = export_model(args.model, os.path.join(work, "base"), name=name)
        label = args.model
    elif args.preset:
        from tfadv.recipes.facenet import pretrained

        version_dir = export_model(pretrained(args.preset), os.path.join(work, "base"),
                                   name=name, threshold=0.5)
        label = args.preset
    else:
        model = small_embedder(args.image_size, width=args.width)
        version_dir = export_model(model, os.path.join(work, "base"), name=name, threshold=0.5)
        label = f"CNN width {args.width}"
    base = os.path.dirname(version_dir)
    loaded = tf.saved_model.load(version_dir)
    h, w = loaded.signatures[C.SERVING_SIGNATURE].structured_input_signature[1][C.IMAGES] \
        .shape[1:3]
    crops, source = face_crops(BIG, h)
    from tfadv.data.images import encode_image

    files = [encode_image(c, args.encoding) for c in crops]
    kb = np.median([len(f) for f in files]) / 1024
    print(f"model: {label} ({h}x{w}); {source}; {args.encoding} crops median {kb:.1f} KB vs "
          f"{h * w * 3 / 1024:.0f} KB uint8; {args.seconds:g} s per measurement, "
          f"{args.repeats} repeat(s)", flush=True)

    # (name, server, batch kind, batch size, clients, protocol)
    plan = [("grpc uint8 b32", "no batching", "pixels", BIG, 1, "grpc"),
            ("grpc uint8 b32 x2", "no batching", "pixels", BIG, 2, "grpc"),
            ("grpc crops b32", "no batching", "files", BIG, 1, "grpc"),
            ("grpc crops b32 x2", "no batching", "files", BIG, 2, "grpc"),
            ("grpc uint8 b1 x32 batching", "batching", "pixels", 1, MANY, "grpc"),
            ("grpc uint8 b1 x32 batching padded", "batching padded", "pixels", 1, MANY, "grpc"),
            ("grpc uint8 b1 x32 no batching", "no batching", "pixels", 1, MANY, "grpc"),
            ("grpc crops b8", "no batching", "files", REST_BATCH, 1, "grpc"),
            ("rest b64 crops b8", "no batching", "files", REST_BATCH, 1, "rest")]
    signatures = {"pixels": loaded.signatures[C.EMBED_UINT8_SIGNATURE],
                  "files": loaded.signatures[C.EMBED_IMAGES_SIGNATURE]}
    data = {"pixels": crops, "files": files}
    servers, results, inproc = {}, {}, {}
    try:
        servers["batching"] = start_server(base, name, args.batch_timeout_micros, BIG,
                                           args.num_batch_threads)
        servers["batching padded"] = start_server(base, name, args.batch_timeout_micros, BIG,
                                                  args.num_batch_threads, pad=True)
        servers["no batching"] = start_server(base, name, 0, BIG)
        for r in range(args.repeats):
            for kind in ("pixels", "files"):
                for n in (BIG, REST_BATCH):
                    inproc.setdefault((kind, n), []).append(
                        in_process(signatures[kind], data[kind][:n], args.seconds))
            for key, server, kind, n, clients, protocol in plan:
                proc, target, port = servers[server]
                batch = data[kind][:n]
                if protocol == "grpc":
                    def make(target=target, batch=batch):
                        return grpc_caller(target, name, batch)
                else:
                    def make(port=port, batch=batch):
                        return rest_caller(port, name, batch)
                out = drive(make, n, clients, args.seconds, proc.pid)
                results.setdefault(key, []).append(out)
                print(f"  [{r + 1}/{args.repeats}] {key:<34} {out['emb_per_s']:8.1f} emb/s "
                      f"(errors {out['errors']})", flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            proc.wait(timeout=60)

    def med(key, field):
        return statistics.median(o[field] for o in results[key])

    print(f"\n{'configuration':<34} {'emb/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'CPU ms/request: server':>23} {'client':>7}")
    table = []
    for key, *_ in plan:
        row = {"configuration": key, **{f: med(key, f) for f in (
            "emb_per_s", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms")},
            "errors": sum(o["errors"] for o in results[key])}
        table.append(row)
        print(f"{key:<34} {row['emb_per_s']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
              f"{row['errors']:>6} {row['server_cpu_ms']:23.2f} {row['client_cpu_ms']:7.2f}")
    ip = {k: (statistics.median(v[0] for v in runs), statistics.median(v[1] for v in runs))
          for k, runs in inproc.items()}
    for (kind, n), (rate, cpu) in sorted(ip.items()):
        print(f"{'in-process ' + kind + ' b' + str(n):<34} {rate:8.1f} {'':>8} {'':>8} "
              f"{'':>6} {cpu:23.2f}")

    def best(*keys):
        return max(med(k, "emb_per_s") for k in keys)

    summary = {
        "served_over_inprocess_uint8_b32":
            best("grpc uint8 b32", "grpc uint8 b32 x2") / ip[("pixels", BIG)][0],
        "served_over_inprocess_crops_b32":
            best("grpc crops b32", "grpc crops b32 x2") / ip[("files", BIG)][0],
        "batching_b1_x32_over_inprocess_b32":
            med("grpc uint8 b1 x32 batching", "emb_per_s") / ip[("pixels", BIG)][0],
        "padded_batching_b1_x32_over_inprocess_b32":
            med("grpc uint8 b1 x32 batching padded", "emb_per_s") / ip[("pixels", BIG)][0],
        "batching_b1_x32_over_no_batching":
            med("grpc uint8 b1 x32 batching", "emb_per_s")
            / med("grpc uint8 b1 x32 no batching", "emb_per_s"),
        "rest_b64_over_grpc_b8":
            med("rest b64 crops b8", "emb_per_s") / med("grpc crops b8", "emb_per_s"),
    }
    targets = {"served_over_inprocess_uint8_b32": TARGET_INPROCESS,
               "served_over_inprocess_crops_b32": TARGET_INPROCESS,
               "batching_b1_x32_over_inprocess_b32": TARGET_BATCHING}
    print()
    for key, ratio in summary.items():
        target = targets.get(key)
        verdict = "" if target is None else (
            f"  (target >= {target}) " + ("ok" if ratio >= target else "BELOW TARGET"))
        print(f"{key:<40} {ratio:6.2f}{verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "in_process": {f"{k}_b{n}": v for (k, n), v in ip.items()},
                       "summary": summary, "args": vars(args), "model": label,
                       "crops": source}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
