"""Center-loss settings and the cosine-threshold rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Training methods of `tfadv.AdversarialModel` (clean, Madry PGD, TRADES).
# Training methods: clean, the attack-based min-max (Madry PGD, TRADES) and the
# fast one-pass methods (tfadv.trainers.fast).
FAST_METHODS = ("fgsm_rs", "n_fgsm", "free")
# Training of a randomized-smoothing base model (tfadv.trainers.noise).
NOISE_METHODS = ("gaussian", "smoothadv")
METHODS = ("standard", "pgd", "trades", *FAST_METHODS, *NOISE_METHODS)
CENTER_TARGETS = ("clean", "adversarial", "both")
CENTER_SOURCES = ("learned", "inverse_batch")


@dataclasses.dataclass(frozen=True)
class CenterLossConfig:
    """Center loss inside adversarial training (Wen et al., ECCV 2016).

    Attributes:
        weight: lambda in `L = CE + lambda * L_C`, with L_C = 1/2 mean ||x_i - c_{y_i}||^2.
        alpha: centre learning rate of the update rule (0.5 in the paper).
        on: which features are pulled to the centres: "clean", "adversarial" or "both".
        centers: "learned" (centre variables updated by the paper's rule) or
            "inverse_batch" (per batch, the mean feature of each class's inverse
            adversaries: Dong et al. 2023 as centres).
        feature_layer: name of the base model's feature layer.
        num_classes: classes (the centre table's rows).
        inverse_eps, inverse_step_size, inverse_steps: InversePGD settings for
            `centers="inverse_batch"` (defaults: 4/255, 2/255, 5).
    """

    weight: float = 0.01
    alpha: float = 0.5
    on: str = "clean"
    centers: str = "learned"
    feature_layer: str = "features"
    num_classes: int = 10
    inverse_eps: float = 4 / 255
    inverse_step_size: float = 2 / 255
    inverse_steps: int = 5

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"Expected weight >= 0. Received: weight={self.weight}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"Expected 0 <= alpha <= 1. Received: alpha={self.alpha}")
        if self.on not in CENTER_TARGETS:
            raise ValueError(f"Expected on to be one of {CENTER_TARGETS}. Received: {self.on!r}")
        if self.centers not in CENTER_SOURCES:
            raise ValueError(
                f"Expected centers to be one of {CENTER_SOURCES}. Received: {self.centers!r}"
            )
        if int(self.num_classes) < 1:
            raise ValueError(f"Expected num_classes >= 1. Received: {self.num_classes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "CenterLossConfig":
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"Expected a CenterLossConfig or dict. Received: {d!r}")
        return cls(**d)


def check_unit_budget(eps, norm="inf", *, name="eps") -> None:
    """Refuses an Linf budget larger than the whole [0, 1] pixel range.

    With inputs in [0, 1], an Linf ball of radius > 1 holds every image: the
    usual cause is a budget given in pixels (8 for 8/255). L2 budgets may
    exceed 1 (the L2 diameter of 28 x 28 images is 28).

    Raises:
        ValueError: `norm` is Linf and `eps` > 1; the message gives the [0, 1] value.
    """
    from tfadv.ops.norms import canonical_norm  # the one reader of norm spellings

    if canonical_norm(norm) == "inf" and float(eps) > 1:
        raise ValueError(
            f"Expected {name} in [0, 1] units (MNIST pixels are in [0, 1]). Received: "
            f"{eps:g}, larger than the whole pixel range; for {eps:g} pixels of 255 use "
            f"{name} {float(eps) / 255:.4g}.")


def check_pixel_budget(eps, norm="inf", *, name="eps") -> None:
    """Refuses an Linf budget under one grey level on 0-255 face photos.

    Face budgets are in pixels (0-255). An Linf change below 1 cannot be
    stored in an 8-bit photo, so such a budget is almost always one given in
    [0, 1] units (0.03 for 8/255); the attacks would report no success and
    the model would look robust. 0 (no perturbation) is allowed. L2 budgets
    are not checked.

    Raises:
        ValueError: `norm` is Linf and 0 < `eps` < 1; the message gives the
            pixel value of the same budget.
    """
    from tfadv.ops.norms import canonical_norm

    if canonical_norm(norm) == "inf" and 0 < float(eps) < 1:
        raise ValueError(
            f"Expected {name} in pixels (face photos are 0-255). Received: {eps:g}, under one "
            f"grey level; for {eps:g} of the [0, 1] range use {name} {float(eps) * 255:.4g}.")


def check_threshold(threshold, *, name="threshold") -> float:
    """A cosine-similarity threshold as a float: finite and in [-1, 1].

    The one rule for every threshold a user gives (files, command-line
    options, arguments): a cosine similarity lies in [-1, 1], so a threshold
    outside it would accept every pair or none.

    Args:
        threshold: a number (or a numeric string, as argparse passes it).
        name: the name to use in the error message.

    Returns:
        The threshold as a Python float.

    Raises:
        ValueError: not a number, not finite, or outside [-1, 1].
    """
    value = math.nan
    if not isinstance(threshold, (bool, np.bool_)):
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            pass
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise ValueError(f"Expected {name} to be a cosine similarity, a finite number in "
                         f"[-1, 1]. Received: {name}={threshold!r}")
    return value
