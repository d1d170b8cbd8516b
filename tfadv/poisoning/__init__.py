"""Data poisoning: backdoor triggers to simulate the threat, and the defences that find
poisoned training examples (spectral signatures, activation clustering, STRIP)."""

from tfadv.poisoning.defences import DetectionResult, activation_clustering, spectral_signature
from tfadv.poisoning.detect import METHODS, detect, feature_model
from tfadv.poisoning.triggers import BlendTrigger, PatchTrigger, PoisonedSet, poison

__all__ = ["METHODS", "BlendTrigger", "DetectionResult", "PatchTrigger", "PoisonedSet",
           "activation_clustering", "detect", "feature_model", "poison", "spectral_signature"]
