"""AutoAttack in TensorFlow (Croce & Hein, ICML 2020): the standard cascade and its flags.

The number the field puts next to a robustness claim. Four attacks, each run
only on the examples the earlier ones left standing:

1. APGD-CE: APGD on the cross-entropy, 100 steps;
2. APGD-T: APGD on the targeted DLR loss toward each of the 9 classes ranked
   highest after the true one, 100 steps each;
3. FAB-T: the minimal-distortion FAB attack toward the same 9 classes;
4. Square: the score-based black-box random search, 5,000 queries.

An example counts as robust only if none of them breaks it. "plus" adds
restarts, APGD-DLR and untargeted FAB; "rand" is for randomised models
(APGD-CE and APGD-DLR with gradients averaged over 20 forward passes).

Alongside, the flags of AutoAttack's own checks and of Carlini et al. 2019's
checklist ("On evaluating adversarial robustness"), printed loudly: softmax
outputs, zero gradients, a randomised forward pass, the black-box Square
breaking examples the white-box attacks could not (gradient masking), and
accuracy that does not reach 0 at a large budget.

    >>> res = autoattack(model, x, y, norm="inf", eps=0.3)
    >>> res.robust_accuracy, res.per_attack, res.flags
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks.apgd import APGD, APGDT
from tfadv.attacks.base import call_model
from tfadv.attacks.fab import FAB, FABT
from tfadv.attacks.square import Square
from tfadv.files import read_json_or_empty, write_json
from tfadv.evaluation.checks import (GradientMaskingWarning, outputs_look_like_probabilities,
                                     zero_gradient_fraction)
from tfadv.evaluation.robustness import (_check_label_range, _check_xy, _still_correct,
                                         attack_batches)
from tfadv.ops import norms

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
# AutoAttack's published settings.
STEPS = 100
NUM_TARGETS = 9
SQUARE_QUERIES = 5000
PLUS_RESTARTS = 5
RAND_EOT_ITER = 20
# An example moved further than eps by more than this (input units) is a bug, not a result.
EPS_TOLERANCE = 1e-5


def autoattack_suite(norm="inf", eps=0.3, version="standard", *, num_classes=None, seed=0,
                     bounds=(0.0, 1.0), steps=STEPS, queries=SQUARE_QUERIES,
                     num_targets=NUM_TARGETS) -> dict:
    """AutoAttack's attacks for a version: `{name: [runs]}`, in the order they run.

    Each run is an Attack; the runs of one name (APGD-T's targets, the
    restarts of "plus") run one after the other on the examples still
    standing.

    Args:
        norm: "inf" or "2"; eps: the budget (input units).
        version: "standard", "plus" or "rand".
        num_classes: C, when known: the targeted attacks try min(num_targets,
            C - 1) classes.
        seed: seed of FAB's and Square's random draws.
        bounds: valid input range.
        steps, queries, num_targets: AutoAttack's 100, 5,000 and 9 by default.

    Raises:
        ValueError: an unknown version or norm, a negative eps.
    """
    if version not in VERSIONS:
        raise ValueError(f"Expected version in {sorted(VERSIONS)}. Received: version={version!r}")
    norm = norms.canonical_norm(norm)
    restarts = PLUS_RESTARTS if version == "plus" else 1
    eot = RAND_EOT_ITER if version == "rand" else 1
    k = num_targets if num_classes is None else max(1, min(num_targets, int(num_classes) - 1))
    common = dict(eps=eps, norm=norm, bounds=bounds)
    suite = {}
    for name in VERSIONS[version]:
        if name == "apgd-ce":
            runs = [APGD(steps=steps, objective="ce", eot_iter=eot, **common)] * restarts
        elif name == "apgd-dlr":
            runs = [APGD(steps=steps, objective="dlr", eot_iter=eot, **common)] * restarts
        elif name == "apgd-t":
            runs = [APGDT(steps=steps, target_ranks=(r,), **common) for r in range(1, k + 1)]
        elif name == "fab":
            runs = [FAB(steps=steps, restarts=restarts, seed=seed, **common)]
        elif name == "fab-t":
            runs = [FABT(steps=steps, num_targets=k, seed=seed, **common)]
        else:
            runs = [Square(queries=queries, seed=seed, **common)]
        suite[name] = runs
    return suite


@dataclasses.dataclass
class AutoAttackResult:
    """What `autoattack` measured.

    Attributes:
        version, norm, eps: the threat model and the AutoAttack version.
        n: examples evaluated.
        clean_accuracy: fraction classified correctly without attack.
        robust_accuracy: AutoAttack robust accuracy: correct clean and under
            every attack of the cascade.
        per_attack: name -> robust accuracy after that attack and every
            earlier one (non-increasing; the last is `robust_accuracy`).
        seconds: name -> wall time of that attack.
        attacked: name -> examples that attack ran on (summed over its runs).
        max_perturbation: the largest norm of x_adv - x over the examples
            broken (input units); never above eps.
        square_queries: median queries Square needed on the examples it
            broke (None when it broke none or did not run).
        flags: problems found by the checks (empty when none), each a
            sentence saying what it means and what to do.
        checks: the measurements behind the flags.
        broken_by: per example, "clean" (misclassified without attack), the
            name of the attack that broke it, or "" (robust). str array [N].
        x_adv: per example the adversarial that broke it (x where none).
    """

    version: str
    norm: str
    eps: float
    n: int
    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict
    seconds: dict
    attacked: dict
    max_perturbation: float
    square_queries: float | None
    flags: list
    checks: dict
    broken_by: np.ndarray = dataclasses.field(repr=False, default=None)
    x_adv: np.ndarray = dataclasses.field(repr=False, default=None)

    @property
    def correct(self) -> np.ndarray:
        """Per-example robustness (bool [N])."""
        return self.broken_by == ""

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("broken_by", "x_adv")}
        out["broken_by"] = [str(b) for b in self.broken_by]
        return out


def _perturbation_norms(x_adv, x, norm):
    """Per-example norm of x_adv - x (float64 NumPy [N])."""
    d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
    return norms.lp_norm(tf.constant(d), norm).numpy()


def _run(model, attack, x, y, batch_size, progress, desc):
    """x_adv and, for a black-box search, its per-example query counts."""
    if attack.black_box:  # Square: a NumPy search over any callable, with query counts
        res = attack.run(model, x, y, progress=desc if progress else False)
        return np.asarray(res.x_adv, np.float32), np.asarray(res.queries)
    return attack_batches(model, attack, x, y, batch_size=batch_size, progress=progress,
                          desc=desc), None


def autoattack(model, x, y, *, norm="inf", eps, version="standard", n=None, seed=0,
               bounds=(0.0, 1.0), batch_size=500, checks=True, large_eps=None,
               progress=False, suite=None) -> AutoAttackResult:
    """Clean and AutoAttack robust accuracy of a classifier, with the flags.

    Args:
        model: callable mapping x [N, ...] to logits [N, C] (a Keras model).
        x: inputs, float [N, ...] in `bounds`; y: int labels [N] (label contract).
        norm: "inf" or "2"; eps: the budget in input units (MNIST Linf: 0.3).
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus" or "rand".
        n: evaluate only the first n examples, in the order given (so other
            tools can attack the same examples).
        seed: seeds Python, NumPy and TensorFlow's global generators
            (`keras.utils.set_random_seed`, as AutoAttack seeds torch) and
            FAB's and Square's own draws: the same seed gives the same result.
        bounds: valid input range.
        batch_size: examples per compiled attack call.
        checks: run the flag checks (see the module docstring); each problem
            is also raised as a `GradientMaskingWarning`.
        large_eps: budget of the "accuracy must reach 0" check (default:
            half the input range for Linf, and for L2 that Linf budget's
            L2 norm over the whole input).
        progress: a progress bar per attack.
        suite: instead of `autoattack_suite(...)`, `{name: [Attack, ...]}`.

    Returns:
        An `AutoAttackResult`.

    Raises:
        ValueError: bad x, y, version, norm or eps; x outside the bounds.
    """
    norm = norms.canonical_norm(norm)
    if not (isinstance(eps, (int, float)) and np.isfinite(eps) and eps > 0):
        raise ValueError(f"Expected eps to be a positive number. Received: eps={eps!r}")
    if n is not None:
        if int(n) < 1:
            raise ValueError(f"Expected n >= 1. Received: n={n!r}")
        x, y = x[: int(n)], y[: int(n)]
    keras.utils.set_random_seed(int(seed))
    x, y = _check_xy(x, y)
    if suite is None:
        # The bounds check (with its message) is the attacks' own, before any model call.
        APGD(eps=float(eps), norm=norm, bounds=bounds).check_bounds(x)
    num_classes = _check_label_range(model, x, y)
    if suite is None:
        suite = autoattack_suite(norm, float(eps), version, num_classes=num_classes, seed=seed,
                                 bounds=bounds)
    x, y = _check_xy(x, y, [runs[0] for runs in suite.values() if runs])
    clean = _still_correct(model, x, y, batch_size)
    broken_by = np.where(clean, "", "clean").astype(object)
    x_adv = x.copy()
    per_attack, seconds, attacked, queries = {}, {}, {}, []
    for name, runs in suite.items():
        start = time.perf_counter()
        attacked[name] = 0
        for i, attack in enumerate(runs):
            idx = np.flatnonzero(broken_by == "")
            if not len(idx):
                break
            attacked[name] += len(idx)
            desc = name if len(runs) == 1 else f"{name} {i + 1}/{len(runs)}"
            adv, used = _run(model, attack, x[idx], y[idx], batch_size, progress, desc)
            # Only what lies inside the threat model counts.
            inside = _perturbation_norms(adv, x[idx], norm) <= eps + EPS_TOLERANCE
            if bounds is not None:
                flat = adv.reshape(len(adv), -1)
                inside &= (flat.min(axis=1) >= bounds[0]) & (flat.max(axis=1) <= bounds[1])
            now_broken = ~_still_correct(model, adv, y[idx], batch_size) & inside
            broken_by[idx[now_broken]] = name
            x_adv[idx[now_broken]] = adv[now_broken]
            if used is not None:
                queries += list(np.asarray(used)[now_broken])
        seconds[name] = round(time.perf_counter() - start, 3)
        per_attack[name] = float(np.mean(broken_by == ""))
    broken = (broken_by != "") & (broken_by != "clean")
    result = AutoAttackResult(
        version=version, norm=norm, eps=float(eps), n=int(len(y)),
        clean_accuracy=float(clean.mean()), robust_accuracy=float(np.mean(broken_by == "")),
        per_attack=per_attack, seconds=seconds, attacked=attacked,
        max_perturbation=float(_perturbation_norms(x_adv[broken], x[broken], norm).max())
        if broken.any() else 0.0,
        square_queries=float(np.median(queries)) if queries else None,
        flags=[], checks={}, broken_by=broken_by.astype(str), x_adv=x_adv)
    if checks:
        flags, measured = autoattack_flags(model, x, y, result, bounds=bounds,
                                           large_eps=large_eps, batch_size=batch_size)
        result.flags, result.checks = flags, measured
        for flag in flags:
            warnings.warn(flag, GradientMaskingWarning, stacklevel=2)
    return result


def autoattack_flags(model, x, y, result: AutoAttackResult, *, bounds=(0.0, 1.0),
                     large_eps=None, batch_size=500, sample=200):
    """AutoAttack's checks and Carlini et al.'s checklist on a finished run.

    Returns:
        (flags: list of sentences, measurements: dict).
    """
    flags, m = [], {}
    xs, ys = x[:sample], y[:sample]
    out = np.asarray(call_model(model, tf.constant(xs)), np.float64)
    m["outputs_look_like_probabilities"] = outputs_look_like_probabilities(out)
    if m["outputs_look_like_probabilities"]:
        flags.append("The model outputs look like probabilities (rows in [0, 1] summing to 1): "
                     "attack the logits (remove the final softmax), or the gradient attacks "
                     "of the cascade are weakened by a saturated softmax.")
    again = np.asarray(call_model(model, tf.constant(xs)), np.float64)
    m["randomised_forward_pass"] = bool(not np.array_equal(out, again))
    if m["randomised_forward_pass"] and result.version != "rand":
        flags.append("Two forward passes on the same inputs gave different outputs: the model "
                     "is randomised. Evaluate it with version='rand' (gradients averaged over "
                     f"{RAND_EOT_ITER} passes, EOT).")
    zero = zero_gradient_fraction(model, xs, ys)
    m["fraction_zero_gradients"] = zero
    if zero > 0:
        flags.append(f"{zero:.1%} of the first {len(xs)} examples have exactly zero input "
                     "gradients: the gradient attacks cannot move them, and their robustness "
                     "rests on the black-box Square alone (suspect gradient masking).")
    by_square = int(np.sum(result.broken_by == "square"))
    m["broken_by_square"] = by_square
    if by_square:
        flags.append(f"Square, a black-box attack, broke {by_square} examples that APGD and FAB "
                     "could not: the white-box gradients are likely masked, and a "
                     "gradient-based evaluation alone would overstate robustness.")
    if large_eps is None:
        if bounds is None:
            large_eps = 10 * result.eps
        else:
            large_eps = 0.5 * (bounds[1] - bounds[0])
            if result.norm == "2":
                large_eps *= float(np.sqrt(np.prod(x.shape[1:])))
    big = APGD(eps=float(large_eps), steps=20, norm=result.norm, bounds=bounds)
    adv = attack_batches(model, big, xs, ys, batch_size=batch_size)
    acc = float(_still_correct(model, adv, ys, batch_size).mean())
    m["large_eps"], m["large_eps_accuracy"] = float(large_eps), acc
    if acc > 0.1:
        flags.append(f"Accuracy stays at {acc:.3f} under APGD at eps={large_eps:g}, a budget "
                     "that should break any classifier: gradients are likely masked.")
    return flags, m


ATTACKED_NOTE = ("attacked: the examples each run of an attack started on, summed over its "
                 "runs; APGD-T runs once per target class, so its count can exceed the "
                 "examples")


def summary_lines(result: AutoAttackResult) -> list:
    """The printed report: accuracies per attack, times, and the flags, loudly."""
    lines = [f"AutoAttack ({result.version}, L{result.norm}, eps={result.eps:g}) on "
             f"{result.n} examples",
             f"  clean accuracy       {result.clean_accuracy:.4f}"]
    for name, acc in result.per_attack.items():
        lines.append(f"  after {name:<14} {acc:.4f}   ({result.attacked[name]} attacked, "
                     f"{result.seconds[name]:.1f} s)")
    lines.append(f"  robust accuracy      {result.robust_accuracy:.4f}   (AutoAttack)")
    if any(v > result.n for v in result.attacked.values()):
        lines.append(f"  ({ATTACKED_NOTE})")
    if result.square_queries is not None:
        lines.append(f"  Square median queries on its successes: {result.square_queries:g}")
    if result.flags:
        lines.append("")
        lines.append("!" * 72)
        lines.append(f"!! {len(result.flags)} FLAG(S): this evaluation may overstate robustness")
        for flag in result.flags:
            lines.append(f"!! - {flag}")
        lines.append("!" * 72)
    return lines


def markdown_table(result: AutoAttackResult) -> str:
    """A Markdown table of the cascade, for reports."""
    rows = ["| stage | robust accuracy | attacked | seconds |", "|---|---:|---:|---:|",
            f"| clean | {result.clean_accuracy:.4f} | {result.n} | |"]
    for name, acc in result.per_attack.items():
        rows.append(f"| {name} | {acc:.4f} | {result.attacked[name]} | "
                    f"{result.seconds[name]:.1f} |")
    rows.append(f"| **AutoAttack ({result.version})** | **{result.robust_accuracy:.4f}** | | |")
    text = "\n".join(rows) + "\n"
    if any(v > result.n for v in result.attacked.values()):
        text += f"\n{ATTACKED_NOTE[0].upper()}{ATTACKED_NOTE[1:]}.\n"
    if result.flags:
        text += "\n" + "\n".join(f"- **Flag:** {f}" for f in result.flags) + "\n"
    return text


def result_from_dict(data: dict) -> AutoAttackResult:
    """An `AutoAttackResult` from its `to_dict()` (x_adv is not kept there: None)."""
    fields = {f.name for f in dataclasses.fields(AutoAttackResult)} - {"broken_by", "x_adv"}
    return AutoAttackResult(**{k: data[k] for k in fields},
                            broken_by=np.asarray(data["broken_by"], dtype=str))


def merge(results, starts=None) -> AutoAttackResult:
    """One result from the results of consecutive chunks of one split, in order.

    Accuracies, per-attack accuracies, times, attacked counts and the largest
    perturbation are exact; `square_queries` is the median of the chunks'
    medians; flags are kept per chunk, prefixed by the chunk's examples.

    Args:
        results: `AutoAttackResult`s of one threat model and version.
        starts: the index of each chunk's first example (for the flags).

    Raises:
        ValueError: no results, or results of different threat models.
    """
    results = list(results)
    if not results:
        raise ValueError("Expected at least one result to merge.")
    first = results[0]
    model = (first.version, first.norm, first.eps, list(first.per_attack))
    for r in results:
        if (r.version, r.norm, r.eps, list(r.per_attack)) != model:
            raise ValueError("Expected chunks of one AutoAttack run (same version, norm, eps "
                             "and attacks).")
    starts = list(starts) if starts is not None else list(
        np.cumsum([0] + [r.n for r in results[:-1]]))
    broken_by = np.concatenate([r.broken_by for r in results]).astype(str)
    per_attack, gone = {}, broken_by == "clean"
    for name in first.per_attack:
        gone = gone | (broken_by == name)
        per_attack[name] = float(1.0 - gone.mean())
    queries = [r.square_queries for r in results if r.square_queries is not None]
    flags = [f"examples {s}-{s + r.n - 1}: {flag}" for s, r in zip(starts, results)
             for flag in r.flags]
    return AutoAttackResult(
        version=first.version, norm=first.norm, eps=first.eps, n=int(len(broken_by)),
        clean_accuracy=float(np.mean(broken_by != "clean")),
        robust_accuracy=float(np.mean(broken_by == "")), per_attack=per_attack,
        seconds={k: round(sum(r.seconds.get(k, 0.0) for r in results), 3)
                 for k in first.seconds},
        attacked={k: int(sum(r.attacked.get(k, 0) for r in results)) for k in first.attacked},
        max_perturbation=max(r.max_perturbation for r in results),
        square_queries=float(np.median(queries)) if queries else None, flags=flags,
        checks={f"examples {s}-{s + r.n - 1}": r.checks for s, r in zip(starts, results)},
        broken_by=broken_by, x_adv=None)


def autoattack_in_chunks(model, x, y, *, chunk, state_dir=None, key=None, progress=False,
                         **kwargs) -> AutoAttackResult:
    """`autoattack` on consecutive chunks of `chunk` examples, merged (`merge`).

    With `state_dir` each finished chunk is kept there
    (`digits_LO_HI.json`) and reused by a later call with the same `key`
    (e.g. the model file's hash and the settings): a killed evaluation of a
    large split resumes at the chunk it was in. An unreadable chunk is redone.

    Args:
        model, x, y: as `autoattack` (`n` is applied before chunking).
        chunk: examples per chunk.
        state_dir: directory for finished chunks, or None.
        key: JSON-compatible identity of the run; chunks saved under another
            key are redone.
        progress: print a line per chunk (and the attacks' bars).
        **kwargs: `autoattack` settings (norm, eps, version, seed, ...).

    Raises:
        ValueError: chunk < 1, and as `autoattack`.
    """
    if int(chunk) < 1:
        raise ValueError(f"Expected chunk >= 1. Received: chunk={chunk!r}")
    n = kwargs.pop("n", None)
    if n is not None:
        x, y = x[: int(n)], y[: int(n)]
    if state_dir:
        os.makedirs(state_dir, exist_ok=True)
    results, starts = [], list(range(0, len(y), int(chunk)))
    for lo in starts:
        hi = min(lo + int(chunk), len(y))
        path = state_dir and os.path.join(state_dir, f"digits_{lo:05d}_{hi:05d}.json")
        saved = read_json_or_empty(path)
        reused = _saved_chunk(saved, key, lo, hi)
        if reused is not None:
            if progress:
                print(f"examples {lo}-{hi - 1} of {len(y)}: reused {path}", flush=True)
            results.append(reused)
            continue
        if progress:
            print(f"examples {lo}-{hi - 1} of {len(y)}", flush=True)
        if saved or (path and os.path.exists(path)):
            # Never silently: the file is replaced by this run's result.
            if saved.get("key", key) != key:
                why = "was made with another model or other settings"
            elif saved.get("examples", [lo, hi]) != [lo, hi]:
                why = f"holds other examples ({saved['examples']})"
            else:
                why = "is unreadable or incomplete"
            warnings.warn(f"{path} {why}; attacking examples {lo}-{hi - 1} again and replacing "
                          "it.", UserWarning, stacklevel=2)
        result = autoattack(model, x[lo:hi], y[lo:hi], progress=progress, **kwargs)
        if path:
            write_json(path, {"key": key, "examples": [lo, hi], "result": result.to_dict()})
        results.append(result)
    return merge(results, starts)


def _saved_chunk(saved, key, lo, hi):
    """The saved result of examples lo..hi-1 under `key`, or None (then it is redone):
    another key, other examples, or a file with fields missing or of the wrong kind.
    (Files written before the range was recorded are checked by their size only.)"""
    if saved.get("key") != key or saved.get("examples", [lo, hi]) != [lo, hi]:
        return None
    try:
        result = result_from_dict(saved["result"])
    except (KeyError, TypeError, ValueError):
        return None
    return result if result.n == hi - lo == len(result.broken_by) else None
