"""One signature of a loaded SavedModel: its input and output specs, request validation,
and the call (through the batcher when batching is on)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf

from tfadv.export.images import SENTINEL
from tfadv.serving.batcher import Batcher, check_alive
from tfadv.serving.errors import invalid
from tfadv.serving.metrics import METRICS
from tfadv.serving.tensors import numpy_dtype


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One signature input or output: name, dtype and shape (None = any size)."""

    key: str
    dtype: np.dtype
    shape: tuple | None  # None: unknown rank

    def describe(self) -> str:
        shape = "?" if self.shape is None else "[" + ", ".join(
            "-1" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.key}: {dtype_name_np(self.dtype)} {shape}"


def dtype_name_np(dtype) -> str:
    return "string" if dtype == np.object_ else np.dtype(dtype).name


def _spec(key, tensor_info):
    shape = None
    if not tensor_info.tensor_shape.unknown_rank:
        shape = tuple(None if d.size < 0 else int(d.size) for d in tensor_info.tensor_shape.dim)
    return TensorSpec(key, numpy_dtype(tensor_info.dtype), shape)


def op_error_text(err) -> str:
    """The cause in a TF op error, without eager TF's wrapping: the first line that is not
    "Graph execution error:", the "Detected at node" header, a stack frame or a node list
    (an in-graph assertion's text, e.g. which images did not decode)."""
    message = getattr(err, "message", None) or str(err)
    for line in message.splitlines():
        text = line.strip()
        if (text and text != "Graph execution error:" and not line[:1].isspace()
                and not text.startswith(("Detected at node", "<stack traces", "[["))):
            return text
    return repr(err)


class Signature:
    """A callable signature of a loaded SavedModel, with request validation.

    Args:
        name: the signature key.
        signature_def: its `SignatureDef` proto.
        fn: the concrete function (`loaded.signatures[name]`).
        max_batch_size: the largest batch one request may carry.
        batching: `BatchingParameters` to merge concurrent requests, or None.
    """

    def __init__(self, name, signature_def, fn, *, max_batch_size, batching=None, label="",
                 model_name=""):
        self.name = name
        self.model_name = model_name
        self.signature_def = signature_def
        self.inputs = {k: _spec(k, v) for k, v in sorted(signature_def.inputs.items())}
        self.outputs = {k: _spec(k, v) for k, v in sorted(signature_def.outputs.items())}
        self._fn = fn
        self.max_batch_size = max_batch_size
        # Merging requests along axis 0 is only safe if every tensor is batched.
        self.batchable = all(s.shape is not None and len(s.shape) >= 1 and s.shape[0] is None
                             for s in [*self.inputs.values(), *self.outputs.values()])
        self._batcher = None
        if batching is not None and self.batchable:
            self._batcher = Batcher(self._call, batching, name=f"batch-{label}{name}")

    def describe_inputs(self) -> str:
        return "{" + ", ".join(s.describe() for s in self.inputs.values()) + "}"

    def check_names(self, names):
        """Raises INVALID_ARGUMENT unless `names` are exactly the signature's inputs."""
        expected = set(self.inputs)
        given = set(names)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            raise invalid(f"Signature '{self.name}' expects inputs {self.describe_inputs()}; "
                          f"{' and '.join(parts)}.")

    def validate(self, inputs: dict, hint_dtypes: dict | None = None) -> int:
        """Checks a request's tensors against the signature; returns the batch size.

        Raises:
            ServingError: INVALID_ARGUMENT naming the expected spec.
        """
        self.check_names(inputs)
        batch = None
        for key, spec in self.inputs.items():
            value = inputs[key]
            if value.dtype != spec.dtype:
                hint = ""
                other = (hint_dtypes or {}).get((key, value.dtype))
                if other:
                    hint = f" For {dtype_name_np(value.dtype)} use the signature '{other}'."
                raise invalid(f"Input '{key}' of signature '{self.name}' expects dtype "
                              f"{dtype_name_np(spec.dtype)} but {dtype_name_np(value.dtype)} was "
                              f"sent (expected {spec.describe()}).{hint}")
            if spec.shape is not None:
                ok = len(value.shape) == len(spec.shape) and all(
                    e is None or e == g for e, g in zip(spec.shape, value.shape))
                if not ok:
                    raise invalid(f"Input '{key}' of signature '{self.name}' expects shape "
                                  f"{spec.describe().split(' ', 2)[2]} but shape "
                                  f"{list(value.shape)} was sent (expected {spec.describe()}).")
            if self.batchable:
                n = value.shape[0]
                if batch is not None and n != batch:
                    raise invalid(f"All inputs of signature '{self.name}' must have the same "
                                  f"batch size; received {batch} and {n} ('{key}').")
                batch = n
        if self.batchable:
            if batch == 0:
                raise invalid(f"Empty batch: signature '{self.name}' needs at least one example "
                              f"(expected {self.describe_inputs()}).")
            if batch > self.max_batch_size:
                raise invalid(f"Batch size {batch} is larger than the maximum batch size "
                              f"{self.max_batch_size}; split the request into batches of at "
                              f"most {self.max_batch_size}.")
        return batch or 0

    def _call(self, inputs: dict) -> dict:
        start = time.perf_counter()
        try:
            result = self._fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
            raise invalid(f"Signature '{self.name}' could not run on this request: "
                          f"{op_error_text(err)}") from None
        out = {k: v.numpy() for k, v in result.items()}
        METRICS.runtime(self.model_name, time.perf_counter() - start)
        return out

    @property
    def batching(self) -> bool:
        """Whether requests to this signature are merged into batches."""
        return self._batcher is not None

    def run(self, inputs: dict, batch: int, *, deadline: float | None = None,
            alive=None) -> dict:
        """Runs the signature (through the batcher when batching is on).

        Args:
            inputs: validated arrays.
            batch: their batch size.
            deadline: `time.monotonic()` seconds after which nobody waits for
                the answer; None for none.
            alive: callable returning False once the client has gone.

        Raises:
            ServingError: DEADLINE_EXCEEDED, without running the model, when
                the deadline passed or the client left before it ran.
        """
        if self._batcher is not None:
            return self._batcher.submit(inputs, batch, deadline=deadline, alive=alive)
        check_alive(deadline, alive)
        return self._call(inputs)

    def close(self):
        if self._batcher is not None:
            self._batcher.close()


def warm_input(spec, n):
    """n examples for warming a batch size: zeros, or for string (encoded image) inputs one
    black 1 x 1 PNG each, which the graph decodes and resizes like any photo."""
    if spec.dtype != np.object_:
        return np.zeros((n, *spec.shape[1:]), spec.dtype)
    return np.full((n, *spec.shape[1:]), SENTINEL, dtype=object)
