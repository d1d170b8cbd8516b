"""A short soak (bench/serving_soak.py runs the long one): 16 clients, good and bad requests
mixed over gRPC and REST, a version published in the middle."""

import os
import sys

import numpy as np

from test_export import save_embedder
from tfadv.data.images import encode_image
from tfadv.export import BatchingParameters, export_model
from tfadv.serving import Client, ModelServer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from serving_soak import soak  # noqa: E402

NAME = "faces"


def test_no_good_request_fails_and_bad_ones_get_their_status(tmp_path):
    model, path = save_embedder(str(tmp_path / "model"), size=(32, 32))
    base = str(tmp_path / "base")
    export_model(path, base, name=NAME)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    files = [encode_image(p, "jpeg") for p in pixels]
    batching = BatchingParameters.with_padding(8, batch_timeout_micros=2000)
    with ModelServer(base, name=NAME, port=0, rest_port=0, batching=batching,
                     poll_interval=0.1) as server:
        port = int(server.rest_url.rsplit(":", 1)[1])
        result = soak(server.grpc_target, port, NAME, pixels, files, requests=600, clients=16,
                      publish=lambda: export_model(path, base, name=NAME), progress=False)
        server.wait_for_version(2)
        with Client(server.grpc_target, name=NAME) as client:
            states = {s["version"]: s["state"] for s in client.status()}
    assert result["good"] == 300 and result["bad"] == 300
    assert result["good_failed"] == [] and result["bad_wrong"] == []
    assert result["published_at"] == 300
    assert states == {2: "AVAILABLE", 1: "END"}
