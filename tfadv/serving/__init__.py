"""Serving over TensorFlow Serving's protocol: a model server and a gRPC client.

    from tfadv.serving import Client, ModelServer, serve

`ModelServer` is the local stand-in for `tensorflow_model_server` (the same
gRPC and REST protocol over the same model directory); `Client` uses the
stock `tensorflow_serving.apis` stubs and talks to either.
"""

from tfadv.export.batching import BatchingParameters
from tfadv.serving.client import Client
from tfadv.serving.config import ModelConfig, read_model_config
from tfadv.serving.errors import ServingError
from tfadv.serving.server import ModelServer, serve

__all__ = ["BatchingParameters", "Client", "ModelConfig", "ModelServer", "ServingError",
           "read_model_config", "serve"]
