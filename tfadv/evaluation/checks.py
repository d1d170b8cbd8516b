"""Sanity checks that catch gradient masking, the field's classic self-deception.

A model whose robustness comes from broken gradients (saturated softmax,
non-differentiable preprocessing, randomness) looks robust to gradient
attacks without being robust. These checks look for the symptoms and warn
loudly.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import tensorflow as tf

from tfadv.attacks import objectives
from tfadv.attacks.base import call_model
from tfadv.attacks.pgd import FGSM, PGD
from tfadv.evaluation.robustness import _still_correct, attack_batches
from tfadv.ops.labels import sparse_labels_np


class GradientMaskingWarning(UserWarning):
    """Evaluation results may overstate robustness."""


@dataclasses.dataclass
class CheckReport:
    """Outcome of `gradient_masking_checks`: measurements and any problems found."""

    measurements: dict
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self):
        return {"ok": self.ok, "problems": self.problems, "measurements": self.measurements}


def outputs_look_like_probabilities(outputs) -> bool:
    """Whether model outputs [N, C] look like probabilities (rows in [0, 1] summing to 1)."""
    out = np.asarray(outputs, np.float64)
    return bool(out.size and out.min() >= 0 and out.max() <= 1
                and np.allclose(out.sum(-1), 1.0, atol=1e-3))


def input_gradients(model, x, y):
    """Cross-entropy input gradients [N, d] (float64 NumPy), or None when the
    loss does not depend on the input."""
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = objectives.cross_entropy(call_model(model, x), tf.constant(sparse_labels_np(y)))
    grad = tape.gradient(loss, x)
    return None if grad is None else grad.numpy().astype(np.float64).reshape(len(x), -1)


def zero_gradient_fraction(model, x, y) -> float:
    """Fraction of examples whose cross-entropy input gradient is exactly zero
    (1.0 when the loss does not depend on the input at all)."""
    grad = input_gradients(model, x, y)
    if grad is None:
        return 1.0
    return float((np.abs(grad).max(axis=1) == 0).mean())


def gradient_masking_checks(
    model,
    x,
    y,
    *,
    eps: float,
    steps: int = 10,
    bounds=(0.0, 1.0),
    large_eps: float | None = None,
    tolerance: float = 0.03,
    warn: bool = True,
) -> CheckReport:
    """Runs the standard gradient-masking checks on a batch.

    1. Outputs should be logits, not probabilities (softmax saturates gradients).
    2. Input gradients must be finite and, for most examples, non-zero.
    3. More PGD steps must not raise accuracy.
    4. Iterative PGD must not be weaker than one-step FGSM.
    5. An unbounded-looking budget (`large_eps`, default half the input range)
       must drive accuracy to near zero.

    Args:
        model: callable mapping x to logits.
        x, y: a batch (a few hundred examples is plenty).
        eps: the budget the model is evaluated at.
        steps: PGD steps of the baseline attack (check 3 uses 4x).
        bounds: valid input range.
        large_eps: budget for check 5.
        tolerance: accuracy slack for checks 3-5.
        warn: emit a `GradientMaskingWarning` per problem.

    Returns:
        A `CheckReport`; `report.ok` is False if anything looks masked.
    """
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    y_np = sparse_labels_np(y)
    problems, m = [], {}

    out = np.asarray(call_model(model, x), np.float64)
    looks_prob = outputs_look_like_probabilities(out)
    m["outputs_look_like_probabilities"] = looks_prob
    if looks_prob:
        problems.append(
            "Model outputs look like probabilities (rows in [0, 1] summing to 1). Attack the "
            "logits: remove the final softmax, or gradients will vanish."
        )

    grad = input_gradients(model, x, y_np)
    if grad is None:
        problems.append(
            "The loss has no gradient with respect to the input (a non-differentiable op such "
            "as rounding, or stop_gradient, sits in the model). Gradient attacks report nothing "
            "meaningful here: evaluate with BPDA or a black-box attack."
        )
        m["fraction_zero_gradients"] = 1.0
        return _finish(CheckReport(measurements=m, problems=problems), warn)
    finite = np.isfinite(grad).all(axis=1)
    zero = np.abs(grad).max(axis=1) == 0
    m["fraction_nonfinite_gradients"] = float(1 - finite.mean())
    m["fraction_zero_gradients"] = float(zero.mean())
    if not finite.all():
        problems.append(f"{(~finite).sum()} examples have NaN/inf input gradients.")
    if zero.mean() > 0.5:
        problems.append(
            f"{zero.mean():.0%} of examples have exactly zero input gradients: gradient attacks "
            "cannot work here; use a margin objective, APGD-DLR or a black-box attack."
        )

    x_np = x.numpy()

    def attacked_accuracy(attack):
        x_adv = attack_batches(model, attack, x_np, y_np)
        return float(_still_correct(model, x_adv, y_np, batch_size=256).mean())

    def pgd_acc(e, k):
        # PGD's default step: 2.5 * e / k.
        return attacked_accuracy(PGD(eps=e, steps=k, random_start=True, bounds=bounds))

    acc_k = pgd_acc(eps, steps)
    acc_4k = pgd_acc(eps, 4 * steps)
    acc_fgsm = attacked_accuracy(FGSM(eps=eps, bounds=bounds))
    m.update({f"pgd{steps}_accuracy": acc_k, f"pgd{4 * steps}_accuracy": acc_4k,
              "fgsm_accuracy": acc_fgsm})
    if acc_4k > acc_k + tolerance:
        problems.append(
            f"More PGD steps raised accuracy ({acc_k:.3f} at {steps} steps, {acc_4k:.3f} at "
            f"{4 * steps}): the loss surface is not being climbed; suspect masked gradients."
        )
    if acc_k > acc_fgsm + tolerance:
        problems.append(
            f"PGD ({acc_k:.3f}) is weaker than one-step FGSM ({acc_fgsm:.3f}): iterative attacks "
            "should never lose to their first step; suspect masked gradients."
        )
    if large_eps is None:
        large_eps = 0.5 * (bounds[1] - bounds[0]) if bounds is not None else 10 * eps
    acc_large = pgd_acc(large_eps, 4 * steps)
    m["large_eps"] = float(large_eps)
    m["large_eps_accuracy"] = acc_large
    if acc_large > 0.1 + tolerance:
        problems.append(
            f"Accuracy stays at {acc_large:.3f} under eps={large_eps:g}, a budget that should "
            "break any classifier: gradients are likely masked."
        )
    return _finish(CheckReport(measurements=m, problems=problems), warn)


def _finish(report, warn):
    if warn:
        for p in report.problems:
            warnings.warn(p, GradientMaskingWarning, stacklevel=3)
    return report
