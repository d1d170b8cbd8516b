"""`tfadv export`, `tfadv serve` and `tfadv query`: argument parsing and one library call each.

This module imports nothing heavy at import time, so `tfadv --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tfadv import argtypes
from tfadv.export import contract as C


def _port(text):
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(
            f"expected a port in [0, 65535] (0: any free); got {text!r}")
    return value


_positive = argtypes.positive_int


def _sizes(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 1,8; got {text!r}")
    return values


def add_commands(subparsers, commands: dict):
    """Adds `export`, `serve` and `query` to an argparse subparsers object.

    Args:
        subparsers: from `parser.add_subparsers()`.
        commands: the CLI's name -> handler table; the three handlers are added.
    """
    e = subparsers.add_parser("export", help="export an embedding model for TF Serving")
    e.add_argument("model", help="MODEL.keras (threshold.json next to it is picked up)")
    e.add_argument("--out", required=True, help="the model's base directory (BASE_DIR)")
    e.add_argument("--name", default=C.DEFAULT_MODEL_NAME, help="model name")
    e.add_argument("--version", type=_positive, default=None,
                   help="version number (default: the next one; never overwrites)")
    e.add_argument("--threshold", type=argtypes.cosine_threshold, default=None,
                   help="cosine threshold for `verify` (default: from threshold.json)")
    e.add_argument("--warmup-batch-sizes", type=_sizes, default=[1],
                   help="batch sizes of the warm-up requests, e.g. 1,8")
    _batching_args(e, for_server=False)

    s = subparsers.add_parser("serve", help="serve exported models over gRPC and REST "
                                            "(TF Serving protocol)")
    s.add_argument("base_dir", nargs="?", default=None,
                   help="the model's base directory (omit with --model-config-file)")
    s.add_argument("--name", default=C.DEFAULT_MODEL_NAME, help="model name")
    s.add_argument("--port", type=_port, default=C.DEFAULT_GRPC_PORT, help="gRPC port (0: free)")
    s.add_argument("--rest-port", type=_port, default=C.DEFAULT_REST_PORT,
                   help="REST port (0: free)")
    s.add_argument("--no-rest", action="store_true", help="serve gRPC only")
    s.add_argument("--host", default=C.DEFAULT_HOST,
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--model-config-file", default=None,
                   help="TF Serving ModelServerConfig text file listing the models")
    s.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between scans for new versions (0: never)")
    s.add_argument("--workers", type=_positive, default=64, help="gRPC worker threads")
    s.add_argument("--max-message-mb", type=_positive, default=256)
    s.add_argument("--grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    s.add_argument("--ssl-cert", default=None, help="PEM certificate (enables TLS)")
    s.add_argument("--ssl-key", default=None, help="PEM private key")
    s.add_argument("--ssl-client-ca", default=None, help="PEM CA: require client certificates")
    s.add_argument("--no-warmup", action="store_true", help="skip the warm-up requests")
    _batching_args(s, for_server=True)

    q = subparsers.add_parser("query", help="embed the face in image files with a served model "
                                            "over gRPC (MTCNN crop, as `tfadv facenet embed`)")
    q.add_argument("target", help="HOST:PORT of the gRPC endpoint")
    q.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    q.add_argument("--no-crop", action="store_true",
                   help="the images are already face crops: no face detection, the centre "
                        "square is resized")
    q.add_argument("--name", default=C.DEFAULT_MODEL_NAME, help="model name")
    q.add_argument("--version", type=_positive, default=None, help="pin a version")
    q.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    q.add_argument("--batch-size", type=_positive, default=32)
    q.add_argument("--ssl-root-cert", default=None, help="PEM CA certificate (enables TLS)")
    q.add_argument("--json", action="store_true", help="one JSON object per image")

    commands.update({"export": cmd_export, "serve": cmd_serve, "query": cmd_query})


def _batching_args(p, for_server):
    if for_server:
        p.add_argument("--enable-batching", action="store_true",
                       help="merge concurrent requests into batches")
        p.add_argument("--batching-parameters-file", default=None,
                       help="TF Serving BatchingParameters text file (implies --enable-batching)")
        p.add_argument("--max-request-batch", type=_positive, default=None,
                       help="largest batch one request may carry (default: --max-batch-size "
                            "with batching, else 256)")
    p.add_argument("--max-batch-size", type=_positive, default=None)
    p.add_argument("--batch-timeout-micros", type=int, default=None)
    p.add_argument("--num-batch-threads", type=_positive, default=None)
    p.add_argument("--max-enqueued-batches", type=_positive, default=None)


def _batching(args, base=None):
    from tfadv.export.batching import BatchingParameters

    fields = ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
              "max_enqueued_batches")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if base is None:  # batches padded to 1, 2, 4, ..., max_batch_size
        return BatchingParameters.with_padding(**given)
    merged = {**{f: getattr(base, f) for f in fields}, **given}
    if base.allowed_batch_sizes and merged["max_batch_size"] != base.max_batch_size:
        return BatchingParameters.with_padding(**merged)
    return BatchingParameters(**merged, allowed_batch_sizes=base.allowed_batch_sizes)


def cmd_export(args):
    from tfadv.export import export_model

    path = export_model(args.model, args.out, name=args.name, version=args.version,
                        threshold=args.threshold, warmup_batch_sizes=tuple(args.warmup_batch_sizes),
                        batching=_batching(args))
    print(f"wrote {path}")
    print(f"serve it: tfadv serve {args.out} --name {args.name}   "
          f"(TF Serving: see {os.path.join(args.out, 'README.md')})")


def cmd_serve(args):
    from tfadv.export.batching import BatchingParameters
    from tfadv.serving.server import serve

    batching = None
    if args.batching_parameters_file:
        batching = _batching(args, BatchingParameters.read(args.batching_parameters_file))
    elif args.enable_batching:
        batching = _batching(args)
    if args.base_dir is None and args.model_config_file is None:
        raise ValueError("Pass BASE_DIR (an exported model directory) or --model-config-file.")
    if args.base_dir is not None and args.model_config_file is not None:
        raise ValueError("Pass either BASE_DIR or --model-config-file, not both.")
    serve(args.base_dir, name=args.name, port=args.port,
          rest_port=None if args.no_rest else args.rest_port, host=args.host,
          model_config_file=args.model_config_file, batching=batching,
          max_batch_size=args.max_request_batch, poll_interval=args.poll_interval,
          workers=args.workers, max_message_mb=args.max_message_mb, grace=args.grace,
          tls_cert=args.ssl_cert, tls_key=args.ssl_key, tls_client_ca=args.ssl_client_ca,
          warmup=not args.no_warmup)


def cmd_query(args):
    import grpc

    from tfadv.serving.client import Client

    client = Client(args.target, name=args.name, version=args.version, timeout=args.timeout,
                    batch_size=args.batch_size, root_certificates=args.ssl_root_cert)
    try:
        try:
            results = client.embed_files(args.images, crop=not args.no_crop)
        except grpc.RpcError as err:
            raise ValueError(f"{args.target}: {err.code().name}: {err.details()}") from None
        ok = [r for r in results if "error" not in r]
        for r in results:
            if args.json:
                print(json.dumps(r))
            elif "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            else:
                e = r["embedding"]
                head = ", ".join(f"{v:.4f}" for v in e[:4])
                print(f"{r['path']}: embedding dim {len(e)} [{head}, ...]")
        sys.stdout.flush()
        failed = len(results) - len(ok)
        if failed:
            raise ValueError(f"{failed} of {len(results)} images could not be read or have "
                             "no face (see the errors above).")
    finally:
        client.close()
