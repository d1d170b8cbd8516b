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

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from tfadv.export import contract as C
from tfadv.export.batching import BatchingParameters
from tfadv.export.saved_model import list_versions
from tfadv.serving.config import ModelConfig
from tfadv.serving.errors import ServingError, invalid, not_found
from tfadv.serving.metrics import METRICS
from tfadv.serving.signature import Signature, warm_input
from tfadv.serving.tensors import to_numpy

log = logging.getLogger("tfadv.serving")

_INIT_OP = "__saved_model_init_op"
_MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
_MAX_LOAD_ATTEMPTS = 3


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
                    batching=batching, label=f"{name}-v{version}-", model_name=name)
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
                sig._call({k: warm_input(s, n) for k, s in sig.inputs.items()})

    def signature(self, key: str, *, rest: bool = False) -> Signature:
        """The signature a request names ("" or None: serving_default).

        Raises:
            ServingError: an unknown key, in TF Serving's words: over gRPC
                FAILED_PRECONDITION 'Serving signature key "k" not found.', over
                REST INVALID_ARGUMENT 'Serving signature name: "k" not found in
                signature def'; the available keys follow.
        """
        key = key or C.SERVING_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            hint = f" (model '{self.name}' version {self.version} has {sorted(self.signatures)})"
            if rest:
                raise invalid(f'Serving signature name: "{key}" not found in signature def{hint}')
            raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{key}" not '
                                                      f"found.{hint}")
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
        """TF Serving's messages first (clients match on them), then what to do."""
        available = self.available  # one read: the set this request uses
        name = self.config.name
        if label:
            if label not in self.config.labels:
                raise invalid(f"Unrecognized servable version label: {label} (model '{name}' "
                              f"has the labels {sorted(self.config.labels)}).")
            version = self.config.labels[label]
        if version is None:
            if not available:
                raise not_found(f"Servable not found for request: Latest({name}) (no version "
                                f"is loaded; is {self.config.base_path} empty?)")
            return available[max(available)]
        servable = available.get(int(version))
        if servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version}) "
                            f"(available versions: {sorted(available)})")
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
        METRICS.watch(self)
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

    def serves(self, name, signature=None) -> bool:
        """Whether `name` is a served model (and `signature` one of its loaded signatures)."""
        model = self._models.get(name)
        if model is None or signature is None:
            return model is not None
        return any(signature in s.signatures for s in model.available.values())

    def version_states(self) -> dict:
        """{(model name, version): state name} of every version loaded or tried."""
        return {(name, v): s.state for name, model in self._models.items()
                for v, s in dict(model.states).items()}

    def model(self, name: str, version=None) -> _Model:
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        if not name:
            raise invalid("Missing model name: set model_spec.name.")
        model = self._models.get(name)
        if model is None:
            raise not_found(f"Servable not found for request: {request} (model '{name}' is not "
                            f"served; served models: {self.names})")
        return model

    def lookup(self, name, version=None, label=None) -> Servable:
        """The servable a request addresses.

        Raises:
            ServingError: NOT_FOUND for an unknown model or version,
                INVALID_ARGUMENT for an unknown label (TF Serving's codes).
        """
        return self.model(name, version).lookup(version, label)

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
                METRICS.load(os.path.join(cfg.base_path, str(v)), ok=False)
                state.attempts += 1
                state.state = "END"
                state.error_code = "UNKNOWN"
                state.error_message = f"{type(err).__name__}: {err}"
                log.error("model %s: could not load version %d (attempt %d of %d): %s",
                          cfg.name, v, state.attempts, _MAX_LOAD_ATTEMPTS, err)
                continue
            model.states[v] = VersionState("AVAILABLE")
            METRICS.load(os.path.join(cfg.base_path, str(v)), ok=True)
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
        """(version, state) pairs for GetModelStatus, newest first.

        As TF Serving's, the status ignores a version label (every version is
        listed) and names what it could not find in TF Serving's words.

        Raises:
            ServingError: NOT_FOUND for an unknown model or version.
        """
        if not name:
            raise invalid("Missing model name in request.")
        model = self._models.get(name)
        states = dict(model.states) if model is not None else {}
        if version is not None:
            if int(version) not in states:
                raise not_found(f"Could not find version {version} of model {name}")
            return [(int(version), states[int(version)])]
        if not states:
            raise not_found(f"Could not find any versions of model {name}")
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
