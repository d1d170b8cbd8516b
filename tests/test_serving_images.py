"""Photos in, embeddings out: encoded images decoded in the exported graph, over gRPC and
REST ({"b64": ...}), with the bad file named by its index."""

import base64
import io
import os
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import rest_json
from test_export import export_embedder
from tfadv.data.face_crops import center_crop_resize, load_face
from tfadv.data.images import encode_image, read_image
from tfadv.export import BatchingParameters, contract as C
from tfadv.export.images import decode_crops
from tfadv.serving import Client, ModelServer
from tfadv.serving.errors import ServingError
from tfadv.serving.batcher import Batcher

SIDE = 32
NAME = "faces"
RNG = np.random.default_rng(0)


def photo(h, w, seed=0):
    """A smooth image with noise: resampling differences show, as on real faces."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 90 * np.sin(xx / 7 + c) * np.cos(yy / 9) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def write(tmp_path, pixels, fmt, name):
    path = tmp_path / f"{name}.{fmt.lower()}"
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF"])
@pytest.mark.parametrize("shape", [(SIDE, SIDE), (50, 41), (64, 64), (20, 27)])
def test_graph_pixels_are_the_crop_pipelines(tmp_path, fmt, shape):
    """Decoded and resized in the graph = read_image + center_crop_resize (PIL + OpenCV):
    identical at the model's size, within one grey level when resampled."""
    path = write(tmp_path, photo(*shape), fmt, "x")
    want = center_crop_resize(read_image(path), size=SIDE).astype(np.float32)
    got = decode_crops(tf.constant([path.read_bytes()]), SIDE).numpy()[0]
    limit = 0.0 if shape == (SIDE, SIDE) else 1.0
    assert np.abs(got - want).max() <= limit


def test_bad_files_are_named_by_index():
    good = encode_image(photo(SIDE, SIDE))
    truncated = encode_image(photo(SIDE, SIDE), "jpeg")[:200]
    graph = tf.function(lambda data: decode_crops(data, SIDE))  # as a signature runs it
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"images_bytes: the images at indices \[1, 3, 4\] of the batch "
                             r"do not decode as JPEG, PNG, GIF, BMP or WebP files"):
        graph(tf.constant([good, b"hello", good, truncated, b""]))
    assert decode_crops(tf.constant([], tf.string), SIDE).shape == (0, SIDE, SIDE, 3)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    model, _, base = export_embedder(root, NAME, size=(SIDE, SIDE))
    batching = BatchingParameters.with_padding(8, batch_timeout_micros=20_000)
    with ModelServer(base, name=NAME, port=0, rest_port=0, batching=batching,
                     poll_interval=0) as server:
        yield model, server, base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    shapes = [(SIDE, SIDE), (50, 41), (20, 27), (SIDE, SIDE)]
    return [write(root, photo(*s, seed=i), fmt, f"p{i}")
            for i, (s, fmt) in enumerate(zip(shapes, ["PNG", "JPEG", "PNG", "JPEG"]))]


def in_process(model, paths):
    crops = np.stack([load_face(p, size=SIDE, detector="none", cache=False) for p in paths])
    return model.predict(crops.astype(np.float32), verbose=0)


def test_signatures_take_encoded_crops_and_match_the_model(served, files):
    """The issue's check: the SavedModel on the file bytes = the in-process model on the
    decoded crop, within 1e-3 (the signatures the real TF Serving would run)."""
    model, _, base = served
    loaded = tf.saved_model.load(os.path.join(base, "1"))
    data = tf.constant([p.read_bytes() for p in files])
    want = in_process(model, files)
    got = loaded.signatures[C.EMBED_IMAGES_SIGNATURE](images_bytes=data)[C.EMBEDDINGS].numpy()
    at_size = [i for i, p in enumerate(files) if Image.open(p).size == (SIDE, SIDE)]
    assert len(at_size) == 2  # a PNG and a JPEG crop of the model's size: the same pixels
    np.testing.assert_allclose(got[at_size], want[at_size], atol=1e-3)
    # Resized in the graph: within one grey level of OpenCV's resize (tested above); this
    # tiny model has no pooling of such noise, so allow a few thousandths.
    np.testing.assert_allclose(got, want, atol=1e-2)
    out = loaded.signatures[C.VERIFY_IMAGES_SIGNATURE](images_a_bytes=data,
                                                        images_b_bytes=data[::-1])
    np.testing.assert_allclose(out[C.SIMILARITY].numpy(), (got * got[::-1]).sum(1), atol=1e-5)
    assert out[C.SAME_PERSON].numpy().dtype == bool


def test_grpc_bad_file_is_invalid_argument_naming_it_and_others_are_served(served, files):
    _, server, _ = served
    good = [p.read_bytes() for p in files]
    with Client(server.grpc_target, name=NAME) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.embed_encoded([good[0], b"<html>not found</html>", good[1]])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "images_bytes: the images at indices [1] of the batch do not decode" in \
            err.value.details()
        # Concurrent requests are merged into one batch: the bad one must not fail the rest.
        results, threads = {}, []

        def call(i, data):
            try:
                results[i] = client.embed_encoded(data)
            except grpc.RpcError as e:
                results[i] = e

        for i in range(6):
            data = [b"junk"] if i == 3 else [good[i % len(good)]]
            threads.append(threading.Thread(target=call, args=(i, data)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(results[3], grpc.RpcError) and "indices [0]" in results[3].details()
        assert all(isinstance(results[i], np.ndarray) for i in range(6) if i != 3)
        assert client.embed_encoded(good).shape == (len(good), 8)  # still serving


def test_batcher_reruns_a_failed_merged_batch_request_by_request():
    def fn(inputs):
        if (inputs["x"] < 0).any():
            raise ServingError("INVALID_ARGUMENT", f"negative in a batch of {len(inputs['x'])}")
        return {"y": inputs["x"] * 2}

    batcher = Batcher(fn, BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000,
                                             num_batch_threads=1))
    results = {}

    def call(i):
        try:
            results[i] = batcher.submit({"x": np.array([float(i if i != 2 else -1)])}, 1)
        except ServingError as err:
            results[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results[2].message == "negative in a batch of 1"
    assert [results[i]["y"].tolist() for i in (0, 1, 3)] == [[0.0], [2.0], [6.0]]


def rest(server, payload):
    return rest_json(server, f"/v1/models/{NAME}:predict", payload)


def b64(path):
    return {"b64": base64.b64encode(path.read_bytes()).decode()}


def test_rest_b64_in_row_and_columnar_formats(served, files):
    _, server, _ = served
    with Client(server.grpc_target, name=NAME) as client:  # the same bytes over gRPC
        want = client.embed_encoded([p.read_bytes() for p in files])
    sig = {"signature_name": C.EMBED_IMAGES_SIGNATURE}
    for body in ({**sig, "instances": [b64(p) for p in files]},
                 {**sig, "instances": [{C.IMAGES_BYTES: b64(p)} for p in files]},
                 {**sig, "inputs": [b64(p) for p in files]},
                 {**sig, "inputs": {C.IMAGES_BYTES: [b64(p) for p in files]}}):
        status, answer = rest(server, body)
        assert status == 200, answer
        got = answer.get("predictions", answer.get("outputs"))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    status, answer = rest(server, {"signature_name": C.VERIFY_IMAGES_SIGNATURE, "instances": [
        {C.IMAGES_A_BYTES: b64(files[0]), C.IMAGES_B_BYTES: b64(files[1])}]})
    assert status == 200
    assert answer["predictions"][0][C.SIMILARITY] == pytest.approx(float(want[0] @ want[1]),
                                                                   abs=1e-5)


def test_rest_b64_padding_is_optional_and_webp_decodes(served, files, tmp_path):
    """TF Serving's base64 decoder takes missing padding and skips whitespace."""
    _, server, _ = served
    text = base64.b64encode(files[0].read_bytes()).decode()
    for value in (text.rstrip("="), text[:40] + "\n" + text[40:]):
        status, answer = rest(server, {"signature_name": C.EMBED_IMAGES_SIGNATURE,
                                       "instances": [{"b64": value}]})
        assert status == 200, answer
    webp = write(tmp_path, photo(SIDE, SIDE), "WEBP", "w")
    status, answer = rest(server, {"signature_name": C.EMBED_IMAGES_SIGNATURE,
                                   "instances": [b64(webp)]})
    assert status == 200, answer


@pytest.mark.parametrize("value, match", [
    ({"b64": "not base64!"}, "not valid base64"),
    ({"b64": 12}, "must be a string of base64"),
    (17, "expects strings"),
    ({"b64": base64.b64encode(b"plain text").decode()}, r"indices \[0\] of the batch do not decode"),
])
def test_rest_bad_b64_is_400_and_the_server_keeps_serving(served, files, value, match):
    _, server, _ = served
    status, answer = rest(server, {"signature_name": C.EMBED_IMAGES_SIGNATURE,
                                   "instances": [value]})
    assert status == 400 and "error" in answer
    assert __import__("re").search(match, answer["error"]), answer
    status, _ = rest(server, {"signature_name": C.EMBED_IMAGES_SIGNATURE,
                              "instances": [b64(files[0])]})
    assert status == 200


def test_string_outputs_are_written_as_tf_serving_does():
    from tfadv.serving.rest import _to_json_values

    data = np.array([b"\x00\xff", b"ok"], dtype=object)
    assert _to_json_values("thumbnail_bytes", data) == [{"b64": "AP8="}, {"b64": "b2s="}]
    assert _to_json_values("label", np.array([b"cat", b"dog"], dtype=object)) == ["cat", "dog"]


def test_client_embed_files_sends_encoded_crops(served, files):
    model, server, _ = served
    want = in_process(model, files)
    with Client(server.grpc_target, name=NAME) as client:
        png = client.embed_files(files, crop=False, cache=False)
        jpeg = client.embed_files(files, crop=False, cache=False, encoding="jpeg")
        raw = client.embed_files(files, crop=False, cache=False, encoding=None)
        with pytest.raises(ValueError, match="encoding"):
            client.embed_files(files, crop=False, encoding="webp")
    emb = {k: np.array([r["embedding"] for r in v]) for k, v in
           {"png": png, "jpeg": jpeg, "raw": raw}.items()}
    np.testing.assert_allclose(emb["png"], want, atol=1e-5)  # lossless: the same pixels
    np.testing.assert_allclose(emb["raw"], want, atol=1e-5)
    assert ((emb["jpeg"] * want).sum(1) > 0.99).all()


def test_encode_image_round_trips_and_refuses_bad_settings():
    pixels = photo(10, 12)
    back = np.asarray(Image.open(io.BytesIO(encode_image(pixels))))
    np.testing.assert_array_equal(back, pixels)
    assert encode_image(pixels, "jpeg")[:3] == b"\xff\xd8\xff"
    with pytest.raises(ValueError, match="encoding"):
        encode_image(pixels, "tiff")
    with pytest.raises(ValueError, match="quality"):
        encode_image(pixels, "jpeg", quality=100)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_image(pixels[..., 0])
