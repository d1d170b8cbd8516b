"""Clean and robust accuracy: worst case over attacks and restarts, cascade, curves."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfadv.attacks.base import Attack, call_model
from tfadv.attacks.pgd import PGD
from tfadv.evaluation.compiled import compiled, compiled_attack, in_batches
from tfadv.files import write_json
from tfadv.ops.labels import sparse_labels_np


def _progress(iterable, enabled, desc, total=None):
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _predict(model, x, batch_size):
    def make(model_ref):
        def predict(xb):
            return tf.argmax(call_model(model_ref(), xb), axis=-1)

        # Attacks use explicit tf.while_loop: no AutoGraph conversion needed.
        return tf.function(predict, reduce_retracing=True, autograph=False)

    fn = compiled(model, "predict", make)
    return in_batches(fn, x, batch_size)


def _budget(eps, idx=None):
    """A per-call budget as a float32 tensor: a scalar, or the [N] budgets of rows `idx`."""
    e = np.asarray(eps, np.float32)
    if e.ndim and idx is not None:
        e = e[idx]
    return tf.constant(e)


def attack_batches(model, attack: Attack, x, y, *, eps=None, batch_size=256, progress=False,
                   desc=None):
    """Runs an attack over NumPy arrays in compiled batches; returns x_adv (NumPy).

    The one attack runner of the evaluators: attacks with equal configs share
    one compiled function per model (`compiled_attack`: traced once, freed
    with the model), so re-creating the attack object in a loop costs no
    retrace and no memory.

    Args:
        eps: budget of this call (see `Attack.__call__`): None for the
            attack's own, a float, or per-example budgets [N]. With a budget,
            one compiled function serves every value (a robustness curve is
            one trace over its list of budgets).

    Raises:
        ValueError: x outside the attack's bounds.
    """
    attack.check_bounds(x)
    if attack.black_box:
        # A NumPy search (Square): it batches its own queries and is never traced.
        if eps is not None and np.ndim(eps) == 1 and len(eps) != len(x):
            raise ValueError(f"Expected eps to be a scalar or one budget per example "
                             f"[N={len(x)}]. Received {len(eps)} budgets.")
        return np.asarray(attack(model, x, y, eps=eps))
    if eps is None:
        fn = compiled_attack(model, attack)
    else:
        eps = np.asarray(eps, np.float32)
        if eps.ndim not in (0, 1) or (eps.ndim == 1 and len(eps) != len(x)):
            raise ValueError(f"Expected eps to be a scalar or one budget per example [N={len(x)}]. "
                             f"Received shape {eps.shape}.")
        fn = compiled_attack(model, attack, with_eps=True)
    out = []
    starts = range(0, len(x), batch_size)
    for i in _progress(starts, progress, desc or attack.name, total=len(starts)):
        args = [tf.constant(x[i : i + batch_size]), tf.constant(y[i : i + batch_size])]
        if eps is not None:
            args.append(_budget(eps, slice(i, i + batch_size)))
        out.append(fn(*args).numpy())
    return np.concatenate(out) if out else np.zeros_like(x)


def _check_label_range(model, x, y) -> int:
    """The model's class count (one model call); ValueError when a label is not one of them."""
    num_classes = int(np.asarray(call_model(model, tf.constant(x[:1]))).shape[-1])
    if len(y) and int(np.max(y)) >= num_classes:
        raise ValueError(f"The model has {num_classes} outputs (classes 0-{num_classes - 1}) "
                         f"but the labels go up to {int(np.max(y))}: pass a classifier with one "
                         "logit per class of the data.")
    return num_classes


def _still_correct(model, x, y, batch_size):
    """The one success rule: an example stands while the model's top class is its label."""
    return _predict(model, x, batch_size) == y


@dataclasses.dataclass
class RobustnessResult:
    """Accuracies of one evaluation.

    Attributes:
        clean_accuracy: accuracy on unperturbed inputs.
        robust_accuracy: fraction correct on the clean input AND under every
            attack and restart (the per-example worst case). Cascade or not,
            the same number for the same attacks.
        per_attack: attack name -> accuracy. Without cascade: under that
            attack alone (worst over its restarts, clean errors counted as
            errors). With cascade: the fraction still standing after that
            attack AND every earlier one (non-increasing in attack order; the
            last equals `robust_accuracy`).
        n: number of examples.
        correct: per-example worst-case correctness (bool array).
        cascade: whether each attack ran only on the examples still standing.
        attacked: attack name -> examples the attack ran on, summed over its
            restarts (`n * restarts` without cascade).
    """

    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict
    n: int
    correct: np.ndarray = dataclasses.field(repr=False, default=None)
    cascade: bool = False
    attacked: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "per_attack": self.per_attack,
            "cascade": self.cascade,
            "attacked": self.attacked,
        }


def _check_xy(x, y, attacks=()):
    """x as float32 [N, ...], y as int64 [N] (label contract), checked against the attacks.

    Raises:
        ValueError: no examples, mismatched lengths, non-float x, labels outside
            the label contract, or x outside an attack's bounds.
    """
    x = np.asarray(x)
    if x.ndim < 2 or len(x) != len(np.asarray(y)):
        raise ValueError(f"Expected x [N, ...] and y [N]. Received shapes {x.shape} and "
                         f"{np.asarray(y).shape}.")
    if not len(x):
        raise ValueError(f"Expected at least one example. Received x of shape {x.shape}: an "
                         "accuracy over no examples is undefined (check --n / --limit and "
                         "any filtering before the call).")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Expected float inputs. Received dtype {x.dtype}.")
    y = sparse_labels_np(y)
    for attack in attacks:
        attack.check_bounds(x)
    return x.astype(np.float32, copy=False), y


def _named(attacks) -> dict:
    """{name: attack}: a mapping as given; a list named by `attack.name` (repeats get `_k`)."""
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if isinstance(attacks, Mapping):
        named = {str(k): a for k, a in attacks.items()}
    else:
        named = {}
        for k, attack in enumerate(attacks):
            named[attack.name if attack.name not in named else f"{attack.name}_{k}"] = attack
    for name, attack in named.items():
        if not isinstance(attack, Attack):
            raise ValueError(f"Expected tfadv Attack objects. Received {name}: {attack!r}")
    return named


def evaluate_robustness(
    model,
    x,
    y,
    attacks: Sequence[Attack] | Mapping[str, Attack] | Attack,
    *,
    restarts: int = 1,
    cascade: bool = False,
    eps=None,
    batch_size: int = 256,
    progress: bool = False,
) -> RobustnessResult:
    """Clean accuracy and worst-case robust accuracy under a list of attacks.

    An example counts as robust only if the model classifies it correctly
    clean and under every attack, in every restart (random starts differ per
    restart). This is the only honest number: the accuracy that no attack in
    the list could break.

    With `cascade=True` each attack (and each restart) runs only on the
    examples still correctly classified, AutoAttack's way: the robust
    accuracy is the same, the cost falls with every attack that breaks
    examples, and `per_attack` then reports what is still standing after
    each attack and all earlier ones.

    Args:
        model: callable mapping x to logits.
        x, y: NumPy inputs (float, in the attacks' bounds) and int labels.
        attacks: an Attack, a list of them, or `{name: attack}` (the names
            then key `per_attack`).
        restarts: runs of each attack (useful with random starts).
        cascade: run each attack on the examples still standing only.
        eps: the budget of every attack in this call (see `Attack.__call__`):
            None for each attack's own, a float, or per-example budgets [N].
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        A `RobustnessResult`.
    """
    named = _named(attacks)
    if int(restarts) < 1:
        raise ValueError(f"Expected restarts >= 1. Received: restarts={restarts}")
    x, y = _check_xy(x, y, named.values())
    if eps is not None and np.ndim(eps) == 1 and len(eps) != len(x):
        raise ValueError(f"Expected eps to be a scalar or one budget per example [N={len(x)}]. "
                         f"Received {len(eps)} budgets.")
    _check_label_range(model, x, y)
    clean_correct = _still_correct(model, x, y, batch_size)
    worst = clean_correct.copy()
    per_attack, attacked = {}, {}
    for name, attack in named.items():
        # Without cascade every attack starts from the clean result; with it,
        # from what the earlier attacks left standing.
        standing = worst if cascade else clean_correct.copy()
        attacked[name] = 0
        for r in range(int(restarts)):
            idx = np.flatnonzero(standing) if cascade else np.arange(len(y))
            attacked[name] += len(idx)
            if not len(idx):
                break
            x_adv = attack_batches(
                model, attack, x[idx], y[idx],
                eps=None if eps is None else (eps if np.ndim(eps) == 0 else np.asarray(eps)[idx]),
                batch_size=batch_size, progress=progress,
                desc=f"{name} {r + 1}/{restarts}")
            standing[idx] &= _still_correct(model, x_adv, y[idx], batch_size)
        per_attack[name] = float(standing.mean())
        worst &= standing
    return RobustnessResult(
        clean_accuracy=float(clean_correct.mean()),
        robust_accuracy=float(worst.mean()),
        per_attack=per_attack,
        n=int(len(y)),
        correct=worst,
        cascade=bool(cascade),
        attacked=attacked,
    )


def default_curve_attack(eps: float, *, steps: int = 20, norm="inf", bounds=(0.0, 1.0)) -> Attack:
    """PGD-`steps` with random start and PGD's default step: the curve's default attack."""
    return PGD(eps=eps, steps=steps, norm=norm, random_start=True, bounds=bounds)


def robustness_curve(
    model,
    x,
    y,
    eps_values: Sequence[float],
    *,
    attack: Attack | None = None,
    attack_fn: Callable[[float], Attack] | None = None,
    restarts: int = 1,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Accuracy as a function of the attack budget.

    One attack, built once, runs at every budget through one compiled
    function (the budget is an argument of the call, its step size scaled
    with it): the model is traced once for the whole curve.

    Args:
        eps_values: budgets to evaluate (0 gives clean accuracy).
        attack: the attack, built with any positive eps (the largest budget
            is natural); defaults to `default_curve_attack` (PGD-20 with
            random start) at the largest budget.
        attack_fn: instead of `attack`, `eps -> Attack` building one attack
            per budget (one compiled function each): for attacks whose shape
            is not a rescaling of one budget.

    Returns:
        `{"eps": [...], "accuracy": [...], "attack": name, "n": N}`.

    Raises:
        ValueError: an empty list or a negative budget; both `attack` and
            `attack_fn`; an `attack` built without a positive eps (when a
            budget is positive).
    """
    eps_values = [float(e) for e in eps_values]
    if not eps_values or any(e < 0 for e in eps_values):
        raise ValueError(f"Expected a non-empty list of eps >= 0. Received: {eps_values}")
    if attack is not None and attack_fn is not None:
        raise ValueError("Expected either attack (one attack called at every budget) or "
                         "attack_fn (one attack per budget), not both.")
    if attack is None and attack_fn is None and max(eps_values) > 0:
        attack = default_curve_attack(max(eps_values))
    if attack is not None and max(eps_values) > 0 and not (attack.eps or 0) > 0:
        raise ValueError(f"Expected an attack built with a positive eps (the curve's budgets "
                         f"rescale it). Received: {attack!r}")
    x, y = _check_xy(x, y)
    _check_label_range(model, x, y)
    accs = []
    attack_name = None
    for e in _progress(eps_values, progress, "curve"):
        if e == 0:
            accs.append(float(_still_correct(model, x, y, batch_size).mean()))
            continue
        if attack_fn is not None:
            at, call_eps = attack_fn(e), None
        else:
            at, call_eps = attack, e
        attack_name = at.name
        res = evaluate_robustness(model, x, y, [at], restarts=restarts, eps=call_eps,
                                  batch_size=batch_size)
        accs.append(res.robust_accuracy)
    return {"eps": eps_values, "accuracy": accs, "attack": attack_name, "n": int(len(y))}


def plot_curve(curves: dict | list, path, *, title="Robustness curve", xlabel="eps (Linf)",
               marker="o"):
    """Plots one curve dict (or a list of `(label, curve)` pairs) to a PNG (`marker`:
    matplotlib's, None for a plain line)."""
    # A Figure without pyplot: no global backend switch, safe inside notebooks. Imported
    # here: matplotlib is heavy and only drawing needs it.
    from matplotlib.figure import Figure

    if isinstance(curves, dict):
        curves = [("model", curves)]
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    for label, c in curves:
        ax.plot(c["eps"], c["accuracy"], marker=marker, label=label)
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
    write_json(json_path, curve)
    plot_curve(curve, png_path, **plot_kwargs)
    return json_path, png_path
