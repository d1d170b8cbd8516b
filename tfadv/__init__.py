"""tfadv: adversarial training and robustness evaluation for Keras models.

Importing tfadv imports TensorFlow and registers tfadv's Keras objects, so
`keras.saving.load_model` reads its models after a plain `import tfadv`.
"""

from tfadv import assets, attacks, config, data, evaluation, layers, losses, models, ops, trainers
from tfadv.config import CenterLossConfig
from tfadv.trainers import AdversarialModel

__version__ = "0.1.0"

__all__ = [
    "AdversarialModel",
    "CenterLossConfig",
    "assets",
    "attacks",
    "config",
    "data",
    "evaluation",
    "layers",
    "losses",
    "models",
    "ops",
    "trainers",
    "__version__",
]
