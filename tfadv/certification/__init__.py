"""Certified robustness: randomized smoothing (Cohen et al. 2019) for classifiers, center
smoothing (Kumar & Goldstein 2021) for embedding models and their verification decisions."""

from tfadv.certification.center import (NOT_CERTIFIED, CenterSmoothing, EmbeddingCertificate,
                                        certified_decisions)
from tfadv.certification.smoothing import (ABSTAIN, RandomizedSmoothing, certified_accuracy,
                                           lower_confidence_bound)

__all__ = ["ABSTAIN", "NOT_CERTIFIED", "CenterSmoothing", "EmbeddingCertificate",
           "RandomizedSmoothing", "certified_accuracy", "certified_decisions",
           "lower_confidence_bound"]
