"""Certified robustness: randomized smoothing (Cohen et al. 2019) for classifiers."""

from tfadv.certification.smoothing import (ABSTAIN, RandomizedSmoothing, certified_accuracy,
                                           lower_confidence_bound)

__all__ = ["ABSTAIN", "RandomizedSmoothing", "certified_accuracy", "lower_confidence_bound"]
