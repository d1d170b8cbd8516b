"""Clean and robust accuracy, worst case over attacks and restarts, and curves."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfadv.attacks.base import Attack, call_model
from tfadv.attacks.pgd import PGD
from tfadv.evaluation.compiled import compiled, compiled_attack
from tfadv.ops.labels import sparse_labels_np


def _progress(iterable, enabled, desc, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _predict(model, x, batch_size):
    def make(model_ref):
        def predict(xb):
            return tf.argmax(call_model(model_ref(), xb), axis=-1)

        # Attacks use explicit tf.while_loop: no AutoGraph conversion needed.
        return tf.function(predict, reduce_retracing=True, autograph=False)

    fn = compiled(model, "predict", make)
    return np.concatenate([fn(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)])


def attack_batches(model, attack: Attack, x, y, *, batch_size=256, progress=False, desc=None):
    """Runs an attack over NumPy arrays in compiled batches; returns x_adv (NumPy).

    Attacks with equal configs share one compiled function per model (traced
    once, freed with the model): re-creating the attack object in a loop
    costs no retrace and no memory.

    Raises:
        ValueError: x outside the attack's bounds.
    """
    attack.check_bounds(x)
    fn = compiled_attack(model, attack)
    out = []
    starts = range(0, len(x), batch_size)
    for i in _progress(starts, progress, desc or attack.name, total=len(starts)):
        out.append(fn(tf.constant(x[i : i + batch_size]), tf.constant(y[i : i + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros_like(x)


@dataclasses.dataclass
class RobustnessResult:
    """Accuracies of one evaluation.

    Attributes:
        clean_accuracy: accuracy on unperturbed inputs.
        robust_accuracy: fraction correct on the clean input AND under every
            attack and restart (the per-example worst case).
        per_attack: accuracy under each attack alone (worst over its restarts).
        n: number of examples.
        correct: per-example worst-case correctness (bool array).
    """

    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict
    n: int
    correct: np.ndarray = dataclasses.field(repr=False, default=None)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "per_attack": self.per_attack,
        }


def _check_xy(x, y, attacks=()):
    """x as float32 [N, ...], y as int64 [N] (label contract), checked against the attacks.

    Raises:
        ValueError: mismatched lengths, non-float x, labels outside the label
            contract, or x outside an attack's bounds.
    """
    x = np.asarray(x)
    if x.ndim < 2 or len(x) != len(np.asarray(y)):
        raise ValueError(f"Expected x [N, ...] and y [N]. Received shapes {x.shape} and "
                         f"{np.asarray(y).shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Expected float inputs. Received dtype {x.dtype}.")
    y = sparse_labels_np(y)
    for attack in attacks:
        attack.check_bounds(x)
    return x.astype(np.float32, copy=False), y


def evaluate_robustness(
    model,
    x,
    y,
    attacks: Sequence[Attack] | Attack,
    *,
    restarts: int = 1,
    batch_size: int = 256,
    progress: bool = False,
) -> RobustnessResult:
    """Clean accuracy and worst-case robust accuracy under a list of attacks.

    An example counts as robust only if the model classifies it correctly
    clean and under every attack, in every restart (random starts differ per
    restart). This is the only honest number: the accuracy that no attack in
    the list could break.

    Args:
        model: callable mapping x to logits.
        x, y: NumPy inputs (float, in the attacks' bounds) and int labels.
        attacks: an Attack or a list of them.
        restarts: runs of each attack (useful with random starts).
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        A `RobustnessResult`.
    """
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if int(restarts) < 1:
        raise ValueError(f"Expected restarts >= 1. Received: restarts={restarts}")
    x, y = _check_xy(x, y, attacks)
    clean_correct = _predict(model, x, batch_size) == y
    worst = clean_correct.copy()
    per_attack = {}
    for k, attack in enumerate(attacks):
        correct_a = clean_correct.copy()
        for r in range(int(restarts)):
            x_adv = attack_batches(
                model, attack, x, y, batch_size=batch_size, progress=progress,
                desc=f"{attack.name} {r + 1}/{restarts}",
            )
            correct_a &= _predict(model, x_adv, batch_size) == y
        key = attack.name if attack.name not in per_attack else f"{attack.name}_{k}"
        per_attack[key] = float(correct_a.mean())
        worst &= correct_a
    return RobustnessResult(
        clean_accuracy=float(clean_correct.mean()),
        robust_accuracy=float(worst.mean()),
        per_attack=per_attack,
        n=int(len(y)),
        correct=worst,
    )


def default_curve_attack(eps: float, *, steps: int = 20, norm="inf", bounds=(0.0, 1.0)) -> Attack:
    """PGD with random start and step 2.5 * eps / steps: the curve's default attack."""
    return PGD(eps=eps, steps=steps, step_size=2.5 * eps / steps, norm=norm, random_start=True,
               bounds=bounds)


def robustness_curve(
    model,
    x,
    y,
    eps_values: Sequence[float],
    *,
    attack_fn: Callable[[float], Attack] | None = None,
    restarts: int = 1,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Accuracy as a function of the attack budget.

    Args:
        eps_values: budgets to evaluate (0 gives clean accuracy).
        attack_fn: `eps -> Attack`; defaults to PGD-20 with random start.

    Returns:
        `{"eps": [...], "accuracy": [...], "attack": name, "n": N}`.
    """
    eps_values = [float(e) for e in eps_values]
    if not eps_values or any(e < 0 for e in eps_values):
        raise ValueError(f"Expected a non-empty list of eps >= 0. Received: {eps_values}")
    attack_fn = attack_fn or default_curve_attack
    accs = []
    attack_name = None
    for eps in _progress(eps_values, progress, "curve"):
        if eps == 0:
            x32, y64 = _check_xy(x, y)
            accs.append(float((_predict(model, x32, batch_size) == y64).mean()))
            continue
        attack = attack_fn(eps)
        attack_name = attack.name
        res = evaluate_robustness(model, x, y, [attack], restarts=restarts, batch_size=batch_size)
        accs.append(res.robust_accuracy)
    return {"eps": eps_values, "accuracy": accs, "attack": attack_name, "n": int(len(y))}


def plot_curve(curves: dict | list, path, *, title="Robustness curve", xlabel="eps (Linf)"):
    """Plots one curve dict (or a list of `(label, curve)` pairs) to a PNG."""
    # A Figure without pyplot: no global backend switch, safe inside notebooks.
    from matplotlib.figure import Figure

    if isinstance(curves, dict):
        curves = [("model", curves)]
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    for label, c in curves:
        ax.plot(c["eps"], c["accuracy"], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_curve(curve: dict, prefix, **plot_kwargs) -> tuple[str, str]:
    """Writes `PREFIX.json` and `PREFIX.png`; returns both paths."""
    prefix = os.fspath(prefix)
    parent = os.path.dirname(prefix)
    if parent:
        os.makedirs(parent, exist_ok=True)
    json_path, png_path = prefix + ".json", prefix + ".png"
    with open(json_path, "w") as f:
        json.dump(curve, f, indent=1)
    plot_curve(curve, png_path, **plot_kwargs)
    return json_path, png_path
