"""The gRPC services of the model server, as TF Serving defines them.

`tensorflow.serving.PredictionService` (`Predict`, `GetModelMetadata`) and
`tensorflow.serving.ModelService` (`GetModelStatus`), registered on a
`grpc.server` by `add_services`. The REST gateway (`tfadv.serving.rest`)
answers model status requests with the same `status_response`, as JSON.
"""

from __future__ import annotations

import logging
import time

import grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, status_pb2)

from tfadv.export import contract as C
from tfadv.serving.batcher import check_alive
from tfadv.serving.errors import ServingError, invalid
from tfadv.serving.metrics import METRICS
from tfadv.serving.tensors import to_numpy, to_tensor_proto

log = logging.getLogger("tfadv.serving")

SHUTTING_DOWN = "The server is shutting down; retry on another server or after it restarts."

_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type


def version_of(spec):
    """(version or None, label or None) of a `ModelSpec`."""
    version = spec.version.value if spec.HasField("version") else None
    return version, (spec.version_label or None)


def metadata_response(registry, request):
    """The `GetModelMetadataResponse` (signature defs) for a request."""
    fields = list(request.metadata_field)
    if not fields:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field; "
                      "use metadata_field: ['signature_def'].")
    unsupported = [f for f in fields if f != "signature_def"]
    if unsupported:
        raise invalid(f"Metadata field(s) {unsupported} not supported; only 'signature_def' is.")
    servable = registry.lookup(request.model_spec.name, *version_of(request.model_spec))
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    defs = get_model_metadata_pb2.SignatureDefMap()
    for key, sig_def in servable.signature_defs.items():
        defs.signature_def[key].CopyFrom(sig_def)
    response.metadata["signature_def"].Pack(defs)
    return response


def status_response(registry, name, version=None, label=None):
    """The `GetModelStatusResponse` of a model (every version, or the one asked for)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state in registry.status(name, version, label):
        entry = response.model_version_status.add()
        entry.version = version
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
        code = _ERROR_CODES.values_by_name.get(state.error_code,
                                               _ERROR_CODES.values_by_name["UNKNOWN"])
        entry.status.error_code = code.number
        entry.status.error_message = state.error_message
    return response


def predict(registry, request, deadline=None, alive=None):
    """Runs a `PredictRequest` on the servable it names; returns the `PredictResponse`."""
    check_alive(deadline, alive, "before it was decoded")  # e.g. it waited for a worker
    servable = registry.lookup(request.model_spec.name, *version_of(request.model_spec))
    signature_name = request.model_spec.signature_name or C.SERVING_SIGNATURE
    servable.signature(signature_name)  # NOT_FOUND before any input is decoded
    inputs = {k: to_numpy(v, f"input '{k}'") for k, v in request.inputs.items()}
    outputs = servable.predict(signature_name, inputs, tuple(request.output_filter),
                               deadline=deadline, alive=alive)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
        to_tensor_proto(value, out=response.outputs[key])
    return response


def _guard(server, context, fn, *args, counted=None):
    """Runs a handler; ServingErrors become their status code, anything else INTERNAL.

    `counted`: (model name, API, signature name) of a request TF Serving counts in
    its request metrics (Predict), recorded with the final status.
    """
    start, status = time.perf_counter(), "UNAVAILABLE"
    try:
        if not server._enter():
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            result = fn(*args)
            status = "OK"
            return result
        except ServingError as err:
            status = err.code
            context.abort(err.grpc_code, err.message)
        except Exception as err:  # the server must survive any request
            status = "INTERNAL"
            log.exception("request failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            server._leave()
    finally:
        if counted is not None:
            model, api, signature = counted
            METRICS.request(model, status, api=api, entrypoint="GRPC", signature_name=signature,
                            seconds=time.perf_counter() - start)


def _liveness(context):
    """(deadline in `time.monotonic()` seconds or None, alive check) of a gRPC call."""
    remaining = context.time_remaining()  # about 9.2e18 s for a call without a deadline
    deadline = None if remaining is None or remaining > 1e9 else time.monotonic() + remaining
    return deadline, context.is_active


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService` over a `ModelServer`'s registry."""

    def __init__(self, server):
        self._server = server

    def Predict(self, request, context):  # noqa: N802 (gRPC method names)
        spec = request.model_spec
        return _guard(self._server, context, predict, self._server.registry, request,
                      *_liveness(context), counted=(spec.name, "Predict", spec.signature_name
                                                    or C.SERVING_SIGNATURE))

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _guard(self._server, context, metadata_response, self._server.registry, request)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService` (model status) over a `ModelServer`'s registry."""

    def __init__(self, server):
        self._server = server

    def GetModelStatus(self, request, context):  # noqa: N802
        spec = request.model_spec
        return _guard(self._server, context, status_response, self._server.registry, spec.name,
                      *version_of(spec))


def add_services(grpc_server, server):
    """Registers both services of `server` (a `ModelServer`) on a `grpc.server`."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(server), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(server), grpc_server)
