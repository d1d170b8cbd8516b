"""Model builders."""

from tfadv.models.features import feature_model, logits_and_features, mnist_feature_net
from tfadv.models.small import mnist_cnn

__all__ = ["feature_model", "logits_and_features", "mnist_cnn", "mnist_feature_net"]
