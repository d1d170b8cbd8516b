"""A gRPC client for the exported face-embedding model, NumPy in and out.

It uses the stock `tensorflow_serving.apis` stubs, so it talks to
`tfadv serve` and to the real TensorFlow Serving alike.
"""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfadv.data import faces
from tfadv.data.images import ENCODINGS, encode_image
from tfadv.export import contract as C
from tfadv.serving.tensors import dtype_name, to_numpy, to_tensor_proto

_MB = 1 << 20
# gRPC clamps a retry policy's maxAttempts at 5 (the first attempt and 4 retries).
MAX_RETRIES = 4


def retry_service_config(retries: int = 3, backoff: float = 0.1) -> dict:
    """The gRPC service config that retries UNAVAILABLE calls with exponential backoff.

    Args:
        retries: extra attempts after an UNAVAILABLE error, 1 to `MAX_RETRIES`.
        backoff: first retry delay in seconds; doubles per attempt (gRPC
            spreads each delay by +-20% so that clients do not retry in lockstep).

    Returns:
        A service config dict with one `retryPolicy` for every method, for the
        `grpc.service_config` channel option (as JSON).
    """
    if not 1 <= retries <= MAX_RETRIES:
        raise ValueError(f"Expected 1 <= retries <= {MAX_RETRIES} (gRPC makes at most "
                         f"{MAX_RETRIES + 1} attempts). Received: retries={retries}")
    if not backoff > 0:
        raise ValueError(f"Expected backoff > 0 seconds. Received: backoff={backoff}")

    def duration(seconds):
        return f"{max(seconds, 1e-9):.9f}s"

    return {"methodConfig": [{
        "name": [{}],  # every service and method of the channel
        "retryPolicy": {
            "maxAttempts": retries + 1,
            "initialBackoff": duration(backoff),
            "maxBackoff": duration(backoff * 2 ** (retries - 1)),
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]}


def retry_channel_options(retries: int = 3, backoff: float = 0.1) -> list:
    """gRPC channel options that make the channel retry UNAVAILABLE calls.

    For a channel opened outside `Client` (pass it as `channel=`):
    `grpc.insecure_channel(target, options=retry_channel_options())`.
    With `retries=0`, options that turn gRPC's retries off.
    """
    if retries == 0:
        return [("grpc.enable_retries", 0)]
    return [("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(retry_service_config(retries, backoff)))]


class Client:
    """Embeddings and verification from a model served over TF Serving's gRPC API.

    Every call has a deadline (`timeout`, covering its retries); calls that
    fail with UNAVAILABLE (server starting, restarting or overloaded) are
    retried with exponential backoff by gRPC's own retry policy (see
    `retry_service_config`); any other error is raised at once as the
    `grpc.RpcError` the server sent (its `.code()` and `.details()` say what
    to fix).

    Args:
        target: "host:port" of the gRPC endpoint.
        name: the model name.
        version: a version number to pin; None for the newest.
        timeout: deadline of each call, retries included, in seconds.
        max_message_mb: send and receive message limit (big batches of
            160x160 images need more than gRPC's 4 MB default).
        retries: extra attempts after an UNAVAILABLE error, 0 to `MAX_RETRIES`.
        backoff: first retry delay in seconds; doubles per attempt.
        batch_size: `embed` and `verify` send at most this many examples per
            call (the server refuses batches above its limit).
        root_certificates: PEM bytes or a path; given, the channel uses TLS.
        channel: an existing `grpc.Channel` to use instead of opening one;
            it retries as it was opened to (`retries` and `backoff` are not
            applied to it: open it with `retry_channel_options`).

    Example:

    ```python
    from tfadv.serving import Client

    with Client("127.0.0.1:8500", name="facenet") as client:
        emb = client.embed(images)              # [N, 160, 160, 3] uint8 or float32 -> [N, D]
        sim, same = client.verify(faces_a, faces_b)
        results = client.embed_files(["photo.jpg"])  # MTCNN face crop, as `tfadv facenet embed`
    ```
    """

    def __init__(self, target: str, name: str = C.DEFAULT_MODEL_NAME, *, version=None,
                 timeout: float = 10.0, max_message_mb: int = 256, retries: int = 3,
                 backoff: float = 0.1, batch_size: int = 32, root_certificates=None,
                 channel=None):

        if timeout <= 0:
            raise ValueError(f"Expected timeout > 0 seconds. Received: timeout={timeout}")
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"Expected 0 <= retries <= {MAX_RETRIES} (gRPC makes at most "
                             f"{MAX_RETRIES + 1} attempts). Received: retries={retries}")
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
        self.target = target
        self.name = name
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.batch_size = batch_size
        self._own_channel = channel is None
        if channel is None:
            options = [("grpc.max_send_message_length", max_message_mb * _MB),
                       ("grpc.max_receive_message_length", max_message_mb * _MB),
                       *retry_channel_options(retries, backoff)]
            if root_certificates is not None:
                if isinstance(root_certificates, str):
                    with open(root_certificates, "rb") as f:
                        root_certificates = f.read()
                creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self._channel = channel
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        self._metadata = None

    # ------------------------------------------------------------ plumbing

    def _call(self, method, request):
        return method(request, timeout=self.timeout)

    def _spec(self, spec, signature_name=""):
        spec.name = self.name
        if self.version is not None:
            spec.version.value = int(self.version)
        if signature_name:
            spec.signature_name = signature_name

    def predict(self, inputs: dict, signature_name: str = C.SERVING_SIGNATURE,
                output_filter=None) -> dict:
        """One Predict call: a dict of arrays in, a dict of arrays out.

        Raises:
            grpc.RpcError: with the server's status code and message.
        """


        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature_name)
        for key, value in inputs.items():
            to_tensor_proto(value, out=request.inputs[key])
        if output_filter:
            request.output_filter.extend(output_filter)
        response = self._call(self._predict_stub.Predict, request)
        return {k: to_numpy(v, f"output '{k}'") for k, v in response.outputs.items()}

    def _images(self, images, what="images"):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected {what} of shape [N, H, W, 3] (or one [H, W, 3] image) "
                             f"of raw RGB pixels. Received: shape {images.shape}")
        if images.shape[0] == 0:
            raise ValueError(f"Expected at least one image in {what}. Received: shape "
                             f"{images.shape}")
        if images.dtype.kind not in "uif":
            raise ValueError(f"Expected numeric pixels in {what}. Received: dtype {images.dtype}")
        return images

    # ------------------------------------------------------------ the model

    def embed(self, images) -> np.ndarray:
        """Embeddings of raw RGB images.

        Args:
            images: [N, H, W, 3] (or [H, W, 3]) pixels in [0, 255]; uint8 is
                sent as is (the compact `embed_uint8` signature), anything else
                as float32.

        Returns:
            float32 [N, D], L2-normalised.

        Shape:
            H and W must be the model's input size (see `image_size`).
        """
        images = self._images(images)
        if images.dtype == np.uint8:
            signature = C.EMBED_UINT8_SIGNATURE
        else:
            signature, images = C.SERVING_SIGNATURE, images.astype(np.float32, copy=False)
        return self._embed_batches(signature, C.IMAGES, images)

    def embed_encoded(self, files) -> np.ndarray:
        """Embeddings of encoded face crops, decoded and resized by the served model.

        Args:
            files: a list of JPEG, PNG, GIF, BMP or WebP file contents (bytes), each
                a face crop (centre square used, resized in the graph; see
                `tfadv.export.images`).

        Returns:
            float32 [N, D], L2-normalised.

        Raises:
            ValueError: `files` is empty or holds something other than bytes.
            grpc.RpcError: INVALID_ARGUMENT naming the indices of files that do
                not decode; NOT_FOUND when the served model has no
                `embed_images` signature (exported before it existed).
        """
        files = list(files)
        if not files or not all(isinstance(f, bytes) for f in files):
            raise ValueError("Expected a non-empty list of encoded image files (bytes).")
        return self._embed_batches(C.EMBED_IMAGES_SIGNATURE, C.IMAGES_BYTES,
                                   np.array(files, dtype=object))

    def _embed_batches(self, signature, key, values) -> np.ndarray:
        """Embeddings of `values` [N, ...], `batch_size` per request to `signature`."""
        parts = [self.predict({key: values[i:i + self.batch_size]}, signature)[C.EMBEDDINGS]
                 for i in range(0, len(values), self.batch_size)]
        return np.concatenate(parts, axis=0)

    def embed_files(self, paths, *, crop: bool = True, detector=None,
                    cache: bool = True, encoding: str | None = "png") -> list[dict]:
        """Embeddings of photo files, read and cropped exactly as the rest of tfadv does.

        Each file goes through `tfadv.data.faces.load_face` (the one reader:
        EXIF orientation applied, transparency composited on white, 16-bit
        greyscale scaled, palette and CMYK converted; then the MTCNN crop of
        the largest face with the default margin), the same path as
        `tfadv facenet embed`, training and generation, so the same file gives
        the same embedding whichever command embeds it.

        Args:
            paths: image files.
            crop: crop the largest face (default); False for files that are
                already face crops (centre square, resized; as `--no-crop`
                and `detector="none"` elsewhere).
            detector: a FaceDetector-like object instead of the shared MTCNN
                one (only with `crop=True`).
            cache: read and write tfadv's crop cache (see `load_face`).
            encoding: how each crop travels: "png" (default; lossless, about
                38 KB per face, the in-process embedding exactly) or "jpeg"
                (quality 95, about 10 KB, cosine >= 0.998 to it) to the
                `embed_images` signature; None sends the raw uint8 pixels
                (77 KB at 160 x 160) to `embed_uint8`, as models exported
                without `embed_images` need.

        Returns:
            One dict per path, in order: `{"path", "embedding": [D floats]}`,
            or `{"path", "error": message}` for a file that is missing, not an
            image, or has no face.

        Raises:
            ValueError: if the served model's input is not square (face crops
                are), `detector` is given with `crop=False`, or an unknown
                encoding.
            grpc.RpcError: with the server's status code and message.
        """

        if detector is not None and not crop:
            raise ValueError("crop=False takes the centre of each image and uses no detector; "
                             "pass either crop=False or a detector, not both.")
        height, width = self.image_size
        if height != width:
            raise ValueError(f"Model {self.name!r} takes {height}x{width} images, but face crops "
                             "are square; call `embed` with your own [N, H, W, 3] pixels.")
        if encoding is not None and encoding not in ENCODINGS:
            raise ValueError(f"Expected encoding in {ENCODINGS} or None. Received: {encoding!r}")
        embed = self.embed if encoding is None else (
            lambda crops: self.embed_encoded([encode_image(c, encoding) for c in crops]))
        return faces.embed_files(paths, embed, size=height,
                                 detector=detector if crop else "none", cache=cache)

    def verify(self, images_a, images_b) -> tuple[np.ndarray, np.ndarray]:
        """Whether pairs of face images show the same person.

        Args:
            images_a, images_b: [N, H, W, 3] raw RGB pixels, pair i is
                (images_a[i], images_b[i]).

        Returns:
            (similarity float32 [N], same_person bool [N]) at the threshold
            exported with the model.
        """
        a = self._images(images_a, "images_a").astype(np.float32, copy=False)
        b = self._images(images_b, "images_b").astype(np.float32, copy=False)
        if a.shape != b.shape:
            raise ValueError("Expected images_a and images_b of the same shape. Received: "
                             f"{a.shape} and {b.shape}")
        sims, sames = [], []
        for i in range(0, len(a), self.batch_size):
            out = self.predict({C.IMAGES_A: a[i:i + self.batch_size],
                                C.IMAGES_B: b[i:i + self.batch_size]}, C.VERIFY_SIGNATURE)
            sims.append(out[C.SIMILARITY])
            sames.append(out[C.SAME_PERSON])
        return np.concatenate(sims), np.concatenate(sames)

    def metadata(self) -> dict:
        """The served model's signatures, as plain Python.

        Returns:
            {"name", "version", "signatures": {key: {"inputs": {k: {"dtype",
            "shape"}}, "outputs": {...}}}, "image_size": (H, W) or None,
            "embedding_dim": D or None}; shapes use -1 for any size.
        """


        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self._predict_stub.GetModelMetadata, request)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)

        def spec(info):
            shape = (None if info.tensor_shape.unknown_rank
                     else [int(d.size) for d in info.tensor_shape.dim])
            return {"dtype": dtype_name(info.dtype), "shape": shape}

        signatures = {key: {"inputs": {k: spec(v) for k, v in sorted(s.inputs.items())},
                            "outputs": {k: spec(v) for k, v in sorted(s.outputs.items())}}
                      for key, s in sorted(defs.signature_def.items())}
        default = signatures.get(C.SERVING_SIGNATURE, {})
        image = default.get("inputs", {}).get(C.IMAGES, {}).get("shape")
        emb = default.get("outputs", {}).get(C.EMBEDDINGS, {}).get("shape")
        meta = {"name": response.model_spec.name, "version": response.model_spec.version.value,
                "signatures": signatures,
                "image_size": tuple(image[1:3]) if image and len(image) == 4 else None,
                "embedding_dim": emb[-1] if emb and len(emb) == 2 else None}
        self._metadata = meta
        return meta

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the model takes, from its metadata (fetched once)."""
        meta = self._metadata or self.metadata()
        if meta["image_size"] is None:
            raise ValueError(f"Model {self.name!r} has no '{C.SERVING_SIGNATURE}' signature "
                             f"with an '{C.IMAGES}' input of shape [N, H, W, 3].")
        return meta["image_size"]

    def status(self) -> list[dict]:
        """The model's versions and their states (GetModelStatus).

        Returns:
            [{"version": int, "state": "AVAILABLE" | "LOADING" | "END" | ...,
            "error_code": "OK" | ..., "error_message": str}], newest first.
        """

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self._model_stub.GetModelStatus, request)
        states = get_model_status_pb2.ModelVersionStatus.State
        out = []
        for s in response.model_version_status:
            code_enum = s.status.DESCRIPTOR.fields_by_name["error_code"].enum_type
            out.append({"version": int(s.version), "state": states.Name(s.state),
                        "error_code": code_enum.values_by_number[s.status.error_code].name,
                        "error_message": s.status.error_message})
        return out

    def wait_until_ready(self, timeout: float = 30.0) -> "Client":
        """Blocks until the model has an AVAILABLE version.

        Raises:
            TimeoutError: if it does not within `timeout` seconds.
        """

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                if any(s["state"] == "AVAILABLE" for s in self.status()):
                    return self
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.1)
        raise TimeoutError(f"Model {self.name!r} at {self.target} was not ready within "
                           f"{timeout} s (last error: {last}).")

    def close(self):
        """Closes the channel (if this client opened it)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
