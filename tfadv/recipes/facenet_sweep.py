"""A grid of FaceNet fine-tunings (method x eps x steps x learning rate), resumable, and
the ensemble of its best points (seed 000: "train multiple models with different
adversarial training parameters and combine their predictions"). Eps in pixels (0-255)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from tfadv import runs
from tfadv.config.faces import FACE_METHODS, FaceEvalConfig, FaceFinetuneConfig
from tfadv.files import atomic_path, output_dir, write_json, write_text
from tfadv.recipes import facenet
from tfadv.reports.facenet import sweep_row, sweep_table
from tfadv.trainers.fast import ONE_STEP_METHODS


def sweep(out, *, preset="facenet-mscele1m-128", faces=None, eps_list=(2.0, 4.0),
          steps_list=(1, 3), lr_list=(1e-4,), methods=("pgd",), epochs=3, holdout=0, seed=0,
          ensemble=0, ensemble_drop=0.05, evaluation: FaceEvalConfig | None = None,
          progress=True) -> str:
    """Fine-tunes on a method x eps x steps x learning-rate grid; returns a Markdown table.

    Each grid point writes `out/<point>/` (embedder.keras, metrics.json, ...);
    a killed sweep resumes and skips finished points (`out/sweep.json` holds
    the table rows). For "free" the steps are its replays per batch; "fgsm_rs"
    and "n_fgsm" take one step, so their points differ only in eps and lr.

    Args:
        out: the sweep's folder.
        eps_list: training budgets, Linf pixels (0-255).
        methods: from `FACE_METHODS` ("pgd" and the fast methods).
        ensemble: when >= 2, also write `out/ensemble.keras`, the mean embedding
            (`tfadv.models.ensemble`) of the `ensemble` points with the lowest
            fine-tuned PGD dodging success among those whose verification
            accuracy is at most `ensemble_drop` below the pretrained model's
            (seed 000: models trained with different adversarial settings,
            combined). Judge it with `tfadv facenet evaluate --model`.

    Raises:
        ValueError: an unknown method, an empty grid, `ensemble` above the
            grid's points or above those that qualify, or a folder holding a
            sweep with other shared settings (preset, faces, epochs, holdout,
            seed, evaluation).
        FileNotFoundError: a chosen member's embedder.keras is gone.
    """
    out = Path(out)
    grid = _grid(methods, eps_list, steps_list, lr_list)
    if not grid:
        raise ValueError("Expected at least one method, eps, steps and learning rate in the "
                         "grid. Received an empty list.")
    if ensemble and ensemble > len(grid):
        raise ValueError(f"Expected --ensemble at most the grid's {len(grid)} points. "
                         f"Received: {ensemble}. Lower --ensemble or add points to the grid.")
    output_dir(out)
    evaluation = evaluation or FaceEvalConfig(attacks=("pgd",), curve_eps=(4.0,),
                                              min_eps_search=3)
    # The settings every point shares: a folder holds one sweep, so its points (finished or
    # not) are never mixed with points trained otherwise.
    runs.claim(out, {"preset": preset, "faces": None if faces is None else str(faces),
                     "epochs": epochs, "holdout": holdout, "seed": seed,
                     "evaluation": dataclasses.asdict(evaluation)},
               finished=None, backup="sweep.json")
    splits = facenet.load_splits(faces, holdout=holdout, seed=seed, progress=progress)
    state_path = out / "sweep.json"
    rows = json.loads(state_path.read_text()) if state_path.exists() else {}
    for key, (method, eps, steps, lr) in grid.items():
        if key in rows:
            continue
        cfg = FaceFinetuneConfig(out=str(out / key), preset=preset, faces=faces,
                                 holdout=holdout, epochs=epochs, learning_rate=lr,
                                 train_eps=eps, method=method,
                                 train_steps=steps if method == "pgd" else 10,
                                 free_replays=steps if method == "free" else 4, seed=seed,
                                 evaluation=evaluation)
        metrics_path = out / key / "metrics.json"
        if metrics_path.exists():
            m = json.loads(metrics_path.read_text())
        else:
            m = facenet.finetune(cfg, progress=progress, splits=splits)
        rows[key] = sweep_row(eps, steps, lr, m, method=method)
        write_json(state_path, rows)
    # This grid's points (the folder may hold more from an earlier, wider grid).
    current = {key: rows[key] for key in grid}
    table = sweep_table(current)
    write_text(out / "sweep.md", table + "\n")
    if ensemble:
        members = ensemble_members(current, ensemble, max_drop=ensemble_drop)
        _write_ensemble(out, members)
        table += (f"\n\nensemble.keras: mean embedding of {', '.join(members)}")
    return table


def _grid(methods, eps_list, steps_list, lr_list) -> dict:
    """{key: (method, eps, steps, lr)}, one per distinct fine-tuning (and folder)."""
    bad = [m for m in methods if m not in FACE_METHODS]
    if bad:
        raise ValueError(f"Expected methods from {', '.join(FACE_METHODS)}. Received: {bad}")
    grid = {}
    for method, eps, steps, lr in itertools.product(methods, eps_list, steps_list, lr_list):
        point = (method, eps, 1 if method in ONE_STEP_METHODS else steps, lr)
        grid.setdefault(sweep_key(*point), point)
    return grid


def sweep_key(method, eps, steps, lr) -> str:
    """A grid point's folder name (PGD's keeps the name it had before methods were swept)."""
    key = f"eps{eps:g}_steps{steps}_lr{lr:g}"
    return key if method == "pgd" else f"{method}_{key}"


def ensemble_members(rows, count, *, max_drop=0.05) -> list[str]:
    """The `count` grid points with the lowest fine-tuned dodging success among those whose
    verification accuracy fell by at most `max_drop` (ties: the higher verification).

    Raises:
        ValueError: fewer than `count` points qualify (says which did not and why).
    """
    fit, unfit = [], []
    for key, r in rows.items():
        before, after = r.get("pretrained_verification"), r.get("finetuned_verification")
        dodging = r.get("finetuned_dodging")
        if None in (before, after, dodging):
            unfit.append(f"{key} (not evaluated)")
        elif before - after > max_drop + 1e-12:
            unfit.append(f"{key} (verification {before:.3f} -> {after:.3f})")
        else:
            fit.append((dodging, -after, key))
    if len(fit) < count:
        raise ValueError(f"Expected at least {count} grid points whose verification accuracy "
                         f"drops by at most {max_drop:g} for the ensemble; {len(fit)} qualify "
                         f"(left out: {', '.join(unfit) or 'none'}). Lower --ensemble or raise "
                         "--ensemble-drop.")
    return [key for _, _, key in sorted(fit)[:count]]


def _write_ensemble(out, members):
    from tfadv.models.ensemble import ensemble as combine

    paths = [out / key / "embedder.keras" for key in members]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"The ensemble's members {', '.join(missing)} are gone. Remove their rows from "
            f"{out / 'sweep.json'} and run the sweep again to train them again.")
    model = combine([facenet.load_embedder(p) for p in paths], combine="mean_embedding",
                    name="sweep_ensemble")
    with atomic_path(str(out / "ensemble.keras")) as tmp:
        model.save(tmp)
    write_json(out / "ensemble.json", {"combine": "mean_embedding", "members": members})
