"""TF Serving's `BatchingParameters` text format, shared by the exporter and the server.

Parsing and writing go through `google.protobuf.text_format` with TF Serving's
`tensorflow.serving.BatchingParameters` message
(`tensorflow_serving/servables/tensorflow/session_bundle_config.proto`). That
proto is not part of `tensorflow-serving-api`, so when `tensorflow_serving`
does not ship it the message is declared here, with the same package, names,
types and field numbers. The file the exporter writes is the one passed to
`tensorflow_model_server --enable_batching --batching_parameters_file=...`, and
`tfadv serve --batching-parameters-file` reads the same file.
"""

from __future__ import annotations

import dataclasses
import os

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2

_WRAPPED = ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
            "max_enqueued_batches")


def _declare_batching_parameters_proto():
    """`tensorflow.serving.BatchingParameters`, declared in a private descriptor pool."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    fields = [
        ("max_batch_size", 1, F.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, F.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, F.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, F.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, F.TYPE_MESSAGE, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, F.TYPE_INT64, None),
        ("pad_variable_length_inputs", 7, F.TYPE_BOOL, None),
        ("enable_large_batch_splitting", 8, F.TYPE_BOOL, None),
    ]
    for name, number, type_, type_name in fields:
        label = F.LABEL_REPEATED if name == "allowed_batch_sizes" else F.LABEL_OPTIONAL
        field = message.field.add(name=name, number=number, type=type_, label=label)
        if type_name:
            field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


try:
    from tensorflow_serving.servables.tensorflow.session_bundle_config_pb2 import (
        BatchingParameters as BatchingParametersProto)
except ImportError:
    BatchingParametersProto = _declare_batching_parameters_proto()


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """Server-side dynamic batching settings (TF Serving's names and meaning).

    Args:
        max_batch_size: largest merged batch; also the largest batch one request
            may carry (bigger requests get INVALID_ARGUMENT).
        batch_timeout_micros: how long the first request of a batch waits for
            others to join before the batch runs anyway.
        num_batch_threads: batches processed in parallel.
        max_enqueued_batches: queue bound, in batches; beyond it requests are
            refused with UNAVAILABLE instead of queueing without limit.
        allowed_batch_sizes: batches are padded up to the next of these sizes
            (ascending, the last equal to max_batch_size), so the model only
            ever sees a few shapes: oneDNN builds kernels per shape, and 32
            distinct batch sizes cost more than the padding. Empty: no padding.

    Example:

    ```python
    params = BatchingParameters(max_batch_size=32, batch_timeout_micros=2000)
    open("batching_parameters.txt", "w").write(params.to_text())
    assert BatchingParameters.from_text(params.to_text()) == params
    ```
    """

    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100
    allowed_batch_sizes: tuple = ()

    @classmethod
    def with_padding(cls, max_batch_size: int = 32, **kwargs) -> "BatchingParameters":
        """Parameters whose allowed batch sizes double from 1 up to `max_batch_size`."""
        sizes, n = [], 1
        while n < max_batch_size:
            sizes.append(n)
            n *= 2
        return cls(max_batch_size=max_batch_size, allowed_batch_sizes=(*sizes, max_batch_size),
                   **kwargs)

    def __post_init__(self):
        for field in _WRAPPED:
            value = getattr(self, field)
            low = 0 if field == "batch_timeout_micros" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Expected {field} to be an integer >= {low}. "
                                 f"Received: {field}={value!r}")
        sizes = tuple(self.allowed_batch_sizes)
        object.__setattr__(self, "allowed_batch_sizes", sizes)
        if sizes and (any(not isinstance(v, int) or v < 1 for v in sizes)
                      or list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError("Expected allowed_batch_sizes to be ascending positive integers "
                             f"ending with max_batch_size={self.max_batch_size}. Received: "
                             f"allowed_batch_sizes={sizes}")

    def padded_size(self, n: int) -> int:
        """The batch size a merged batch of `n` examples is padded to."""
        for size in self.allowed_batch_sizes:
            if size >= n:
                return size
        return n

    def to_proto(self):
        """This configuration as a `tensorflow.serving.BatchingParameters` message."""
        proto = BatchingParametersProto()
        for field in _WRAPPED:
            getattr(proto, field).value = getattr(self, field)
        proto.allowed_batch_sizes.extend(self.allowed_batch_sizes)
        return proto

    @classmethod
    def from_proto(cls, proto) -> "BatchingParameters":
        """Reads a `BatchingParameters` message; fields left unset keep their defaults."""
        values = {f: getattr(proto, f).value for f in _WRAPPED if proto.HasField(f)}
        return cls(**values, allowed_batch_sizes=tuple(proto.allowed_batch_sizes))

    def to_text(self) -> str:
        """The BatchingParameters text proto TF Serving reads."""
        return text_format.MessageToString(self.to_proto())

    @classmethod
    def from_text(cls, text: str) -> "BatchingParameters":
        """Parses the text format; fields left out keep their defaults.

        `thread_pool_name`, `pad_variable_length_inputs` and
        `enable_large_batch_splitting` are accepted so that files written for
        TF Serving load here too; this server pads along the batch axis only.

        Raises:
            ValueError: for a field this server does not know or a malformed value.
        """
        try:
            proto = text_format.Parse(text, BatchingParametersProto())
        except text_format.ParseError as e:
            raise ValueError(
                f"Could not parse the batching parameters: {str(e).rstrip('.')}. Expected "
                f"lines such as 'max_batch_size {{ value: 32 }}' with fields "
                f"{', '.join(_WRAPPED)}, and 'allowed_batch_sizes: 32'."
            ) from None
        return cls.from_proto(proto)

    @classmethod
    def read(cls, path: str) -> "BatchingParameters":
        """Reads a batching parameters file.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: if it does not parse.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No batching parameters file at {path!r}. Write one with "
                                    "`tfadv export` or pass the batching options directly.")
        with open(path) as f:
            return cls.from_text(f.read())
