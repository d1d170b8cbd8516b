"""Adversarial attacks: configure, then call `attack(model, x, y) -> x_adv`."""

from tfadv.attacks import objectives
from tfadv.attacks.apgd import APGD, APGDT
from tfadv.attacks.base import Attack
from tfadv.attacks.cw import CarliniWagnerL2
from tfadv.attacks.embedding import (
    EmbeddingAPGD,
    EmbeddingCW,
    attack_success,
    dodging_pgd,
    embedding_fgsm,
    embedding_pgd,
    impersonation_pgd,
    minimal_eps,
)
from tfadv.attacks.pgd import FGSM, PGD, InversePGD
from tfadv.attacks.registry import deserialize, get, names, register, serialize

CW = CarliniWagnerL2

__all__ = [
    "APGD",
    "APGDT",
    "Attack",
    "CW",
    "CarliniWagnerL2",
    "FGSM",
    "InversePGD",
    "PGD",
    "EmbeddingAPGD",
    "EmbeddingCW",
    "attack_success",
    "deserialize",
    "dodging_pgd",
    "embedding_fgsm",
    "embedding_pgd",
    "impersonation_pgd",
    "minimal_eps",
    "get",
    "names",
    "objectives",
    "register",
    "serialize",
]
