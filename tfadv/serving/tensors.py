"""NumPy arrays to and from `tensorflow.TensorProto`, with TensorFlow's own converters.

`tf.make_tensor_proto` writes dense arrays as `tensor_content`;
`tf.make_ndarray` reads every form clients send (tensor_content or the typed
repeated fields, with TF's rule that missing trailing values repeat the last
one, as TF Serving's `Tensor::FromProto` reads them). Neither runs a
TensorFlow op. What is added here is the serving errors: a tensor the server
cannot take is INVALID_ARGUMENT naming the input.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from tfadv.serving.errors import invalid

# The dtypes a request may carry: numbers, bool and strings (no resources or variants).
_ACCEPTED = {getattr(types_pb2, f"DT_{n}") for n in (
    "FLOAT", "DOUBLE", "HALF", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
    "UINT64", "BOOL", "STRING")}


def dtype_name(enum: int) -> str:
    """'float32', 'uint8', 'string', ... for a `types_pb2.DataType` value."""
    try:
        return tf.dtypes.as_dtype(enum).name
    except (TypeError, KeyError):
        return types_pb2.DataType.Name(enum) if enum in types_pb2.DataType.values() else str(enum)


def numpy_dtype(enum: int):
    """The NumPy dtype for a `types_pb2.DataType` value (None if not accepted)."""
    return np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype) if enum in _ACCEPTED else None


def to_tensor_proto(array, out: tensor_pb2.TensorProto | None = None) -> tensor_pb2.TensorProto:
    """A TensorProto holding `array` (numeric, bool or bytes/str); `out` is filled in place
    (e.g. `request.inputs["images"]`) when given.

    Raises:
        ValueError: for a dtype TensorFlow has no type for.
    """
    try:
        proto = tf.make_tensor_proto(np.asarray(array))
    except TypeError as err:
        raise ValueError(f"Expected a numeric, bool or string array. Received dtype "
                         f"{np.asarray(array).dtype} ({err}).") from None
    if out is None:
        return proto
    out.CopyFrom(proto)
    return out


def to_numpy(proto: tensor_pb2.TensorProto, what: str = "tensor") -> np.ndarray:
    """The array a TensorProto holds.

    Args:
        proto: the tensor.
        what: how error messages name it (e.g. "input 'images'").

    Raises:
        ServingError: INVALID_ARGUMENT for a dtype the server does not accept,
            an unknown rank, or values that do not fit the shape.
    """
    if proto.dtype not in _ACCEPTED:
        raise invalid(f"{what} has dtype {dtype_name(proto.dtype)}, which this server does not "
                      "accept; send float32, uint8 or another standard numeric dtype.")
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"{what} has an unknown rank; set tensor_shape.dim.")
    shape = [int(d.size) for d in proto.tensor_shape.dim]
    try:
        return tf.make_ndarray(proto)
    except (ValueError, TypeError) as err:
        raise invalid(f"{what}: its values do not fill shape {shape} ({err}).") from None
