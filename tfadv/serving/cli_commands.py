"""`tfadv export`, `serve`, `query` and `attack-endpoint`: options from their configs.

The settings are declared once, in `tfadv.config.serving`; `add_commands`
registers the commands the same way as every other `tfadv` command
(`tfadv.config.options.add_command`), and each handler builds its config
from the parsed options and calls the library.
"""

from __future__ import annotations

import json
import os
import sys

from tfadv import serving
from tfadv.config.options import add_command, build
from tfadv.config.serving import (BatchingOptions, EndpointAttackConfig, ExportConfig,
                                  QueryConfig, ServeConfig)
from tfadv.export import BatchingParameters, export_model


def add_commands(subparsers):
    """Adds `export`, `serve`, `query` and `attack-endpoint` to an argparse subparsers object."""
    add_command(subparsers, "export", cmd_export, configs=(ExportConfig,),
                help="export an embedding model for TF Serving")
    add_command(subparsers, "serve", cmd_serve, configs=(ServeConfig,),
                help="serve exported models over gRPC and REST (TF Serving protocol)")
    add_command(subparsers, "query", cmd_query, configs=(QueryConfig,),
                help="embed the face in image files with a served model over gRPC "
                     "(MTCNN crop, as `tfadv facenet embed`)")
    add_command(subparsers, "attack-endpoint", cmd_attack_endpoint,
                configs=(EndpointAttackConfig,),
                help="black-box dodging attack (Square, score-based) on a served face-embedding "
                     "model over gRPC: success rate and queries")


_FIELDS = ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches")


def batching_parameters(options: BatchingOptions, base: BatchingParameters | None = None):
    """`BatchingParameters` from the batching options, over `base` (a file's) if given.

    Without a base, batches are padded to 1, 2, 4, ..., max_batch_size; with
    one, its padded sizes are kept unless the largest batch changes;
    `pad_batches=False` turns padding off.
    """
    given = options.given()
    pad = given.pop("pad_batches", True)
    merged = {**({f: getattr(base, f) for f in _FIELDS} if base else {}), **given}
    if not pad:
        return BatchingParameters(**merged, allowed_batch_sizes=())
    if base is None or (base.allowed_batch_sizes
                        and merged["max_batch_size"] != base.max_batch_size):
        return BatchingParameters.with_padding(**merged)
    return BatchingParameters(**merged, allowed_batch_sizes=base.allowed_batch_sizes)


def cmd_export(args):
    cfg = build(ExportConfig, args)
    path = export_model(cfg.model, cfg.out, name=cfg.name, version=cfg.version,
                        threshold=cfg.threshold, warmup_batch_sizes=cfg.warmup_batch_sizes,
                        batching=batching_parameters(cfg.batching))
    print(f"wrote {path}")
    print(f"serve it: tfadv serve {cfg.out} --name {cfg.name}   "
          f"(TF Serving: see {os.path.join(cfg.out, 'README.md')})")


def cmd_serve(args):
    cfg = build(ServeConfig, args)
    batching = None
    if cfg.batching_parameters_file:
        batching = batching_parameters(cfg.batching,
                                       BatchingParameters.read(cfg.batching_parameters_file))
    elif cfg.enable_batching:
        batching = batching_parameters(cfg.batching)
    serving.serve(cfg.base_dir, name=cfg.name, port=cfg.port,
                  rest_port=cfg.rest_port if cfg.rest else None, host=cfg.host,
                  model_config_file=cfg.model_config_file, batching=batching,
                  max_batch_size=cfg.max_request_batch, poll_interval=cfg.poll_interval,
                  workers=cfg.workers, max_message_mb=cfg.max_message_mb, grace=cfg.grace,
                  tls_cert=cfg.ssl_cert, tls_key=cfg.ssl_key, tls_client_ca=cfg.ssl_client_ca,
                  warmup=cfg.warmup, monitoring_config_file=cfg.monitoring_config_file)


def _client(cfg) -> serving.Client:
    """The gRPC client of a client command's settings (target, name, version, ...)."""
    return serving.Client(cfg.target, name=cfg.name, version=cfg.version, timeout=cfg.timeout,
                          batch_size=cfg.batch_size, root_certificates=cfg.ssl_root_cert)


def cmd_query(args):
    import grpc  # only this command needs it

    cfg = build(QueryConfig, args)
    with _client(cfg) as client:
        try:
            results = client.embed_files(list(cfg.images), crop=cfg.crop,
                                         encoding=None if cfg.encoding == "raw" else cfg.encoding)
        except grpc.RpcError as err:
            raise ValueError(f"{cfg.target}: {err.code().name}: {err.details()}") from None
    for r in results:
        if cfg.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['path']}: error: {r['error']}")
        else:
            e = r["embedding"]
            head = ", ".join(f"{v:.4f}" for v in e[:4])
            print(f"{r['path']}: embedding dim {len(e)} [{head}, ...]")
    sys.stdout.flush()
    failed = sum("error" in r for r in results)
    if failed:
        why = "could not be read or have no face" if cfg.crop else "could not be read"
        raise ValueError(f"{failed} of {len(results)} images {why} (see the errors above).")


def cmd_attack_endpoint(args):
    import grpc  # only the client commands need it

    from tfadv.data.faces import load_face_folder
    from tfadv.serving import endpoint_attack as ea

    cfg = build(EndpointAttackConfig, args)
    if not os.path.isdir(cfg.faces):  # checked before any connection
        raise ValueError(f"--faces {cfg.faces}: not found or not a folder (expected one "
                         "sub-folder of photos per identity).")
    if cfg.report is not None:  # checked before the queries are spent
        from tfadv.reports.facenet import load_report_metrics

        load_report_metrics(cfg.report)
    with _client(cfg) as client:
        try:
            if cfg.wait:
                client.wait_until_ready(cfg.wait)
            height, width = ea.served_image_size(client)
            if height != width:
                raise ValueError(f"Model {cfg.name!r} takes {height}x{width} images, but face "
                                 "crops are square.")
            detector = None if cfg.crop else "none"
            faces = load_face_folder(cfg.faces, size=height, detector=detector)
            images, paths = faces.images[:cfg.limit], faces.paths[:cfg.limit]
            skipped = faces.skipped
            targets = None
            if cfg.targets is not None:
                targets = load_face_folder(cfg.targets, size=height, detector=detector).images
            result = ea.attack_endpoint(client, images, eps=cfg.eps, queries=cfg.queries,
                                        norm=cfg.norm, mode=cfg.mode, threshold=cfg.threshold,
                                        targets=targets, seed=cfg.seed,
                                        batch_size=cfg.batch_size, progress=not cfg.json)
        except (ConnectionError, TimeoutError) as err:
            raise ValueError(str(err)) from None
        except grpc.RpcError as err:
            raise ValueError(f"{cfg.target}: {err.code().name}: {err.details()}") from None
    _print_endpoint_result(cfg, result, paths, skipped)
    if cfg.report is not None:  # after the result is out: a failed write loses nothing
        from tfadv.reports.facenet import add_endpoint_attack

        written = add_endpoint_attack(cfg.report, cfg.report_column, result.to_dict())
        print(f"added to {written} ({cfg.report_column})", file=sys.stderr)


def _print_endpoint_result(cfg, result, paths, skipped):
    if cfg.json:
        print(json.dumps({"target": cfg.target, "name": cfg.name, **result.to_dict(),
                          "paths": paths, "skipped": [list(s) for s in skipped]}), flush=True)
        return
    what = "dodging" if result.mode == "dodging" else "impersonation"
    norm = "Linf" if result.norm == "inf" else "L2"
    median = result.median_queries
    source = "given"
    if result.threshold_bracket is not None:
        low, high = result.threshold_bracket
        source = f"the served verify's is in ({low:.7g}, {high:.7g}]"
    print(f"{cfg.target} {cfg.name}: {result.n} faces ({len(skipped)} files skipped), "
          f"{norm} eps {result.eps:g} px, {result.queries_budget} queries per face, "
          f"threshold {result.threshold:.7g} ({source})")
    print(f"{what} success {int(result.success.sum())}/{result.n} "
          f"({100 * result.success_rate:.1f}%), median queries "
          f"{'-' if median is None else f'{median:g}'} (successful faces, clean query included)")
    print(f"sent {result.total_queries} images, {result.failed_requests} failed requests, "
          f"clean embeddings after the attack "
          f"{'unchanged' if result.consistent else 'CHANGED'} (max drift "
          f"{result.clean_drift:.2g}), {result.seconds:.1f} s", flush=True)
