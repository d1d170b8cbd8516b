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
from tfadv.attacks.fab import FAB, FABT, project_hyperplane_box
from tfadv.attacks.pgd import FGSM, PGD, InversePGD
from tfadv.attacks.registry import deserialize, get, names, register, serialize
from tfadv.attacks.square import EmbeddingSquare, Square, SquareResult

CW = CarliniWagnerL2

__all__ = [
    "APGD",
    "APGDT",
    "Attack",
    "CW",
    "CarliniWagnerL2",
    "FAB",
    "FABT",
    "FGSM",
    "InversePGD",
    "PGD",
    "Square",
    "SquareResult",
    "EmbeddingAPGD",
    "EmbeddingCW",
    "EmbeddingSquare",
    "attack_success",
    "deserialize",
    "dodging_pgd",
    "embedding_fgsm",
    "embedding_pgd",
    "impersonation_pgd",
    "minimal_eps",
    "project_hyperplane_box",
    "get",
    "names",
    "objectives",
    "register",
    "serialize",
]
