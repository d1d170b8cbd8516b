"""Which models to serve: TF Serving's ModelServerConfig text format, or one base directory."""

from __future__ import annotations

import dataclasses
import os

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tfadv.export import contract as C


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model, as in TF Serving's `ModelConfig`.

    Args:
        name: the model name requests address.
        base_path: directory holding numbered version directories.
        policy: "latest" (the newest `num_versions`), "all", or "specific".
        num_versions: for "latest".
        versions: for "specific".
        labels: version labels (e.g. {"stable": 1}) usable in requests.
    """

    name: str
    base_path: str
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple = ()
    labels: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.name or "/" in self.name or ":" in self.name:
            raise ValueError("Expected a model name without '/' or ':'. "
                             f"Received: name={self.name!r}")
        if self.policy not in ("latest", "all", "specific"):
            raise ValueError("Expected policy 'latest', 'all' or 'specific'. "
                             f"Received: policy={self.policy!r}")
        if self.policy == "latest" and self.num_versions < 1:
            raise ValueError("Expected num_versions >= 1. "
                             f"Received: num_versions={self.num_versions}")
        if self.policy == "specific" and not self.versions:
            raise ValueError(f"Model {self.name!r}: the 'specific' version policy needs versions.")

    def wanted(self, on_disk: list[int]) -> list[int]:
        """The versions to serve, given the loadable versions on disk."""
        on_disk = sorted(on_disk)
        if self.policy == "all":
            return on_disk
        if self.policy == "specific":
            return [v for v in on_disk if v in set(self.versions)]
        return on_disk[-self.num_versions:]


def single_model(base_dir: str, name: str = C.DEFAULT_MODEL_NAME) -> list[ModelConfig]:
    """The config for serving the latest version in one base directory.

    Raises:
        FileNotFoundError: if `base_dir` does not exist.
    """
    if not os.path.isdir(base_dir):
        raise FileNotFoundError(f"No model base directory at {base_dir!r}. Write one with "
                                "`tfadv export MODEL.keras --out BASE_DIR`.")
    return [ModelConfig(name=name, base_path=os.path.abspath(base_dir))]


def parse_model_config(text: str, relative_to: str | None = None) -> list[ModelConfig]:
    """Parses a ModelServerConfig text proto (TF Serving's --model_config_file).

    Args:
        text: the text proto.
        relative_to: directory that relative `base_path`s are resolved against.

    Raises:
        ValueError: if it does not parse or uses features this server lacks.
    """

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise ValueError(f"Could not parse the model config ({err}). Expected TF Serving's "
                         "ModelServerConfig text format: model_config_list { config { name: "
                         "\"facenet\" base_path: \"/models/facenet\" model_platform: "
                         "\"tensorflow\" } }") from None
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError("Expected a model_config_list in the model config; "
                         "custom_model_config is not supported.")
    out = []
    for mc in config.model_config_list.config:
        if mc.model_platform not in ("", "tensorflow"):
            raise ValueError(f"Model {mc.name!r}: only model_platform \"tensorflow\" is "
                             f"supported. Received: {mc.model_platform!r}")
        base = mc.base_path
        if not base:
            raise ValueError(f"Model {mc.name!r} has no base_path in the model config.")
        if relative_to is not None and not os.path.isabs(base):
            base = os.path.join(relative_to, base)
        policy = mc.model_version_policy.WhichOneof("policy_choice") or "latest"
        kwargs = {}
        if policy == "latest":
            kwargs["num_versions"] = mc.model_version_policy.latest.num_versions or 1
        elif policy == "specific":
            kwargs["versions"] = tuple(int(v) for v in mc.model_version_policy.specific.versions)
        out.append(ModelConfig(name=mc.name, base_path=os.path.abspath(base), policy=policy,
                               labels={k: int(v) for k, v in mc.version_labels.items()},
                               **kwargs))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique in the model config. Received: {names}")
    if not out:
        raise ValueError("The model config lists no models.")
    return out


def read_model_config(path: str) -> list[ModelConfig]:
    """Reads a ModelServerConfig text file; relative base paths are resolved
    against the file's directory.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if it does not parse.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model config file at {path!r}.")
    with open(path) as f:
        return parse_model_config(f.read(), relative_to=os.path.dirname(os.path.abspath(path)))
