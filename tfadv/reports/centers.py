"""The centres study's report: Markdown, figures and the statements the numbers allow.

Everything here is a view of a `tfadv.evaluation.centers.CentersStudyResult`,
or of its `to_dict()` form (a `results.json`, re-rendered at any time; the
figures need the test features and labels, which only the result object
holds). The study's question, whether inverse adversaries can replace the
learned centres of center loss, is answered by `verdict` under the
thresholds below, each stated in the report next to the evidence it is
applied to. A setting too small to decide answers "undecided".
"""

from __future__ import annotations

import math
import os

import numpy as np

from tfadv.config.centers import MODELS
from tfadv.evaluation.centers import CentersStudyResult, cosine_matrix

# Clean accuracy below which a model has not learned (chance is 0.10 for ten
# digits): its centres and robust accuracy say nothing.
CHANCE = 0.2
# Clean accuracy below which a LeNets++ on MNIST has not converged: the full
# setting's models A-C reach 0.92-0.95 (reports/centers); comparing the
# centres of models still far from that says nothing about the question.
CONVERGED = 0.9
# Model C loses no measurable clean accuracy against A when the drop is under
# this (one point) ...
ACCURACY_TOLERANCE = 0.01
# ... or under this many standard errors of the difference.
NOISE_SES = 2.0
# C's compactness (variance / separation^2) may be at most this multiple of A's.
COMPACTNESS_RATIO = 1.25
# A robust-accuracy gap above this between the cross-entropy attacks and the
# worst case is reported as gradient masking.
MASKING_GAP = 0.05

# How the report names the robust-accuracy attacks of `ROBUST_ATTACKS`.
_ATTACK_NAMES = {"pgd_ce": "PGD-{steps} (CE)", "apgd_ce": "APGD-CE", "apgd_dlr": "APGD-DLR",
                 "pgd_margin": "PGD (margin loss)"}


def _result(study) -> CentersStudyResult:
    return study if isinstance(study, CentersStudyResult) else CentersStudyResult.from_dict(study)


def accuracy_se(acc, n) -> float:
    """Standard error of an accuracy measured on n examples."""
    return float(np.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1)))


def _a_vs_c(a, c, n) -> dict:
    """The evidence and the rule's parts for Model C against Model A."""
    se_a, se_c = accuracy_se(a.clean_accuracy, n), accuracy_se(c.clean_accuracy, n)
    dacc = c.clean_accuracy - a.clean_accuracy
    noise = NOISE_SES * math.hypot(se_a, se_c)
    ratio = c.variance_to_separation / max(a.variance_to_separation, 1e-12)
    return dict(se_a=se_a, se_c=se_c, dacc=dacc, noise=noise, ratio=ratio,
                within_noise=abs(dacc) < noise,
                acc_ok=dacc >= -ACCURACY_TOLERANCE or abs(dacc) < noise,
                compact_ok=ratio <= COMPACTNESS_RATIO)


def _answer(models, n, failed) -> list[str]:
    if "A" not in models or "C" not in models:
        return [f"Answer: none: the question compares models A and C; this run has "
                f"{', '.join(models) or 'no model'}."]
    a, c = models["A"], models["C"]
    e = _a_vs_c(a, c, n)
    lines = [
        f"Model C (inverse centres in the loss) vs Model A (learned centres): clean accuracy "
        f"{c.clean_accuracy:.3f} ± {e['se_c']:.3f} vs {a.clean_accuracy:.3f} ± {e['se_a']:.3f} "
        f"(± one standard error on {n} test digits), variance/separation "
        f"{c.variance_to_separation:.4f} vs {a.variance_to_separation:.4f} ({e['ratio']:.2f}x), "
        f"robust accuracy {c.robust_accuracy:.3f} vs {a.robust_accuracy:.3f}.",
        f"The rule: C can replace A's learned centres if both reached {CONVERGED:.2f} clean "
        f"accuracy, C loses no measurable clean accuracy (C - A not below "
        f"-{ACCURACY_TOLERANCE:.2f}, or within {NOISE_SES:g} standard errors of the difference; "
        f"here C - A = {e['dacc']:+.3f} and {NOISE_SES:g} standard errors are {e['noise']:.3f}) "
        f"and C's variance/separation is at most {COMPACTNESS_RATIO:.2f}x A's "
        f"({e['ratio']:.2f}x here).",
    ]
    if e["within_noise"]:
        lines.append(f"The accuracy difference ({e['dacc']:+.3f}) is within noise: "
                     f"{NOISE_SES:g} standard errors of it on {n} test digits are "
                     f"{e['noise']:.3f}.")
    undertrained = [m for m in ("A", "C") if models[m].clean_accuracy < CONVERGED]
    if "A" in failed or "C" in failed:
        lines.append("Answer: none: Model A or C did not learn in this setting.")
    elif undertrained:
        lines.append(
            "Answer: undecided: this setting is too small to decide. Model(s) "
            + ", ".join(f"{m} ({models[m].clean_accuracy:.3f} clean)" for m in undertrained)
            + f" stopped below {CONVERGED:.2f} clean accuracy, where the full setting's "
            "softmax models reach 0.92-0.95; compare centres of converged models (run "
            "the full setting).")
    elif e["acc_ok"] and e["compact_ok"]:
        lines.append(
            f"Answer: on this evidence inverse adversaries CAN replace the learned centres "
            f"(clean accuracy {e['dacc']:+.3f}: no measurable loss; compactness "
            f"{e['ratio']:.2f}x A's, within {COMPACTNESS_RATIO:.2f}x).")
    else:
        reasons = []
        if not e["acc_ok"]:
            reasons.append(f"accuracy measurably lower: {e['dacc']:+.3f}, beyond both the "
                           f"{ACCURACY_TOLERANCE:.2f} tolerance and {NOISE_SES:g} standard "
                           f"errors, {e['noise']:.3f}")
        if not e["compact_ok"]:
            reasons.append(f"compactness {e['ratio']:.2f}x A's, above {COMPACTNESS_RATIO:.2f}x")
        lines.append("Answer: on this evidence inverse adversaries can NOT simply replace the "
                     "learned centres (" + "; ".join(reasons) + ").")
    return lines


def _autoattack_note(r) -> str:
    """"AutoAttack X; " before the comparison with A, when AutoAttack was run."""
    if not r.autoattack:
        return ""
    return f"AutoAttack {r.autoattack['robust_accuracy']:.3f}; "


def _closer(il, cl) -> str:
    return "closer to" if il["mse_mean"] < cl["mse_mean"] else "no closer to"


def verdict(study) -> list[str]:
    """Statements that follow from the measured numbers (nothing else), thresholds stated.

    Args:
        study: a `CentersStudyResult` or its `to_dict()` form.
    """
    study = _result(study)
    models, n = study.models, int(study.examples["test"])
    lines = []
    failed = [m for m, r in models.items() if r.clean_accuracy < CHANCE]
    for m in failed:
        lines.append(
            f"Model {m} did not learn (clean accuracy {models[m].clean_accuracy:.3f}, below "
            f"{CHANCE:.2f}; chance is 0.10): its centres and robust accuracy say nothing; train "
            "longer or with a smaller budget before reading them.")
    if "A" in models:
        comp = models["A"].comparisons
        il, ic, cl = (comp.get(p) for p in ("inverse vs learned", "inverse vs clean",
                                            "clean vs learned"))
        if il and ic and cl:
            lines.append(
                f"In Model A, inverse-adversary centres point where the learned centres do "
                f"(mean cosine {il['cosine_mean']:.3f}, MSE {il['mse_mean']:.4g}); but so do "
                f"the plain clean centres (clean vs learned: cosine {cl['cosine_mean']:.3f}, "
                f"MSE {cl['mse_mean']:.4g}), and inverse vs clean is {ic['cosine_mean']:.3f}.")
            lines.append(
                f"Inverse-adversary centres are {_closer(il, cl)} the learned centres than the "
                f"clean centres are (MSE {il['mse_mean']:.4g} vs {cl['mse_mean']:.4g}).")
    lines += _answer(models, n, failed)
    for m, r in models.items():
        ce = r.robust_after.get("apgd_ce")
        if ce is not None and ce - r.robust_accuracy > MASKING_GAP:
            lines.append(
                f"Model {m}: the cross-entropy attacks (PGD, APGD-CE) leave {ce:.3f} robust "
                f"accuracy, the DLR and margin attacks then {r.robust_accuracy:.3f} (a gap above "
                f"{MASKING_GAP:.2f}): its saturated softmax hides the CE gradient (gradient "
                "masking), so CE attacks alone overstate its robustness.")
    if "D" in models and "A" in models and "D" not in failed:
        a, d = models["A"], models["D"]
        lines.append(
            f"Model D (PGD + center loss) buys robust accuracy {d.robust_accuracy:.3f} "
            f"({_autoattack_note(d)}A: {a.robust_accuracy:.3f}) at clean accuracy "
            f"{d.clean_accuracy:.3f} "
            f"(A: {a.clean_accuracy:.3f}); variance/separation {d.variance_to_separation:.4f}"
            f" (A: {a.variance_to_separation:.4f}).")
        il, cl = d.comparisons.get("inverse vs learned"), d.comparisons.get("clean vs learned")
        if il and cl:
            lines.append(
                f"In Model D too, the inverse-adversary centres are {_closer(il, cl)} the "
                f"learned centres than the clean centres are (MSE {il['mse_mean']:.4g} vs "
                f"{cl['mse_mean']:.4g}).")
    return lines


def _attack_list(cfg, names) -> str:
    labels = [_ATTACK_NAMES.get(a, a).format(steps=cfg.robust_steps) for a in names]
    return ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else "".join(labels)


def markdown(study) -> str:
    """The report: settings, tables of every measurement, the statements and the figures.

    Args:
        study: a `CentersStudyResult` or its `to_dict()` form.
    """
    study = _result(study)
    cfg, models = study.config, study.models
    names = list(next(iter(models.values())).robust_after) if models else []
    names = [a for a in names if all(a in r.robust_after for r in models.values())]
    lines = ["# Inverse-adversary centres vs center-loss centres: results", ""]
    lines += [f"Data: MNIST `{cfg.data}` (train {study.examples['train']}, test "
              f"{study.examples['test']}); architecture `{cfg.arch}`, {cfg.feature_dim}-d "
              f"features; {cfg.epochs} epochs of SGD (Nesterov {cfg.momentum}, weight decay "
              f"{cfg.weight_decay}, {cfg.lr_mode} LR, max {cfg.max_lr}); center loss lambda "
              f"{cfg.center_weight}, alpha {cfg.center_alpha}; InversePGD eps' "
              f"{cfg.inverse_eps:.4f}, {cfg.inverse_steps} steps of {cfg.inverse_step_size:.4f}. "
              f"Robust accuracy: worst case per test digit of {_attack_list(cfg, names)}, "
              f"{cfg.robust_steps} steps each, at Linf eps {cfg.robust_eps}.", ""]
    trained = {m: r.train_seconds for m, r in models.items() if r.train_seconds}
    if trained:
        lines += ["Training time (all epochs, also those of a killed and resumed run): "
                  + ", ".join(f"{m} {t / 60:.0f} min" for m, t in trained.items())
                  + f". This report was written in {study.seconds:.0f} s (models finished by an "
                  "earlier run are loaded from `models_done/`, not retrained).", ""]
    if "D" in models:
        on = "clean and adversarial" if cfg.adv_center_on == "both" else cfg.adv_center_on
        lines += [f"Model D trains on PGD-{cfg.adv_steps} adversarial examples (Linf eps "
                  f"{cfg.adv_eps}, step {cfg.adv_step_size}, random start) with center loss on "
                  f"{on} features; the budget is 0 for the first {cfg.adv_clean_epochs:g} "
                  f"epochs, then ramps linearly to eps over {cfg.adv_warmup_epochs:g} epochs.", ""]
    lines += ["## Models", "", "| model | training | clean acc | robust acc (worst) | "
              "intra-class var | mean centre distance | var / dist^2 |",
              "|---|---|---|---|---|---|---|"]
    for m, r in models.items():
        lines.append(f"| {m} | {MODELS[m]} | {r.clean_accuracy:.3f} | {r.robust_accuracy:.3f}"
                     f" | {r.intra_class_variance:.4g} | {r.inter_class_separation['mean']:.4g}"
                     f" | {r.variance_to_separation:.4f} |")
    if names:
        lines += ["", f"Robust accuracy left after each attack and every earlier one (eps "
                  f"{cfg.robust_eps}, {cfg.robust_steps} steps; each attack runs on the digits "
                  "the earlier ones did not break):", "",
                  "| model | clean | " + " | + ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for m, r in models.items():
            lines.append(f"| {m} | {r.clean_accuracy:.3f} | "
                         + " | ".join(f"{r.robust_after[a]:.3f}" for a in names) + " |")
    attacked = {m: r.autoattack for m, r in models.items() if r.autoattack}
    if attacked:
        stages = list(next(iter(attacked.values()))["per_attack"])
        lines += ["", f"AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; Croce & Hein "
                  f"2020) at Linf eps {cfg.robust_eps}, robust accuracy after each attack:", "",
                  "| model | clean | " + " | + ".join(stages) + " | seconds |",
                  "|---|---|" + "---|" * len(stages) + "---|"]
        for m, a in attacked.items():
            lines.append(f"| {m} | {a['clean_accuracy']:.3f} | "
                         + " | ".join(f"{a['per_attack'].get(s, float('nan')):.3f}"
                                      for s in stages)
                         + f" | {sum(a['seconds'].values()):.0f} |")
        flags = [f"- Flag (model {m}): {f}" for m, a in attacked.items() for f in a["flags"]]
        lines += [""] + flags if flags else []
    lines.append("")
    for m, r in models.items():
        lines += [f"## Model {m}: centre comparisons (mean ± std over classes)", "",
                  "| pair | cosine | MSE |", "|---|---|---|"]
        for pair, v in r.comparisons.items():
            lines.append(f"| {pair} | {v['cosine_mean']:.3f} ± {v['cosine_std']:.3f} | "
                         f"{v['mse_mean']:.4g} ± {v['mse_std']:.2g} |")
        lines.append("")
    lines += ["## What the numbers say", ""] + [f"- {s}" for s in verdict(study)] + [""]
    lines += ["## Figures", ""] + [f"![{k}]({os.path.basename(p)})"
                                   for k, p in study.figures.items()]
    return "\n".join(lines) + "\n"


def _feature_panel(ax, name, features, labels, kinds):
    proj = None
    if features.shape[1] > 2:  # PCA to the plane for the drawing only
        mu = features.mean(0)
        _, _, vt = np.linalg.svd(features - mu, full_matrices=False)
        proj = lambda v, mu=mu, vt=vt: (np.asarray(v) - mu) @ vt[:2].T  # noqa: E731
    p = proj or (lambda v: np.asarray(v))
    pts = p(features)
    ax.scatter(pts[:, 0], pts[:, 1], c=labels, cmap="tab10", s=4, alpha=0.5)
    markers = {"clean": "o", "inverse": "*", "uiat": "P", "learned": "X", "weights": "^"}
    for kind, vec in kinds.items():
        v = p(vec)
        if kind == "weights":  # directions: scale to the feature cloud
            v = v * np.abs(pts).max() / max(np.abs(v).max(), 1e-12)
        ax.scatter(v[:, 0], v[:, 1], marker=markers.get(kind, "s"), s=90, edgecolors="k",
                   c=np.arange(len(v)), cmap="tab10", label=kind)
    ax.set_title(f"Model {name}: {MODELS[name]}", fontsize=8)
    ax.legend(fontsize=6, loc="best")


def write_figures(study, out) -> dict:
    """Draws the test features with every kind of centre, and the cosine heatmaps.

    Returns:
        {"features": path, "cosine_heatmaps": path} (PNGs in `out`).
    """
    # A Figure without pyplot: no global backend switch, safe inside notebooks. Imported
    # here: matplotlib is heavy and only drawing needs it.
    from matplotlib.figure import Figure

    names = list(study.models)
    fig = Figure(figsize=(4.2 * len(names), 4), dpi=110)
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
        _feature_panel(ax, name, study.features[name], study.labels, study.models[name].centers)
    fig.tight_layout()
    paths = {"features": os.path.join(out, "features.png")}
    fig.savefig(paths["features"])

    pairs = [("inverse", "learned"), ("inverse", "clean"), ("inverse", "weights")]
    kinds = {n: study.models[n].centers for n in names}
    rows = [(n, a, b) for n in names for a, b in pairs if a in kinds[n] and b in kinds[n]]
    fig = Figure(figsize=(2.6 * max(len(rows), 1), 2.8), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, max(len(rows), 1)))
    im = None
    for ax, (n, a, b) in zip(axes, rows):
        im = ax.imshow(cosine_matrix(kinds[n][a], kinds[n][b]), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(f"{n}: {a} vs {b}", fontsize=7)
        ax.set_xlabel(b, fontsize=6)
        ax.set_ylabel(a, fontsize=6)
        ax.tick_params(labelsize=5)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.7)
    paths["cosine_heatmaps"] = os.path.join(out, "cosine_heatmaps.png")
    fig.savefig(paths["cosine_heatmaps"])
    return paths
