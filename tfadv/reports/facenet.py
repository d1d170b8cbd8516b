"""The robust-FaceNet report: Markdown table, success-vs-eps plots, sweep table.

Every function reads the JSON layout `tfadv.recipes.facenet.finetune` writes
to `metrics.json`: {"config", "identities", "held_out", "pretrained",
"finetuned", "train_seconds", "seconds", "figures"}, where "pretrained" and
"finetuned" are `tfadv.evaluation.faces.FaceEvaluation.to_dict()` results,
and optionally "endpoint_attack": {"pretrained"|"finetuned": [results of
`tfadv.serving.endpoint_attack.EndpointAttackResult.to_dict()`]} added by
`add_endpoint_attack` (`tfadv attack-endpoint --report DIR`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tfadv.files import write_json, write_text

MODELS = ("pretrained", "finetuned")
MODES = ("dodging", "impersonation")


def fmt(v) -> str:
    """A metric cell: 3 decimals, "n/a" for None or NaN."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.3f}"


def _get(m, *keys):
    """m[k0][k1]...; None where any level is missing."""
    try:
        for k in keys:
            m = m[k]
        return m
    except (KeyError, TypeError, IndexError):
        return None


def plot_curves(out, metrics) -> list[str]:
    """Writes `curve_<mode>.png` (success vs eps, pretrained and fine-tuned) into `out`.

    Returns:
        The file names written, one per mode.
    """
    paths = []
    for mode in MODES:
        fig = Figure(figsize=(5, 3.5), dpi=120)
        ax = fig.subplots()
        for label in MODELS:
            c = metrics[label]["curves"][mode]
            ax.plot(c["eps"], c["success"], marker="o", label=label)
        ax.set_xlabel("eps (Linf, pixels 0-255)")
        ax.set_ylabel(f"{mode} success (PGD)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{mode} at the model's threshold")
        path = Path(out) / f"curve_{mode}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path.name)
    return paths


def attack_list(ev) -> str:
    """The evaluation's attacks in words, from its config dict."""
    restarts = ev.get("restarts", 1) or 1
    again = f", best of {restarts} random starts" if restarts > 1 else ""
    step = f", step {ev['step_size']:g}" if ev.get("step_size") is not None else ""
    names = {"fgsm": "FGSM", "pgd": f"PGD-{ev['pgd_steps']} with random start{step}{again}",
             "apgd": f"APGD-{ev['apgd_steps']}{again}",
             "cw": f"C&W L2, unbounded ({ev['cw_search_steps']} x {ev['cw_iterations']})",
             "square": f"Square (black-box, {ev.get('square_queries', 1000)} queries)"}
    return ", ".join(names.get(a, a) for a in ev["attacks"])


def _rows(m, ev) -> list[str]:
    rows = []

    def row(label, *keys):
        cells = [fmt(_get(m, model, *keys)) for model in MODELS]
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")

    row("threshold (cosine)", "threshold")
    for g in ("all", "held_out"):
        if g not in m["pretrained"]["groups"]:
            continue
        gname = "all identities" if g == "all" else "held-out identities"
        row(f"NN identification, {gname}", "groups", g, "nn_accuracy")
        row(f"verification accuracy (10-fold), {gname}", "groups", g, "verification_accuracy")
        row(f"ROC AUC, {gname}", "groups", g, "auc")
        row(f"TAR@FAR=1e-2, {gname}", "groups", g, "tar@far=0.01")
        row(f"TAR@FAR=1e-3, {gname}", "groups", g, "tar@far=0.001")
    for mode in MODES:
        for a in ev["attacks"]:
            row(f"{mode} success, {a.upper()} eps {ev['eps']:g}", "attacks", mode, "all", a,
                "success")
        row(f"{mode} success, worst case of the Linf attacks", "attacks", mode, "all",
            "worst_case", "success")
        row(f"{mode} success, worst case, held-out identities", "attacks", mode, "held_out",
            "worst_case", "success")
    if "cw" in ev["attacks"]:
        row("C&W dodging median L2 (pixels)", "attacks", "dodging", "all", "cw", "median_l2")
    row("median minimal Linf eps, dodging (PGD search)", "min_eps_dodging", "median")
    return rows


def training_adversary(cfg) -> str:
    """How the fine-tuning adversaries were made, from a run's config dict."""
    method = cfg.get("method", "pgd")
    if method == "pgd":
        return f"PGD-{cfg['train_steps']}"
    names = {"fgsm_rs": "FGSM-RS", "n_fgsm": "N-FGSM", "free": "free"}
    from tfadv.trainers.fast import DEFAULTS

    step = cfg.get("fast_step") or DEFAULTS[method]["fast_step"]
    noise = cfg.get("fast_noise")
    noise = DEFAULTS[method]["fast_noise"] if noise is None else noise
    extra = f", {cfg.get('free_replays')} replays" if method == "free" else ""
    return f"{names[method]} (step {step:g} eps, noise {noise:g} eps{extra})"


def report_markdown(m) -> str:
    """The before/after Markdown report of a fine-tuning run's metrics dict."""
    cfg = m["config"]
    ev = cfg["evaluation"]
    held = ", ".join(m["held_out"]) or "none"
    lines = [
        "# Robust FaceNet: before and after adversarial fine-tuning", "",
        f"Preset `{cfg['preset']}`; faces `{cfg['faces'] or 'demo set (5 celebrities)'}`; "
        f"identities {', '.join(m['identities'])}; held out of fine-tuning: {held}.",
        f"Fine-tuning: {cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam "
        f"{cfg['learning_rate']:g}, {training_adversary(cfg)} eps {cfg['train_eps']:g} against "
        f"the {cfg['attack_on']}, adv weight {cfg['adv_weight']}, consistency "
        f"{cfg['consistency_weight']}, center loss {cfg['center_weight']}, distillation "
        f"{cfg['distill_weight']}, backbone trained from `{cfg['freeze_until']}` "
        f"({m.get('train_seconds', 0):.0f} s).",
        f"Attacks at eps {ev['eps']:g} (pixels, Linf): {attack_list(ev)}. "
        "Success is judged at each model's own threshold "
        "(chosen on gallery pairs of the fine-tuning identities). Dodging counts photos "
        "that matched their own identity clean; impersonation targets the next identity.",
        "", "| metric | pretrained | fine-tuned |", "|---|---|---|", *_rows(m, ev), "",
        f"Photos matched clean: pretrained {fmt(m['pretrained'].get('matched_clean'))}, "
        f"fine-tuned {fmt(m['finetuned'].get('matched_clean'))}.", "",
    ]
    lines += endpoint_section(m.get("endpoint_attack") or {})
    for fig in m.get("figures", []):
        lines.append(f"![{fig}]({fig})")
    lines += ["", f"Total time {m['seconds']:.0f} s on this machine.", ""]
    return "\n".join(lines)


# -- the black-box attack through the served endpoint ----------------------------

def _endpoint_key(r) -> tuple:
    return (r["mode"], r["norm"], float(r["eps"]), int(r["queries_budget"]))


def endpoint_section(results: dict) -> list[str]:
    """Markdown lines for `m["endpoint_attack"]`: one row group per setting
    (mode, norm, eps, query budget), a column per model; [] when empty."""
    keys = sorted({_endpoint_key(r) for rs in results.values() for r in rs})
    if not keys:
        return []
    lines = [
        "## Black-box attack through the served endpoint", "",
        "Square Attack (Andriushchenko et al., ECCV 2020; score-based: it reads only the "
        "embeddings the served model returns, no weights, no gradients) run by `tfadv "
        "attack-endpoint` over gRPC on the exported SavedModel. Dodging here means the "
        "cosine similarity of the attacked photo's embedding to the endpoint's embedding of "
        "the same clean photo falls below the threshold (the white-box rows above compare "
        "with the identity's gallery reference instead); impersonation, that the similarity "
        "to the target's embedding reaches it. The threshold is bracketed from the served "
        "`verify` signature unless it was given. Queries count the clean one; their median "
        "is over the faces attacked successfully. The similarity after the attack is that "
        "of the best input found to the reference (dodging: 1 = unchanged).", "",
        "| setting | metric | pretrained | fine-tuned |", "|---|---|---|---|"]
    for mode, norm, eps, budget in keys:
        cells = [next((r for r in results.get(model, []) if _endpoint_key(r) ==
                       (mode, norm, eps, budget)), None) for model in MODELS]
        setting = f"{mode}, {'Linf' if norm == 'inf' else 'L2'} eps {eps:g}, {budget} queries"

        def row(label, get):
            vals = ["n/a" if r is None else get(r) for r in cells]
            lines.append(f"| {setting} | {label} | {vals[0]} | {vals[1]} |")

        row("faces attacked", lambda r: str(r["n"]))
        row("threshold", lambda r: f"{r['threshold']:.3f} ({r['threshold_source']})")
        row("success", lambda r: f"{r['success_rate']:.3f} ({sum(r['success'])}/{r['n']})")
        row("median queries", lambda r: "n/a" if r["median_queries"] is None
            else f"{r['median_queries']:g}")
        row("median similarity after the attack",
            lambda r: f"{np.median(r['similarity']):.3f}" if r["n"] else "n/a")
        row("failed requests", lambda r: str(r["failed_requests"]))
        row("wall time (s)", lambda r: f"{r['seconds']:.0f}")
    return lines + [""]


def load_report_metrics(report_dir) -> tuple[Path, dict]:
    """(path, dict) of a FaceNet report's metrics.json.

    Raises:
        ValueError: no metrics.json in report_dir, or not a before/after report's.
    """
    path = Path(report_dir) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: --report takes the directory of a FaceNet report "
                         "(metrics.json and report.md, written by `tfadv facenet finetune`).")
    try:
        m = json.loads(path.read_text())
    except ValueError:
        m = None
    if not isinstance(m, dict) or "config" not in m or not all(k in m for k in MODELS):
        raise ValueError(f"{path} is not the metrics of a FaceNet before/after report "
                         "(`tfadv facenet finetune`).")
    try:
        report_markdown(m)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{path} is not the metrics of a FaceNet before/after report "
                         f"(`tfadv facenet finetune`): it cannot be rendered ({err!r}).") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{path.parent} is not writable: the report cannot be updated.")
    return path, m


def add_endpoint_attack(report_dir, model: str, result: dict) -> Path:
    """Adds an endpoint attack's result to a FaceNet report and re-renders it.

    Args:
        report_dir: directory with the `metrics.json` of `tfadv facenet finetune`.
        model: the report column, "pretrained" or "finetuned".
        result: `EndpointAttackResult.to_dict()`; it replaces an earlier result
            of the same column, mode, norm, eps and query budget.

    Returns:
        The path of the re-written report.md.

    Raises:
        ValueError: unknown column, or no report's metrics.json in report_dir
            (nothing is written then).
    """
    if model not in MODELS:
        raise ValueError(f"Expected the report column in {MODELS}. Received: {model!r}")
    path, m = load_report_metrics(report_dir)
    runs = [r for r in m.setdefault("endpoint_attack", {}).get(model, [])
            if _endpoint_key(r) != _endpoint_key(result)]
    m["endpoint_attack"][model] = runs + [result]
    text = report_markdown(m)  # rendered before anything is written
    write_json(path, m)
    write_text(path.with_name("report.md"), text)
    return path.with_name("report.md")


# -- the sweep -------------------------------------------------------------------

def sweep_row(eps, steps, lr, m, *, method="pgd") -> dict:
    """One grid point of a sweep: its settings and the before/after PGD figures."""
    row = {"method": method, "eps": eps, "steps": steps, "lr": lr}
    for model in MODELS:
        row[f"{model}_verification"] = _get(m, model, "groups", "all", "verification_accuracy")
        row[f"{model}_dodging"] = _get(m, model, "attacks", "dodging", "all", "pgd", "success")
        row[f"{model}_impersonation"] = _get(m, model, "attacks", "impersonation", "all", "pgd",
                                             "success")
        row[f"{model}_heldout_dodging"] = _get(m, model, "attacks", "dodging", "held_out", "pgd",
                                               "success")
    return row


def sweep_table(rows: dict) -> str:
    """The Markdown table of a sweep's rows ({key: `sweep_row(...)`})."""
    head = ("| method | eps | steps (free: replays) | lr | verification acc | dodging success "
            "| impersonation success | held-out dodging |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows.values():
        def pair(k):
            return f"{fmt(r.get('pretrained_' + k))} -> {fmt(r.get('finetuned_' + k))}"
        lines.append(f"| {r.get('method', 'pgd')} | {r['eps']:g} | {r['steps']} | {r['lr']:g} "
                     f"| {pair('verification')} | {pair('dodging')} | {pair('impersonation')} "
                     f"| {pair('heldout_dodging')} |")
    return "\n".join(lines)


__all__ = ["add_endpoint_attack", "attack_list", "endpoint_section", "fmt",
           "load_report_metrics", "plot_curves", "report_markdown", "sweep_row", "sweep_table"]
