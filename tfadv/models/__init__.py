"""Model builders."""

from tfadv.models.features import feature_model, logits_and_features, mnist_feature_net
from tfadv.models.ensemble import ensemble
from tfadv.models.facenet import PRESETS, facenet, freeze_backbone, load_embedder
from tfadv.models.inception_resnet_v1 import inception_resnet_v1_backbone
from tfadv.models.small import MNIST_MODELS, madry_cnn, mnist_cnn, small_cnn

__all__ = [
    "MNIST_MODELS",
    "PRESETS",
    "ensemble",
    "facenet",
    "feature_model",
    "freeze_backbone",
    "inception_resnet_v1_backbone",
    "load_embedder",
    "logits_and_features",
    "madry_cnn",
    "mnist_cnn",
    "mnist_feature_net",
    "small_cnn",
]
