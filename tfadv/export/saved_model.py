"""Export an embedding model to a SavedModel in TensorFlow Serving's directory layout.

    BASE_DIR/
      1/saved_model.pb, variables/, assets.extra/{tf_serving_warmup_requests,threshold.json}
      2/...
      models.config             ModelServerConfig text proto (base_path /models/NAME)
      batching_parameters.txt   BatchingParameters text proto
      monitoring.config         MonitoringConfig text proto (Prometheus metrics on)
      README.md                 the exact `docker run tensorflow/serving ...` commands

The config files live inside BASE_DIR, so one bind mount of BASE_DIR at
/models/NAME gives the container the versions and the configs together
(TF Serving only loads all-digit directory names and ignores the rest).
A version is written to a hidden temporary directory inside BASE_DIR and then
renamed into place, so a server polling BASE_DIR never sees half a version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfadv.models.saved import load_saved
from tfadv import files
from tfadv.config.core import check_threshold
from tfadv.export import contract as C
from tfadv.export.batching import BatchingParameters
from tfadv.data.images import encode_image
from tfadv.export.images import decode_crops


def list_versions(base_dir: str) -> list[int]:
    """The version numbers present in a TF Serving base directory, ascending.

    Only all-digit directory names count, as in TF Serving; temporary
    directories of an export in progress start with '.' and are skipped.
    """
    if not os.path.isdir(base_dir):
        return []
    out = []
    for entry in os.listdir(base_dir):
        if entry.isascii() and entry.isdigit() and os.path.isdir(os.path.join(base_dir, entry)):
            out.append(int(entry))
    return sorted(out)


def read_threshold(path) -> float:
    """Reads the cosine threshold: `tfadv.evaluation.verification.load_threshold`.

    Args:
        path: the json file, or a directory holding `threshold.json`, or a
            model file whose directory holds it.

    Returns:
        The threshold as a float in [-1, 1].

    Raises:
        FileNotFoundError: if there is no threshold file.
        ValueError: if the file lacks `cosine_threshold` or holds a bad value.
    """
    # Imported here: tfadv.evaluation.verification imports tfadv.export.contract, so a
    # module-level import would be a cycle (tfadv.export -> verification -> tfadv.export).
    from tfadv.evaluation.verification import load_threshold

    return load_threshold(path)


def _load(model_or_path):
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path
    # tfadv's custom layers are registered: importing this module imported the tfadv package.
    return load_saved(model_or_path, hint="Expected a .keras file written by "
                                          "`tfadv facenet finetune` or `model.save(...)`.")


def image_shape(model) -> tuple[int, int]:
    """(height, width) of an embedding model's image input.

    Raises:
        ValueError: unless the model has one input of shape (None, H, W, 3)
            and one output of shape (None, D).
    """
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    if not inputs or len(inputs) != 1 or not outputs or len(outputs) != 1:
        raise ValueError(
            "Expected a functional or sequential Keras model with one image input and one "
            f"embedding output. Received a model with inputs={inputs} and outputs={outputs}."
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError("Expected the model input shape (None, H, W, 3) with H and W fixed "
                         f"(raw RGB pixels). Received: input shape {shape}")
    out_shape = tuple(outputs[0].shape)
    if len(out_shape) != 2 or out_shape[1] is None:
        raise ValueError("Expected the model output shape (None, D) (an embedding per image). "
                         f"Received: output shape {out_shape}")
    return int(shape[1]), int(shape[2])


def _build_archive(model, threshold):
    h, w = image_shape(model)
    threshold = tf.constant(threshold, tf.float32)

    def embed(images):
        emb = model(images, training=False)
        # Guarantees the contract even for a model whose head skipped the norm
        # (for an already normalised embedding this changes nothing above 1e-7).
        return tf.math.l2_normalize(tf.cast(emb, tf.float32), axis=-1)

    def serving_default(images):
        return {C.EMBEDDINGS: embed(images)}

    def embed_uint8(images):
        return {C.EMBEDDINGS: embed(tf.cast(images, tf.float32))}

    def verify(images_a, images_b):
        n = tf.shape(images_a)[0]
        # One model call on both halves: half the per-call overhead.
        emb = embed(tf.concat([images_a, images_b], axis=0))
        sim = tf.reduce_sum(emb[:n] * emb[n:], axis=-1)
        return {C.SIMILARITY: sim, C.SAME_PERSON: sim >= threshold}

    def embed_images(images_bytes):
        return serving_default(decode_crops(images_bytes, h, name=C.IMAGES_BYTES))

    def verify_images(images_a_bytes, images_b_bytes):
        return verify(decode_crops(images_a_bytes, h, name=C.IMAGES_A_BYTES),
                      decode_crops(images_b_bytes, h, name=C.IMAGES_B_BYTES))

    def spec(dtype, name):
        return tf.TensorSpec([None, h, w, 3], dtype, name=name)

    def encoded(name):
        return tf.TensorSpec([None], tf.string, name=name)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(C.SERVING_SIGNATURE, serving_default,
                         input_signature=[spec(tf.float32, C.IMAGES)])
    archive.add_endpoint(C.EMBED_UINT8_SIGNATURE, embed_uint8,
                         input_signature=[spec(tf.uint8, C.IMAGES)])
    archive.add_endpoint(C.VERIFY_SIGNATURE, verify,
                         input_signature=[spec(tf.float32, C.IMAGES_A),
                                          spec(tf.float32, C.IMAGES_B)])
    if h == w:  # the crop pipeline makes square images
        archive.add_endpoint(C.EMBED_IMAGES_SIGNATURE, embed_images,
                             input_signature=[encoded(C.IMAGES_BYTES)])
        archive.add_endpoint(C.VERIFY_IMAGES_SIGNATURE, verify_images,
                             input_signature=[encoded(C.IMAGES_A_BYTES),
                                              encoded(C.IMAGES_B_BYTES)])
    return archive


def warmup_requests(name: str, image_size: tuple[int, int], batch_sizes=(1,), seed: int = 0):
    """PredictionLog records that exercise every exported signature.

    Args:
        name: the model name the requests address.
        image_size: (height, width).
        batch_sizes: one record per signature and batch size.
        seed: seed for the random pixels.

    Returns:
        A list of `tensorflow_serving.apis.prediction_log_pb2.PredictionLog`.
    """
    rng = np.random.default_rng(seed)
    h, w = image_size
    logs = []
    for n in batch_sizes:
        pixels = rng.integers(0, 256, size=(2, n, h, w, 3))
        per_signature = {
            C.SERVING_SIGNATURE: {C.IMAGES: pixels[0].astype(np.float32)},
            C.EMBED_UINT8_SIGNATURE: {C.IMAGES: pixels[0].astype(np.uint8)},
            C.VERIFY_SIGNATURE: {C.IMAGES_A: pixels[0].astype(np.float32),
                                 C.IMAGES_B: pixels[1].astype(np.float32)},
        }
        if h == w:
            files = [_encode(p, i) for p in pixels[:2] for i in range(n)]
            per_signature[C.EMBED_IMAGES_SIGNATURE] = {C.IMAGES_BYTES: np.array(files[:n],
                                                                                 object)}
            per_signature[C.VERIFY_IMAGES_SIGNATURE] = {
                C.IMAGES_A_BYTES: np.array(files[:n], object),
                C.IMAGES_B_BYTES: np.array(files[n:], object)}
        for signature, inputs in per_signature.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.model_spec.signature_name = signature
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def _encode(pixels, i):
    """One warm-up photo: even indices PNG, odd JPEG (both decoders run at load time)."""
    return encode_image(pixels[i], "png" if i % 2 == 0 else "jpeg")


def read_warmup_requests(path: str):
    """Parses a `tf_serving_warmup_requests` file back into PredictionLog records."""
    out = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        out.append(log)
    return out


def models_config_text(name: str, base_path: str) -> str:
    """A ModelServerConfig text proto serving the latest version of one model."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = base_path
    model.model_platform = "tensorflow"
    model.model_version_policy.latest.num_versions = 1
    return text_format.MessageToString(config)


def _readme(name, base_dir, versions, image_size, dim, threshold):
    h, w = image_size
    src = os.path.abspath(base_dir)
    target = f"{C.CONTAINER_MODELS_ROOT}/{name}"
    return f"""# `{name}`: face embeddings over the TensorFlow Serving protocol

Versions: {", ".join(str(v) for v in versions)} (the newest is served).
Written by `tfadv export`; every version directory is a SavedModel that the
stock `tensorflow/serving` image loads unchanged.

## Signatures

| signature | inputs | outputs |
|---|---|---|
| `{C.SERVING_SIGNATURE}` | `{C.IMAGES}` float32 [N, {h}, {w}, 3], raw RGB in [0, 255] | `{C.EMBEDDINGS}` float32 [N, {dim}], L2-normalised |
| `{C.EMBED_UINT8_SIGNATURE}` | `{C.IMAGES}` uint8 [N, {h}, {w}, 3] | `{C.EMBEDDINGS}` float32 [N, {dim}] |
| `{C.VERIFY_SIGNATURE}` | `{C.IMAGES_A}`, `{C.IMAGES_B}` float32 [N, {h}, {w}, 3] | `{C.SIMILARITY}` float32 [N], `{C.SAME_PERSON}` bool [N] (cosine >= {threshold:.6g}) |
| `{C.EMBED_IMAGES_SIGNATURE}` | `{C.IMAGES_BYTES}` string [N]: JPEG, PNG, GIF, BMP or WebP face crops (resized in the graph) | `{C.EMBEDDINGS}` float32 [N, {dim}] |
| `{C.VERIFY_IMAGES_SIGNATURE}` | `{C.IMAGES_A_BYTES}`, `{C.IMAGES_B_BYTES}` string [N] | `{C.SIMILARITY}`, `{C.SAME_PERSON}` (as `{C.VERIFY_SIGNATURE}`) |

Check them with `saved_model_cli show --dir {src}/{versions[-1]} --all`.

## TensorFlow Serving (Docker)

```sh
docker run --rm -p 8500:8500 -p 8501:8501 \\
  --mount type=bind,source={src},target={target} \\
  -e MODEL_NAME={name} -t tensorflow/serving \\
  --enable_batching --batching_parameters_file={target}/{C.BATCHING_PARAMETERS_FILE} \\
  --enable_model_warmup --monitoring_config_file={target}/{C.MONITORING_CONFIG_FILE}
```

With the model config file instead of `MODEL_NAME` (it takes precedence):

```sh
docker run --rm -p 8500:8500 -p 8501:8501 \\
  --mount type=bind,source={src},target={target} \\
  -t tensorflow/serving \\
  --model_config_file={target}/{C.MODELS_CONFIG_FILE} \\
  --enable_batching --batching_parameters_file={target}/{C.BATCHING_PARAMETERS_FILE} \\
  --enable_model_warmup --monitoring_config_file={target}/{C.MONITORING_CONFIG_FILE}
```

`{C.MODELS_CONFIG_FILE}`, `{C.BATCHING_PARAMETERS_FILE}` and `{C.MONITORING_CONFIG_FILE}` sit in
this directory, so one mount carries them with the versions; TF Serving only loads all-digit
directory names and ignores everything else here.

## Without Docker

```sh
tfadv serve {src} --name {name} --port 8500 --rest-port 8501 --enable-batching \\
  --monitoring-config-file {src}/{C.MONITORING_CONFIG_FILE}
tfadv query 127.0.0.1:8500 --name {name} face1.jpg face2.png --json
curl http://127.0.0.1:8501/v1/models/{name}/metadata
curl http://127.0.0.1:8501/monitoring/prometheus/metrics
```
"""


def export_model(model_or_path, base_dir, *, name: str = C.DEFAULT_MODEL_NAME,
                 version: int | None = None, threshold: float | None = None,
                 warmup_batch_sizes=(1,), batching: BatchingParameters | None = None,
                 verbose: bool = False) -> str:
    """Exports an embedding model as a new version in a TF Serving base directory.

    Writes `BASE_DIR/<version>/` (SavedModel with the signatures of
    `tfadv.export.contract`, warm-up requests and the threshold in
    `assets.extra/`), then refreshes `models.config`,
    `batching_parameters.txt` and `README.md` in BASE_DIR.

    Args:
        model_or_path: a Keras model taking [N, H, W, 3] raw RGB pixels in
            [0, 255] and returning L2-normalised embeddings [N, D], or the
            path of such a `.keras` file (loaded with `safe_mode=True`).
        base_dir: the model's base directory (created if missing).
        name: the model name used in models.config, the warm-up requests and
            the README.
        version: the version number; default: one more than the newest
            present (1 for an empty base directory). Existing versions are
            never overwritten.
        threshold: the cosine threshold baked into `verify`; default: read
            from `threshold.json` next to the `.keras` file.
        warmup_batch_sizes: batch sizes of the warm-up requests.
        batching: the batching parameters to write; default
            `BatchingParameters.with_padding(32)` (batches of up to 32,
            padded to 1, 2, 4, ..., 32).
        verbose: print the endpoints Keras exported.

    Returns:
        The path of the new version directory.

    Raises:
        FileNotFoundError: if the model or its threshold file is missing.
        ValueError: for a model that does not fit the contract, a bad
            threshold or version, or a version that already exists.

    Example:

    ```python
    path = export_model("runs/facenet/embedder.keras", "exported/facenet", name="facenet")
    # -> exported/facenet/1
    ```
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"Expected a model name such as 'facenet'. Received: name={name!r}")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 1):
        raise ValueError(f"Expected version to be an integer >= 1. Received: version={version!r}")
    batch_sizes = tuple(warmup_batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError("Expected warmup_batch_sizes to be positive integers. "
                         f"Received: warmup_batch_sizes={warmup_batch_sizes!r}")
    if isinstance(model_or_path, (str, os.PathLike)) and not os.path.isfile(model_or_path):
        _load(model_or_path)  # raises FileNotFoundError naming the path
    if threshold is None:
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise ValueError("Pass threshold=<cosine threshold> when exporting a model object "
                             f"(it is read from {C.THRESHOLD_FILE} only for a model path).")
        threshold = read_threshold(os.fspath(model_or_path))
    threshold = check_threshold(threshold)
    batching = batching or BatchingParameters.with_padding(32)

    model = _load(model_or_path)
    size = image_shape(model)
    dim = int(model.outputs[0].shape[-1])
    archive = _build_archive(model, threshold)

    os.makedirs(base_dir, exist_ok=True)
    requested = version
    if requested is not None and os.path.exists(os.path.join(base_dir, str(requested))):
        raise ValueError(f"Version {requested} already exists in {base_dir!r}; versions are never "
                         "overwritten. Omit the version to write the next one.")
    # A leading '.' keeps TF Serving (and our server) from ever looking at it.
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=base_dir)
    try:
        archive.write_out(tmp, verbose=verbose)
        extra = os.path.join(tmp, C.ASSETS_EXTRA)
        os.makedirs(extra, exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(extra, C.WARMUP_FILE)) as writer:
            for log in warmup_requests(name, size, batch_sizes):
                writer.write(log.SerializeToString())
        with open(os.path.join(extra, C.THRESHOLD_FILE), "w") as f:
            json.dump({C.THRESHOLD_KEY: threshold, "image_size": list(size),
                       "embedding_dim": dim}, f, indent=1)
        version_dir = _publish(tmp, base_dir, requested)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)

    versions = list_versions(base_dir)
    files.write_text(os.path.join(base_dir, C.MODELS_CONFIG_FILE),
                  models_config_text(name, f"{C.CONTAINER_MODELS_ROOT}/{name}"))
    files.write_text(os.path.join(base_dir, C.BATCHING_PARAMETERS_FILE), batching.to_text())
    files.write_text(os.path.join(base_dir, C.MONITORING_CONFIG_FILE), C.MONITORING_CONFIG)
    files.write_text(os.path.join(base_dir, "README.md"),
                  _readme(name, base_dir, versions, size, dim, threshold))
    return version_dir


def _publish(tmp, base_dir, requested):
    """Renames the finished temporary directory to its version number."""
    for _ in range(100):
        version = requested if requested is not None else max(list_versions(base_dir) or [0]) + 1
        target = os.path.join(base_dir, str(version))
        if os.path.exists(target):
            if requested is not None:
                raise ValueError(f"Version {version} already exists in {base_dir!r}; versions "
                                 "are never overwritten. Omit the version to write the next one.")
            continue
        try:
            # rename(2) is atomic; it fails on a non-empty target, so an export
            # racing this one cannot be overwritten either.
            os.rename(tmp, target)
        except OSError:
            if requested is not None:
                raise ValueError(f"Version {version} appeared in {base_dir!r} while exporting; "
                                 "versions are never overwritten.") from None
            continue
        return target
    raise ValueError(f"Could not find a free version number in {base_dir!r}.")
