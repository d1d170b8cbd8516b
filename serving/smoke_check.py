"""Check a running model server over gRPC and REST: status, signature, one embedding.

    python serving/smoke_check.py                        # 127.0.0.1:8500 (gRPC) and :8501 (REST)
    python serving/smoke_check.py --host 10.0.0.5 --name facenet --image face.jpg
    python serving/smoke_check.py --rest-port 0          # gRPC only

Run it after `tfadv serve ...` or `docker compose -f serving/docker-compose.yml up`
(or against any TensorFlow Serving) to see that a deploy answers as clients
expect. It talks to the server with the stock `tensorflow_serving.apis` stubs
and plain HTTP, as any TF Serving client does, and checks in turn:

- gRPC GetModelStatus: a version of the model is AVAILABLE;
- gRPC GetModelMetadata: the signature exists; prints its inputs and outputs;
- gRPC Predict: one image gives one finite embedding (prints its size, norm
  and first values);
- REST status, metadata and :predict: the same answers over HTTP, and the same
  embedding as over gRPC.

The image is `--image` cropped as `tfadv query` crops it (`--no-crop` for a
ready crop), else fixed random pixels of the model's input size. Prints one line
per check; exits 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from tfadv.data.faces import load_face

AVAILABLE = "AVAILABLE"  # the state of a version that is being served


class CheckFailed(Exception):
    """A check whose answer was not what a client expects."""


def _shape(proto):
    return [d.size for d in proto.tensor_shape.dim]


def _describe(tensors):
    return ", ".join(f"{key}: {tf.dtypes.as_dtype(t.dtype).name} {_shape(t)}"
                     for key, t in sorted(tensors.items()))


def _image(signature, path, crop):
    """One example for the signature's single image input: `[1, H, W, C]` of its dtype."""
    if len(signature.inputs) != 1:
        raise CheckFailed(f"expected one input, the signature has {_describe(signature.inputs)}")
    key, spec = next(iter(signature.inputs.items()))
    shape = _shape(spec)
    if len(shape) != 4 or min(shape[1:]) < 1:
        raise CheckFailed(f"expected an image input [N, H, W, C], got {key} {shape}")
    height, width, channels = shape[1:]
    if path:
        pixels = load_face(path, size=height, detector=None if crop else "none")
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, channels))
    return key, pixels[None].astype(tf.dtypes.as_dtype(spec.dtype).as_numpy_dtype)


def _summary(embedding):
    values = ", ".join(f"{v:.4f}" for v in embedding[:4])
    return f"{embedding.size} values, L2 norm {np.linalg.norm(embedding):.4f}, [{values}, ...]"


def _http(url, payload=None, timeout=10.0):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise CheckFailed(f"HTTP {err.code}: {err.read().decode(errors='replace')}") from None


def run_checks(host="127.0.0.1", grpc_port=8500, rest_port=8501, name="facenet",
               signature_name="serving_default", image=None, crop=True, timeout=10.0,
               out=None) -> bool:
    """Runs the checks and prints one line each; returns whether all passed."""
    out = out or sys.stdout
    bracketed = f"[{host}]" if ":" in host else host
    results = []

    def check(title, fn):
        try:
            detail = fn()
        except (CheckFailed, grpc.RpcError, OSError, ValueError, KeyError) as err:
            if isinstance(err, grpc.RpcError):
                err = f"{err.code().name}: {err.details()}"
            print(f"FAIL  {title}: {err}", file=out, flush=True)
            results.append(False)
            return None
        print(f"ok    {title}: {detail[0]}", file=out, flush=True)
        results.append(True)
        return detail[1]

    channel = grpc.insecure_channel(f"{bracketed}:{grpc_port}")
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)

    def status():
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        states = {v.version: get_model_status_pb2.ModelVersionStatus.State.Name(v.state)
                  for v in models.GetModelStatus(request, timeout=timeout).model_version_status}
        text = ", ".join(f"version {v} {s}" for v, s in sorted(states.items()))
        if AVAILABLE not in states.values():
            raise CheckFailed(f"no version is {AVAILABLE} ({text or 'no versions'})")
        return text, None

    def metadata():
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = name
        request.metadata_field.append("signature_def")
        response = prediction.GetModelMetadata(request, timeout=timeout)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        if signature_name not in defs.signature_def:
            raise CheckFailed(f"no signature {signature_name!r}; the model has "
                              f"{sorted(defs.signature_def)}")
        sig = defs.signature_def[signature_name]
        return (f"version {response.model_spec.version.value}, {signature_name}: "
                f"{_describe(sig.inputs)} -> {_describe(sig.outputs)}", sig)

    def predict(sig):
        if sig is None:
            raise CheckFailed("skipped: the metadata check gave no signature")
        key, pixels = _image(sig, image, crop)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature_name
        request.inputs[key].CopyFrom(tf.make_tensor_proto(pixels))
        outputs = prediction.Predict(request, timeout=timeout).outputs
        first = sorted(outputs)[0]
        embedding = tf.make_ndarray(outputs[first]).reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(embedding)):
            raise CheckFailed(f"{first} has non-finite values")
        return f"{first}: {_summary(embedding)}", (key, pixels, embedding)

    try:
        check(f"gRPC {bracketed}:{grpc_port} GetModelStatus {name}", status)
        sig = check("gRPC GetModelMetadata", metadata)
        grpc_result = check("gRPC Predict", lambda: predict(sig))
    finally:
        channel.close()

    if rest_port:
        base = f"http://{bracketed}:{rest_port}/v1/models/{name}"

        def rest_status():
            states = {s["version"]: s["state"] for s in _http(base, timeout=timeout)
                      ["model_version_status"]}
            if AVAILABLE not in states.values():
                raise CheckFailed(f"no version is {AVAILABLE}: {states}")
            return ", ".join(f"version {v} {s}" for v, s in sorted(states.items())), None

        def rest_metadata():
            defs = _http(f"{base}/metadata", timeout=timeout)["metadata"]["signature_def"]
            if signature_name not in defs["signature_def"]:
                raise CheckFailed(f"no signature {signature_name!r}")
            return f"{signature_name} listed", None

        def rest_predict():
            if grpc_result is None:
                raise CheckFailed("skipped: the gRPC Predict check gave no example to compare")
            key, pixels, expected = grpc_result
            answer = _http(f"{base}:predict", {"signature_name": signature_name,
                                               "instances": pixels.tolist()}, timeout=timeout)
            prediction = answer["predictions"][0]
            if isinstance(prediction, dict):  # several outputs: the one gRPC reported
                prediction = prediction[sorted(prediction)[0]]
            embedding = np.asarray(prediction, np.float64).reshape(-1)
            gap = float(np.max(np.abs(embedding - expected))) if embedding.size else np.inf
            if embedding.shape != expected.shape or gap > 1e-4:
                raise CheckFailed(f"differs from the gRPC answer (max difference {gap:.3g})")
            return f"{_summary(embedding)}; same as gRPC (max difference {gap:.1e})", None

        check(f"REST {bracketed}:{rest_port} status", rest_status)
        check("REST metadata", rest_metadata)
        check("REST predict", rest_predict)
    return all(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501, help="0: skip the REST checks")
    parser.add_argument("--name", default="facenet", help="model name")
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument("--image", help="photo to embed (default: random pixels)")
    parser.add_argument("--no-crop", dest="crop", action="store_false",
                        help="the image is already a face crop")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args(argv)
    ok = run_checks(args.host, args.grpc_port, args.rest_port, args.name, args.signature,
                    args.image, args.crop, args.timeout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
