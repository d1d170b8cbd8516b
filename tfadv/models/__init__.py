"""Model builders."""

from tfadv.models.small import mnist_cnn

__all__ = ["mnist_cnn"]
