"""Keras layers."""

from tfadv.layers.centers import ClassCenters

__all__ = ["ClassCenters"]
