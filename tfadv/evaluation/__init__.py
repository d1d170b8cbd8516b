"""Robustness evaluation: accuracy under attack, curves and sanity checks."""

from tfadv.evaluation import centers
from tfadv.evaluation.checks import CheckReport, gradient_masking_checks
from tfadv.evaluation.robustness import (
    RobustnessResult,
    attack_batches,
    evaluate_robustness,
    plot_curve,
    robustness_curve,
    save_curve,
)
from tfadv.evaluation import verification
from tfadv.evaluation.verification import (
    best_threshold,
    cosine_similarity,
    kfold_accuracy,
    load_threshold,
    nearest_neighbour_accuracy,
    roc_auc,
    roc_curve,
    save_threshold,
    tar_at_far,
    verification_report,
)

__all__ = [
    "CheckReport",
    "RobustnessResult",
    "attack_batches",
    "centers",
    "evaluate_robustness",
    "gradient_masking_checks",
    "plot_curve",
    "robustness_curve",
    "save_curve",
]
__all__ += [
    "best_threshold",
    "cosine_similarity",
    "kfold_accuracy",
    "load_threshold",
    "nearest_neighbour_accuracy",
    "roc_auc",
    "roc_curve",
    "save_threshold",
    "tar_at_far",
    "verification",
    "verification_report",
]

from tfadv.evaluation import faces
from tfadv.evaluation.faces import AttackResult, FaceEvaluation, ModeResult, evaluate_faces

__all__ += ["AttackResult", "FaceEvaluation", "ModeResult", "evaluate_faces", "faces"]
