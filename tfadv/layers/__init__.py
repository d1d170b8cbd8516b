"""Keras layers."""

from tfadv.layers.centers import ClassCenters
from tfadv.layers.cosine import CosineClassifier
from tfadv.layers.preprocessing import FixedStandardization, PerImageStandardization

__all__ = ["ClassCenters", "CosineClassifier", "FixedStandardization", "PerImageStandardization"]
