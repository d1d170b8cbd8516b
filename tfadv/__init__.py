"""tfadv: adversarial training and robustness evaluation for Keras models."""

from tfadv import attacks, data, evaluation, models, ops, trainers
from tfadv.trainers import AdversarialModel

__version__ = "0.1.0"

__all__ = [
    "AdversarialModel",
    "attacks",
    "data",
    "evaluation",
    "models",
    "ops",
    "trainers",
    "__version__",
]
