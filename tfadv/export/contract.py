"""The serving contract: every name the exporter, the server and the client share.

A SavedModel written by `tfadv.export.export_model` exposes these signatures
(`saved_model_cli show --dir BASE_DIR/1 --all` lists them):

    serving_default  images   float32 [N, H, W, 3] raw RGB pixels in [0, 255]
                     -> embeddings  float32 [N, D], L2-normalised
    embed_uint8      images   uint8   [N, H, W, 3] the same, 4x smaller on the wire
                     -> embeddings  float32 [N, D]
    verify           images_a, images_b  float32 [N, H, W, 3]
                     -> similarity  float32 [N] (cosine of the two embeddings)
                        same_person bool    [N] (similarity >= the stored threshold)
    embed_images     images_bytes  string [N] encoded face crops (JPEG, PNG, GIF, BMP, WebP)
                     -> embeddings  float32 [N, D]
    verify_images    images_a_bytes, images_b_bytes  string [N]
                     -> similarity, same_person (as verify)

The `*_images` signatures decode and resize inside the graph
(`tfadv.export.images`), so a client sends a few KB of JPEG per face; over
REST the bytes travel as `{"b64": "..."}` (TF Serving's rule: input names
ending in `_bytes` hold binary data).

A SavedModel signature has one dtype per input, so raw uint8 pixels get their
own signature instead of a cast on the caller's side; clients in any language
can send float32 to `serving_default`.

Names live here, never in the code that uses them: the server validates
requests against the SavedModel's own signature defs, and the client and the
exporter import the names below.
"""

# Signatures.
SERVING_SIGNATURE = "serving_default"
EMBED_UINT8_SIGNATURE = "embed_uint8"
VERIFY_SIGNATURE = "verify"
EMBED_IMAGES_SIGNATURE = "embed_images"
VERIFY_IMAGES_SIGNATURE = "verify_images"

# Input keys.
IMAGES = "images"
IMAGES_A = "images_a"
IMAGES_B = "images_b"
IMAGES_BYTES = "images_bytes"
IMAGES_A_BYTES = "images_a_bytes"
IMAGES_B_BYTES = "images_b_bytes"

# Output keys.
EMBEDDINGS = "embeddings"
SIMILARITY = "similarity"
SAME_PERSON = "same_person"

# Model name and ports (TF Serving's defaults: gRPC 8500, REST 8501).
DEFAULT_MODEL_NAME = "facenet"
DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
DEFAULT_HOST = "127.0.0.1"

# Files.
THRESHOLD_FILE = "threshold.json"  # next to MODEL.keras, and in <version>/assets.extra/
THRESHOLD_KEY = "cosine_threshold"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"  # in <version>/assets.extra/
MODELS_CONFIG_FILE = "models.config"  # in BASE_DIR
BATCHING_PARAMETERS_FILE = "batching_parameters.txt"  # in BASE_DIR
MONITORING_CONFIG_FILE = "monitoring.config"  # in BASE_DIR: Prometheus metrics on
MONITORING_CONFIG = 'prometheus_config {\n  enable: true\n  path: "/monitoring/prometheus/metrics"\n}\n'
SAVED_MODEL_FILE = "saved_model.pb"

# Inside the tensorflow/serving container the base directory is mounted here.
CONTAINER_MODELS_ROOT = "/models"

# Pixel range of the raw images every signature takes.
PIXEL_MIN = 0.0
PIXEL_MAX = 255.0
