"""Settings of the serving commands: `tfadv export`, `tfadv serve`, `tfadv query`,
`tfadv attack-endpoint`."""

from __future__ import annotations

from dataclasses import dataclass

from tfadv import argtypes
from tfadv.config.core import check_pixel_budget
from tfadv.config.options import comma_list, setting
from tfadv.export import contract as C

_pos = argtypes.positive_int


@dataclass(frozen=True)
class BatchingOptions:
    """Server-side batching (TF Serving's `BatchingParameters`); None: the default, or
    the value of a batching parameters file."""

    max_batch_size: int | None = setting(None, type=_pos,
                                         help="largest merged batch (default 32)")
    batch_timeout_micros: int | None = setting(
        None, type=argtypes.nonneg_int,
        help="microseconds the first request of a batch waits for others (default 2000)")
    num_batch_threads: int | None = setting(None, type=_pos,
                                            help="batches processed in parallel (default 2)")
    max_enqueued_batches: int | None = setting(
        None, type=_pos, help="queue bound in batches; beyond it requests are refused "
                              "(default 100)")
    pad_batches: bool | None = setting(
        None, help="pad merged batches to 1, 2, 4, ..., max_batch_size (the default; a "
                   "file's allowed_batch_sizes); --no-pad-batches runs each at its own size "
                   "(on CPU padding only costs compute: FaceNet, 32 clients x 1 image: mean "
                   "batch 16 padded to 24)")

    def given(self) -> dict:
        """The fields that were set."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class ExportConfig:
    """Settings of `tfadv export`: a new version of an embedding model for TF Serving."""

    model: str = setting(positional=True,
                         help="MODEL.keras (threshold.json next to it is picked up)")
    out: str = setting(help="the model's base directory (BASE_DIR)")
    name: str = setting(C.DEFAULT_MODEL_NAME, help="model name")
    version: int | None = setting(None, type=_pos,
                                  help="version number (default: the next one; never overwrites)")
    threshold: float | None = setting(None, type=argtypes.cosine_threshold,
                                      help="cosine threshold for `verify` (default: from "
                                           "threshold.json)")
    warmup_batch_sizes: tuple = setting((1,), type=comma_list(_pos),
                                        help="batch sizes of the warm-up requests, e.g. 1,8")
    batching: BatchingOptions = setting(default_factory=BatchingOptions, prefix="",
                                        help="the batching parameters written with the model")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of `tfadv serve`: exported models over gRPC and REST (TF Serving protocol)."""

    base_dir: str | None = setting(None, positional=True,
                                   help="the model's base directory (omit with "
                                        "--model-config-file)")
    name: str = setting(C.DEFAULT_MODEL_NAME, help="model name")
    port: int = setting(C.DEFAULT_GRPC_PORT, type=argtypes.port, help="gRPC port (0: any free)")
    rest_port: int = setting(C.DEFAULT_REST_PORT, type=argtypes.port,
                             help="REST port (0: any free)")
    rest: bool = setting(True, help="serve REST too (--no-rest: gRPC only)")
    host: str = setting(C.DEFAULT_HOST, help="interface to bind (0.0.0.0 for all)")
    model_config_file: str | None = setting(
        None, help="TF Serving ModelServerConfig text file listing the models")
    poll_interval: float = setting(1.0, type=argtypes.nonneg_float,
                                   help="seconds between scans for new versions (0: never)")
    workers: int = setting(64, type=_pos, help="gRPC worker threads")
    max_message_mb: int = setting(256, type=_pos, help="largest gRPC message, MB")
    grace: float = setting(30.0, type=argtypes.nonneg_float,
                           help="seconds in-flight requests get to finish on SIGTERM")
    ssl_cert: str | None = setting(None, help="PEM certificate (enables TLS)")
    ssl_key: str | None = setting(None, help="PEM private key")
    ssl_client_ca: str | None = setting(None, help="PEM CA: require client certificates")
    warmup: bool = setting(True, help="replay the warm-up requests before serving")
    monitoring_config_file: str | None = setting(
        None, help="TF Serving MonitoringConfig text file: prometheus_config { enable: true } "
                   "serves Prometheus metrics on the REST port")
    enable_batching: bool = setting(False, help="merge concurrent requests into batches")
    batching_parameters_file: str | None = setting(
        None, help="TF Serving BatchingParameters text file (implies --enable-batching)")
    max_request_batch: int | None = setting(
        None, type=_pos, help="largest batch one request may carry (default: "
                              "--max-batch-size with batching, else 256)")
    batching: BatchingOptions = setting(default_factory=BatchingOptions, prefix="",
                                        help="batching parameters (with --enable-batching; "
                                             "they override the file's)")

    def __post_init__(self):
        if self.base_dir is None and self.model_config_file is None:
            raise ValueError("Pass BASE_DIR (an exported model directory) or "
                             "--model-config-file.")
        if self.base_dir is not None and self.model_config_file is not None:
            raise ValueError("Pass either BASE_DIR or --model-config-file, not both.")


@dataclass(frozen=True)
class QueryConfig:
    """Settings of `tfadv query`: embed the faces of image files with a served model."""

    target: str = setting(positional=True, help="HOST:PORT of the gRPC endpoint")
    images: tuple = setting(positional=True, help="image files (JPEG, PNG, ...)")
    crop: bool = setting(True, help="detect and crop the face (--no-crop: the images are "
                                    "already face crops; the centre square is resized)")
    encoding: str = setting("png", choices=("png", "jpeg", "raw"),
                            help="how each crop is sent: png (lossless, ~38 KB a face) or jpeg "
                                 "(~10 KB) to the embed_images signature, or raw uint8 pixels "
                                 "(~77 KB) to embed_uint8 (models exported without "
                                 "embed_images)")
    name: str = setting(C.DEFAULT_MODEL_NAME, help="model name")
    version: int | None = setting(None, type=_pos, help="pin a version")
    timeout: float = setting(10.0, type=argtypes.positive_float,
                             help="deadline per call, seconds")
    batch_size: int = setting(32, type=_pos, help="images per request")
    ssl_root_cert: str | None = setting(None, help="PEM CA certificate (enables TLS)")
    json: bool = setting(False, help="print one JSON object per image")


@dataclass(frozen=True)
class EndpointAttackConfig:
    """Settings of `tfadv attack-endpoint`: a score-based black-box attack (Square) on a
    served face-embedding model, through the gRPC client only."""

    target: str = setting(positional=True, help="HOST:PORT of the gRPC endpoint")
    faces: str = setting(help="face photos, one sub-folder per identity")
    name: str = setting(C.DEFAULT_MODEL_NAME, help="model name")
    eps: float = setting(4.0, type=argtypes.positive_float,
                         help="budget in pixels (0-255): largest change per pixel (inf) or "
                              "L2 norm (2)")
    queries: int = setting(1000, type=_pos,
                           help="search queries per face (its clean query comes on top)")
    norm: str = setting("inf", type=argtypes.norm, help="threat model: inf or 2")
    mode: str = setting("dodging", choices=("dodging", "impersonation"),
                        help="dodging (no longer matches its own photo) or impersonation "
                             "(matches a face of --targets)")
    targets: str | None = setting(None, help="with --mode impersonation: folder of faces to "
                                             "impersonate (face i aims at target i mod M)")
    threshold: float | None = setting(
        None, type=argtypes.cosine_threshold,
        help="cosine threshold of the face system (default: bracketed from the served "
             "verify signature's answers)")
    limit: int | None = setting(None, type=_pos, help="attack only the first N faces")
    seed: int = setting(0, type=argtypes.nonneg_int, help="random seed of the search")
    crop: bool = setting(True, help="detect and crop the face (--no-crop: the images are "
                                    "already face crops; the centre square is resized)")
    version: int | None = setting(None, type=_pos, help="pin a version")
    timeout: float = setting(10.0, type=argtypes.positive_float,
                             help="deadline per call, seconds")
    wait: float = setting(0.0, type=argtypes.nonneg_float,
                          help="seconds to wait for the model to become available (0: fail "
                               "at once when the endpoint does not answer)")
    batch_size: int = setting(32, type=_pos, help="images per request")
    ssl_root_cert: str | None = setting(None, help="PEM CA certificate (enables TLS)")
    json: bool = setting(False, help="print one JSON object")
    report: str | None = setting(None, help="a FaceNet report directory (metrics.json of "
                                            "`tfadv facenet finetune`): add the result to it "
                                            "and re-render its report.md")
    report_column: str | None = setting(None, choices=("pretrained", "finetuned"),
                                        help="with --report: the served model is the "
                                             "report's pretrained or fine-tuned model")

    def __post_init__(self):
        if (self.targets is not None) != (self.mode == "impersonation"):
            raise ValueError("--mode impersonation needs --targets (the faces to impersonate); "
                             "dodging takes none.")
        check_pixel_budget(self.eps, self.norm, name="eps")
        if (self.report is None) != (self.report_column is None):
            raise ValueError("--report DIR and --report-column {pretrained,finetuned} go "
                             "together: the column says which of the report's models is served.")


__all__ = ["BatchingOptions", "EndpointAttackConfig", "ExportConfig", "QueryConfig",
           "ServeConfig"]
