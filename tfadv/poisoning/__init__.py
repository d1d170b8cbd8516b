"""Data poisoning: backdoor triggers to simulate the threat, and the defences that find
poisoned training examples (spectral signatures, activation clustering, STRIP)."""

from tfadv.poisoning.defences import (DetectionResult, activation_clustering, class_claims,
                                      spectral_signature)
from tfadv.poisoning.detect import METHODS, detect, feature_model
from tfadv.poisoning.scan import scan_faceset, scan_folder
from tfadv.poisoning.strip import STRIP
from tfadv.poisoning.triggers import (BlendTrigger, PatchTrigger, PoisonedSet, poison,
                                      poison_gallery)

__all__ = ["METHODS", "STRIP", "BlendTrigger", "DetectionResult", "PatchTrigger",
           "PoisonedSet", "activation_clustering", "class_claims", "detect", "feature_model",
           "poison", "poison_gallery", "scan_faceset", "scan_folder", "spectral_signature"]
