"""Training models, callbacks and schedules."""

from tfadv.trainers import schedules

from tfadv.trainers.adversarial import METHODS, AdversarialModel
from tfadv.trainers.base import TrainerBase
from tfadv.trainers.embedding import CosineClassifier, EmbeddingAdversarialModel
from tfadv.trainers.callbacks import EpsilonWarmup, JSONHistory
from tfadv.trainers.schedules import CyclicLR, sgd_nesterov

__all__ = [
    "METHODS",
    "AdversarialModel",
    "CosineClassifier",
    "EmbeddingAdversarialModel",
    "CyclicLR",
    "EpsilonWarmup",
    "JSONHistory",
    "TrainerBase",
    "schedules",
    "sgd_nesterov",
]
