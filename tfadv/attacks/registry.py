"""Attack names, construction by name, and (de)serialisation."""

from __future__ import annotations

from tfadv.attacks.apgd import APGD, APGDT
from tfadv.attacks.base import Attack
from tfadv.attacks.cw import CarliniWagnerL2
from tfadv.attacks.fab import FAB, FABT
from tfadv.attacks.pgd import FGSM, PGD, InversePGD

_REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Registers an Attack subclass under `cls.name` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise ValueError(f"Expected an Attack subclass. Received: {cls!r}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (FGSM, PGD, InversePGD, CarliniWagnerL2, APGD, APGDT, FAB, FABT):
    register(_cls)


def names() -> list[str]:
    """Registered attack names."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Attack:
    """Builds an attack by name: `get("pgd", eps=0.3, steps=40)`."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown attack {name!r}. Expected one of {names()}.")
    return _REGISTRY[key](**kwargs)


def serialize(attack: Attack) -> dict:
    """`{"class_name": name, "config": {...}}`, JSON-compatible."""
    if not isinstance(attack, Attack):
        raise ValueError(f"Expected an Attack. Received: {attack!r}")
    return {"class_name": attack.name, "config": attack.get_config()}


def deserialize(spec) -> Attack:
    """Inverse of `serialize`; an Attack instance passes through."""
    if isinstance(spec, Attack):
        return spec
    if not isinstance(spec, dict) or "class_name" not in spec:
        raise ValueError(
            f"Expected an Attack or a dict with 'class_name' and 'config'. Received: {spec!r}"
        )
    key = spec["class_name"]
    if key not in _REGISTRY:
        raise ValueError(f"Unknown attack {key!r}. Expected one of {names()}.")
    return _REGISTRY[key].from_config(spec.get("config", {}))
