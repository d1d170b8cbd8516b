"""Training models and callbacks."""

from tfadv.trainers.adversarial import METHODS, AdversarialModel
from tfadv.trainers.callbacks import EpsilonWarmup, JSONHistory

__all__ = ["METHODS", "AdversarialModel", "EpsilonWarmup", "JSONHistory"]
