"""Loaded model versions and the registry that keeps them in step with the disk.

A `Servable` is one SavedModel version with its signatures; requests are
validated against the SavedModel's own signature defs, so the server needs no
knowledge of the model beyond what `saved_model_cli show` prints. The
`ModelRegistry` polls every model's base directory, loads new versions before
it drops old ones (TF Serving's availability-preserving policy), and swaps the
set of available versions in one assignment: a request holds the version it
started with until it finishes, so a switch never drops a request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from tfadv.export import contract as C
from tfadv.export.batching import BatchingParameters
from tfadv.export.saved_model import list_versions
from tfadv.serving.batcher import Batcher, check_alive
from tfadv.serving.config import ModelConfig
from tfadv.serving.errors import invalid, not_found
from tfadv.serving.tensors import numpy_dtype, to_numpy

log = logging.getLogger("tfadv.serving")

_INIT_OP = "__saved_model_init_op"
_MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
_MAX_LOAD_ATTEMPTS = 3


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


class Signature:
    """A callable signature of a loaded SavedModel, with request validation.

    Args:
        name: the signature key.
        signature_def: its `SignatureDef` proto.
        fn: the concrete function (`loaded.signatures[name]`).
        max_batch_size: the largest batch one request may carry.
        batching: `BatchingParameters` to merge concurrent requests, or None.
    """

    def __init__(self, name, signature_def, fn, *, max_batch_size, batching=None, label=""):
        self.name = name
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

        try:
            result = self._fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
            message = getattr(err, "message", None) or str(err)
            raise invalid(f"Signature '{self.name}' could not run on this request: "
                          f"{message.splitlines()[0] if message else err!r}") from None
        return {k: v.numpy() for k, v in result.items()}

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


class Servable:
    """One loaded version of a model.

    Args:
        name: the model name.
        version: the version number.
        path: the version directory.
        max_batch_size: the largest batch one request may carry.
        batching: `BatchingParameters` or None.
        warmup: replay `assets.extra/tf_serving_warmup_requests` before serving.

    Raises:
        ValueError: if the directory holds no SavedModel with serving signatures.
    """

    def __init__(self, name, version, path, *, max_batch_size, batching=None, warmup=True):

        self.name = name
        self.version = version
        self.path = path
        pb = os.path.join(path, C.SAVED_MODEL_FILE)
        if not os.path.isfile(pb):
            raise ValueError(f"No {C.SAVED_MODEL_FILE} in {path!r}.")
        proto = saved_model_pb2.SavedModel()
        with open(pb, "rb") as f:
            proto.ParseFromString(f.read())
        meta = next((m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags), None)
        if meta is None:
            raise ValueError(f"The SavedModel in {path!r} has no meta graph tagged 'serve'.")
        self.signature_defs = {k: v for k, v in meta.signature_def.items() if k != _INIT_OP}
        self._loaded = tf.saved_model.load(path, tags=["serve"])
        self.signatures = {}
        for key, sig_def in sorted(self.signature_defs.items()):
            if key in self._loaded.signatures:
                self.signatures[key] = Signature(
                    key, sig_def, self._loaded.signatures[key], max_batch_size=max_batch_size,
                    batching=batching, label=f"{name}-v{version}-")
        if not self.signatures:
            raise ValueError(f"The SavedModel in {path!r} has no callable signatures.")
        # (input key, dtype) -> a signature taking that dtype, for error hints.
        self._dtype_hints = {}
        for key, sig in self.signatures.items():
            for spec in sig.inputs.values():
                self._dtype_hints.setdefault((spec.key, spec.dtype), key)
        if warmup:
            self._warmup()
            if batching is not None and batching.allowed_batch_sizes:
                self._warm_batch_sizes(batching.allowed_batch_sizes)

    def _warmup(self):
        path = os.path.join(self.path, C.ASSETS_EXTRA, C.WARMUP_FILE)
        if not os.path.isfile(path):
            return


        for i, record in enumerate(tf.data.TFRecordDataset(path)):
            if i >= _MAX_WARMUP_RECORDS:
                break
            entry = prediction_log_pb2.PredictionLog()
            entry.ParseFromString(record.numpy())
            if entry.WhichOneof("log_type") != "predict_log":
                continue
            request = entry.predict_log.request
            sig = self.signature(request.model_spec.signature_name or C.SERVING_SIGNATURE)
            inputs = {k: to_numpy(v, f"warm-up input '{k}'") for k, v in request.inputs.items()}
            sig._call(inputs)  # straight to the model: batch threads may be busy elsewhere

    def _warm_batch_sizes(self, sizes):
        """Runs each batched signature once per padded batch size, so that the
        first requests do not pay for building kernels for new shapes."""
        for sig in self.signatures.values():
            if not sig.batching or any(None in s.shape[1:] for s in sig.inputs.values()):
                continue
            for n in sizes:
                sig._call({k: np.zeros((n, *s.shape[1:]), s.dtype) for k, s in sig.inputs.items()})

    def signature(self, key: str) -> Signature:
        sig = self.signatures.get(key or C.SERVING_SIGNATURE)
        if sig is None:
            raise not_found(f"Serving signature key '{key}' not found in model '{self.name}' "
                            f"version {self.version}; available: {sorted(self.signatures)}.")
        return sig

    def predict(self, signature_name: str, inputs: dict, output_filter=(), *,
                deadline: float | None = None, alive=None) -> dict:
        """Validates and runs one request.

        Args:
            signature_name: the signature key.
            inputs: dict of arrays.
            output_filter: output keys to return (all if empty).
            deadline, alive: as `Signature.run`; a request whose client has
                gone is not run.

        Returns:
            A dict of output arrays (only `output_filter` keys if given).
        """
        sig = self.signature(signature_name)
        unknown = [k for k in output_filter if k not in sig.outputs]
        if unknown:
            raise invalid(f"output_filter names {unknown}, which signature '{sig.name}' does not "
                          f"have; its outputs: {sorted(sig.outputs)}.")
        batch = sig.validate(inputs, self._dtype_hints)
        outputs = sig.run(inputs, batch, deadline=deadline, alive=alive)
        if output_filter:
            outputs = {k: outputs[k] for k in output_filter}
        return outputs

    def close(self):
        """Stops the batch threads after the queued requests ran."""
        for sig in self.signatures.values():
            sig.close()


@dataclasses.dataclass
class VersionState:
    state: str  # "LOADING", "AVAILABLE", "END"
    error_code: str = "OK"
    error_message: str = ""
    attempts: int = 0


class _Model:
    """One served model: its config, loaded versions and version states."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.available: dict[int, Servable] = {}  # replaced, never mutated
        self.states: dict[int, VersionState] = {}

    def lookup(self, version=None, label=None) -> Servable:
        available = self.available  # one read: the set this request uses
        name = self.config.name
        if label:
            if label not in self.config.labels:
                raise not_found(f"Unknown version label '{label}' for model '{name}'; labels: "
                                f"{sorted(self.config.labels)}.")
            version = self.config.labels[label]
        if version is None:
            if not available:
                raise not_found(f"Servable not found for request: Latest({name}): no version of "
                                f"model '{name}' is loaded (is {self.config.base_path} empty?).")
            return available[max(available)]
        servable = available.get(int(version))
        if servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version}); "
                            f"available versions: {sorted(available)}.")
        return servable


class ModelRegistry:
    """The models a server serves, kept in step with their base directories.

    Args:
        configs: a list of `ModelConfig`.
        max_batch_size: the largest batch one request may carry.
        batching: `BatchingParameters` to merge concurrent requests, or None.
        warmup: replay each version's warm-up requests before serving it.
    """

    def __init__(self, configs, *, max_batch_size: int = 256,
                 batching: BatchingParameters | None = None, warmup: bool = True):
        self._models = {c.name: _Model(c) for c in configs}
        self.max_batch_size = max_batch_size
        self.batching = batching
        self.warmup = warmup
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.generation = 0  # bumps whenever the available versions change

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def model(self, name: str) -> _Model:
        if not name:
            raise invalid("Missing model name: set model_spec.name.")
        model = self._models.get(name)
        if model is None:
            raise not_found(f"Servable not found for request: model '{name}' is not served; "
                            f"served models: {self.names}.")
        return model

    def lookup(self, name, version=None, label=None) -> Servable:
        """The servable a request addresses.

        Raises:
            ServingError: NOT_FOUND for an unknown model, version or label.
        """
        return self.model(name).lookup(version, label)

    def poll(self):
        """Loads new versions and unloads old ones for every model, once."""
        with self._poll_lock:
            for model in self._models.values():
                self._poll_model(model)

    def _poll_model(self, model: _Model):
        cfg = model.config
        on_disk = [v for v in list_versions(cfg.base_path)
                   if os.path.isfile(os.path.join(cfg.base_path, str(v), C.SAVED_MODEL_FILE))]
        loadable = [v for v in on_disk if v in model.available or
                    model.states.get(v, VersionState("NEW")).attempts < _MAX_LOAD_ATTEMPTS]
        wanted = cfg.wanted(loadable)
        new = dict(model.available)
        for v in wanted:
            if v in new:
                continue
            state = model.states.setdefault(v, VersionState("LOADING"))
            state.state = "LOADING"
            t0 = time.perf_counter()
            try:
                new[v] = Servable(cfg.name, v, os.path.join(cfg.base_path, str(v)),
                                  max_batch_size=self.max_batch_size, batching=self.batching,
                                  warmup=self.warmup)
            except Exception as err:  # a broken version must not stop the server
                state.attempts += 1
                state.state = "END"
                state.error_code = "UNKNOWN"
                state.error_message = f"{type(err).__name__}: {err}"
                log.error("model %s: could not load version %d (attempt %d of %d): %s",
                          cfg.name, v, state.attempts, _MAX_LOAD_ATTEMPTS, err)
                continue
            model.states[v] = VersionState("AVAILABLE")
            log.info("model %s: version %d available (loaded in %.1f s)", cfg.name, v,
                     time.perf_counter() - t0)
        # Keep the old versions until something newer is actually loaded.
        keep = set(cfg.wanted([v for v in on_disk if v in new]))
        if not keep and new:
            keep = set(model.available)
        retired = [new.pop(v) for v in sorted(new) if v not in keep]
        if new != model.available:
            model.available = new  # the atomic switch
            self.generation += 1
        for servable in retired:
            model.states[servable.version] = VersionState("END")
            log.info("model %s: version %d unloaded", cfg.name, servable.version)
            # Requests already holding it finish; its batch threads drain and exit.
            threading.Thread(target=servable.close, daemon=True).start()

    def status(self, name, version=None, label=None) -> list[tuple[int, VersionState]]:
        """(version, state) pairs for GetModelStatus.

        Raises:
            ServingError: NOT_FOUND for an unknown model, version or label.
        """
        model = self.model(name)
        if label:
            if label not in model.config.labels:
                raise not_found(f"Unknown version label '{label}' for model '{name}'.")
            version = model.config.labels[label]
        states = dict(model.states)
        if version is not None:
            if int(version) not in states:
                raise not_found(f"Could not find version {version} of model '{name}'; known "
                                f"versions: {sorted(states)}.")
            return [(int(version), states[int(version)])]
        if not states:
            raise not_found(f"Could not find any versions of model '{name}' in "
                            f"{model.config.base_path}.")
        return sorted(states.items(), reverse=True)

    def start_polling(self, interval: float):
        """Polls in a background thread every `interval` seconds (0: never)."""
        if interval <= 0 or self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:  # keep polling; the next round may succeed
                    log.exception("polling the model directories failed")

        self._thread = threading.Thread(target=loop, name="version-poller", daemon=True)
        self._thread.start()

    def close(self):
        """Stops polling and the batch threads of every loaded version."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._poll_lock:
            for model in self._models.values():
                for servable in model.available.values():
                    servable.close()
