"""Offline generation of adversarial faces: craft once, save as TFRecords, re-use.

For every face of a folder-per-identity set, every attack, every budget and
every mode, `generate` crafts an adversarial image against a FaceNet-style
embedding model and writes it with its metadata (`tfadv.data.adversarial_records`).
Its settings are declared once, in `tfadv.config.faces.GenerateConfig`
(`generate_from_config`; `tfadv facenet generate` on the command line).

References (both modes judge success at the model's verification threshold,
with `tfadv.attacks.embedding.attack_success`):

- dodging: the reference is the person's own identity embedding, the mean
  clean embedding of all of that person's images in the given set (as a face
  system compares a probe with the enrolled gallery). The attack pushes the
  embedding away from it; success: cosine similarity < threshold.
- impersonation: the target is a fixed other person, the next identity of the
  set in label order (cyclically), and the reference is that person's mean
  clean embedding. The attack pulls the embedding toward it; success:
  similarity >= threshold.

Attacks (names of `ATTACKS`):

- "fgsm", "pgd", "apgd": ours, built by name by
  `tfadv.attacks.embedding.embedding_attack` (the attack registry), on the
  cosine distance to the reference, in pixel units with bounds (0, 255);
- "cleverhans_fgsm", "cleverhans_pgd": the peer library's FGM and PGD on the
  same cosine distance (`tfadv.recipes.cleverhans_peer`), an independent
  implementation of the same threat model;
- "cw": `EmbeddingCW`, the smallest L2 perturbation that crosses the
  threshold. It has no budget: it runs once per mode whatever `eps_list`
  says, its records carry `eps = NO_EPS` (-1) and the size found in
  `perturbation_l2`.

Example:
    >>> summary = generate("facenet-mscele1m-128", "faces/val", "adv/", eps_list=(2, 4),
    ...                    attacks=("pgd", "cleverhans_pgd"), limit=20)
    >>> summary["success_rates"]["pgd"]["dodging"]["4"]
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfadv import assets
from tfadv.attacks.base import call_model
from tfadv.attacks.embedding import (MODES, PIXEL_BOUNDS, attack_success, cosine_similarity,
                                     default_step_size, embedding_attack)
from tfadv.config import check_threshold
from tfadv.config.faces import DEFAULT_GENERATE_ATTACKS, GENERATE_ATTACKS, GenerateConfig
from tfadv.data import adversarial_records as records
from tfadv.data import faces as faces_lib
from tfadv.evaluation import verification
from tfadv.evaluation.compiled import compiled_attack
from tfadv.evaluation.faces import embed, identity_references, impersonation_targets
from tfadv.models.facenet import PRESETS, facenet, load_embedder
from tfadv.ops import norms
from tfadv.recipes.cleverhans_peer import PEER_ATTACKS, cleverhans_attack

__all__ = ["ATTACKS", "BUDGETLESS", "DEFAULT_ATTACKS", "MODES", "PEER_ATTACKS",
           "default_step_size", "default_threshold", "generate", "generate_from_config",
           "make_attack", "resolve_model", "summary_lines"]

ATTACKS = GENERATE_ATTACKS
DEFAULT_ATTACKS = DEFAULT_GENERATE_ATTACKS
# Attacks whose size is found, not given: one run per mode, eps = NO_EPS.
BUDGETLESS = ("cw",)
EMBEDDER_FILE = "embedder.keras"


# --------------------------------------------------------------------------- attacks


def make_attack(name: str, mode: str, eps: float | None, *, threshold: float, steps: int = 20,
                step_size: float | None = None, norm: str = "inf", random_start: bool = True,
                cw_iterations: int = 100, cw_search_steps: int = 5, cw_confidence: float = 0.0,
                cw_learning_rate: float = 0.01, bounds=PIXEL_BOUNDS):
    """One configured attack of `ATTACKS` as a callable and its JSON config.

    Ours are built by `tfadv.attacks.embedding.embedding_attack`, the peer
    library's by `tfadv.recipes.cleverhans_peer.cleverhans_attack`.

    Args:
        name: a name of `ATTACKS`.
        mode: "dodging" (untargeted: ascend the cosine distance to the own
            reference) or "impersonation" (targeted: descend it to the target's).
        eps: budget in pixel units (ignored by "cw").
        threshold: cosine verification threshold in [-1, 1] (used by "cw" and
            "apgd").
        steps, step_size, norm, random_start: iterative attacks ("pgd",
            "apgd", "cleverhans_pgd"); `step_size` defaults to
            `default_step_size(eps, norm)`.
        cw_iterations, cw_search_steps, cw_confidence, cw_learning_rate: "cw".
        bounds: valid pixel range.

    Returns:
        `(attack_fn, config)`: `attack_fn(model, x, reference) -> x_adv`
        (tensors, x float32 [N, H, W, C], reference [N, D]; eager) and a
        JSON-serialisable dict describing the attack. For our attacks
        `attack_fn.attack` is the `tfadv.attacks` object.

    Raises:
        ValueError: unknown name, mode or norm, a threshold outside [-1, 1],
            or bad settings.
    """
    threshold = check_threshold(threshold)
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}. Expected one of {ATTACKS}.")
    if mode not in MODES:
        raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
    norm = norms.canonical_norm(norm)
    if name in BUDGETLESS:
        eps = None
    else:
        if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"Expected eps >= 0 for attack {name!r}. Received: eps={eps!r}")
        eps = float(eps)
        step_size = default_step_size(eps, norm) if step_size is None else float(step_size)
    if name in PEER_ATTACKS:
        return cleverhans_attack(name, mode, eps, steps=steps, step_size=step_size, norm=norm,
                                 random_start=random_start, bounds=bounds)

    attack = embedding_attack(
        name, mode, eps=eps, threshold=threshold, steps=steps, step_size=step_size, norm=norm,
        random_start=random_start, bounds=bounds, cw_iterations=cw_iterations,
        cw_search_steps=cw_search_steps, cw_confidence=cw_confidence,
        cw_learning_rate=cw_learning_rate)
    config = {"library": "tfadv", "class": type(attack).__name__, **attack.get_config()}
    if name == "fgsm":
        config["step_size"] = eps

    def run(model, x, ref):
        return attack(model, x, ref)

    run.attack = attack  # the Attack object, for callers that compile it (see generate)
    return run, config


def _runner(model, job, fn, settings, compiled):
    """The attack of `job` as `f(x, ref)`; ours compiled, one trace per attack and mode.

    A budgeted attack is built at eps=1 with its step relative to eps and
    compiled with the budget an input of each call: every eps (and every
    later run on the model) reuses the trace. A fixed `step_size` is not
    relative to eps: one trace per budget then.
    """
    name, mode, eps = job
    attack = getattr(fn, "attack", None)
    if not compiled or attack is None:
        return lambda x, ref: fn(model, x, ref)
    if name in BUDGETLESS:
        return compiled_attack(model, attack)
    step = settings["step_size"]
    relative = None if step is None else (float(step) / eps if eps > 0 else 0.0)
    unit = make_attack(name, mode, 1.0, **{**settings, "step_size": relative})[0].attack
    compiled_fn = compiled_attack(model, unit, with_eps=True)
    budget = tf.constant(eps, tf.float32)
    return lambda x, ref: compiled_fn(x, ref, budget)


# --------------------------------------------------------------------------- inputs


def resolve_model(model_or_preset):
    """`(model, description, model_dir)` from a Keras model, a preset name or a path.

    A path may be a `.keras` file or a directory holding `embedder.keras`
    (as written by `tfadv facenet finetune`); `model_dir` is where a
    `threshold.json` would be (None for presets and model objects).
    """
    if isinstance(model_or_preset, keras.Model):
        return model_or_preset, {"name": model_or_preset.name, "source": "object"}, None
    text = os.fspath(model_or_preset)
    if text in PRESETS:
        return facenet(text), {"preset": text, "source": "preset"}, None
    path = Path(text)
    if path.is_dir():
        path = path / EMBEDDER_FILE
    if path.suffix == ".keras" or path.exists():
        model = load_embedder(path)
        return model, {"path": str(path.resolve()), "source": "file"}, path.parent
    raise ValueError(f"Expected a Keras model, a FaceNet preset ({sorted(PRESETS)}) "
                     f"or a .keras path. Received: {text!r}")


def default_threshold(embeddings, labels):
    """Best-accuracy cosine threshold over all pairs of a labelled set of embeddings.

    Used when the model comes without a `threshold.json`. It is fitted on the
    very faces being attacked, so it is the threshold most favourable to the
    model on them; pass the model's own operating threshold when it has one.
    """
    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), k=1)
    same = labels[i] == labels[j]
    if not same.any() or same.all():
        raise ValueError("Cannot fit a default threshold: the faces need at least one "
                         "same-person and one different-person pair. Pass threshold=.")
    embeddings = np.asarray(embeddings, np.float32)
    scores = verification.cosine_similarity(embeddings[i], embeddings[j])
    return float(verification.best_threshold(scores, same, max_threshold=1.0)[0])


def _round_robin(labels, limit):
    """Indices that take one image of each identity in turn (so a small limit covers all)."""
    queues = [list(np.flatnonzero(labels == lab)) for lab in np.unique(labels)]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return np.asarray(order[:limit] if limit is not None else sorted(order), np.int64)


def _check_jobs(attacks, modes, eps_list, batch_size, limit):
    """Validated `(attacks, modes, eps_list)` tuples; raises ValueError first thing."""
    attacks, modes = tuple(attacks), tuple(modes)
    if not attacks or any(a not in ATTACKS for a in attacks):
        raise ValueError(f"Expected attacks from {ATTACKS}. Received: attacks={list(attacks)}")
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"Expected modes from {MODES}. Received: modes={list(modes)}")
    eps_list = tuple(float(e) for e in eps_list)
    if any(not (math.isfinite(e) and e >= 0) for e in eps_list):
        raise ValueError(f"Expected budgets eps >= 0. Received: eps_list={list(eps_list)}")
    if not eps_list and any(a not in BUDGETLESS for a in attacks):
        raise ValueError("Expected at least one eps for attacks with a budget.")
    if int(batch_size) < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"Expected limit >= 1 or None. Received: limit={limit}")
    return attacks, modes, eps_list


# --------------------------------------------------------------------------- generate


def generate(model_or_preset, faces_dir, out_dir, *, attacks: Sequence[str] = DEFAULT_ATTACKS,
             eps_list: Sequence[float] = (1, 2, 4, 8), modes: Sequence[str] = MODES,
             threshold: float | None = None, steps: int = 20, step_size: float | None = None,
             norm: str = "inf", random_start: bool = True, batch_size: int = 16,
             limit: int | None = None, cw_iterations: int = 100, cw_search_steps: int = 5,
             cw_confidence: float = 0.0, cw_learning_rate: float = 0.01,
             image_format: str = "raw", shard_size: int = 1000, detector=None,
             align: bool = False, class_names: Sequence[str] | None = None, seed: int | None = 0,
             compiled: bool = True, overwrite: bool = False, progress: bool = False) -> dict:
    """Crafts adversarial faces with several attacks and budgets and writes them as TFRecords.

    Args:
        model_or_preset: a Keras embedding model (raw pixels in [0, 255] ->
            embedding), a FaceNet preset name, a `.keras` file or a directory
            with `embedder.keras`.
        faces_dir: folder with one sub-folder of photos per identity, or a
            `tfadv.data.faces.FaceSet` already loaded.
        out_dir: records directory (see `write_records`).
        attacks: names from `ATTACKS`.
        eps_list: Linf (or L2, see `norm`) budgets in pixel units (0-255).
        modes: "dodging" and/or "impersonation" (needs >= 2 identities).
        threshold: cosine threshold success is judged at. Default: the
            `threshold.json` next to the model file; else `default_threshold`
            on the clean faces (recorded as such in the metadata).
        steps, step_size, norm, random_start: iterative attacks; `step_size`
            defaults to eps / 4 (Linf) or eps / 5 (L2). The cosine objective
            needs a random start when the reference is the clean embedding
            itself; with mean references FGSM and PGD work without one.
        batch_size: images per attack call.
        limit: attack only this many faces, taken one identity at a time
            in turn (references still use every face of the set).
        cw_iterations, cw_search_steps, cw_confidence, cw_learning_rate: C&W.
        image_format: "raw" (lossless float32) or "png" (rounded uint8; the
            success flags and similarities are then measured on the rounded
            image).
        shard_size: records per shard.
        detector, align, class_names: passed to `load_face_folder` (detector
            "none" for folders of ready crops).
        seed: seeds TensorFlow's global generator (random starts); None leaves it.
        compiled: run our attacks as `tf.function`s, one trace per attack and
            mode shared by all budgets (FaceNet on 2 CPU cores: PGD steps ran
            3.7x faster than eager once traced; the trace, seconds to tens of
            seconds, is paid once). cleverhans' attacks always run eagerly.
        overwrite: replace an earlier run in `out_dir`.
        progress: show a tqdm progress bar.

    Returns:
        The metadata written to `out_dir/metadata.json`: counts, "groups"
        (per attack/eps/mode success rate and perturbation sizes, see
        `write_records`), "success_rates" (`[attack][mode][eps]`, eps as a
        string, "-" for C&W), the model, threshold and its source, the face
        set, the attack settings, "attack_seconds" (time spent in each
        attack) and "elapsed_seconds".

    Raises:
        ValueError: unknown attack, mode or norm, bad budgets, a threshold
            outside [-1, 1], too few identities for impersonation, or faces
            whose size does not fit the model.
        FileNotFoundError: missing faces folder or model file.
        FileExistsError: `out_dir` holds records and `overwrite` is False.

    Example:
        >>> generate("facenet-mscele1m-128", demo / "val", "adv/", attacks=("pgd",),
        ...          eps_list=(4,), modes=("dodging",), limit=10)
    """
    start_time = time.time()
    attacks, modes, eps_list = _check_jobs(attacks, modes, eps_list, batch_size, limit)
    norm = norms.canonical_norm(norm)
    if threshold is not None:
        threshold = check_threshold(threshold)
    records.check_image_format(image_format)
    shard_size = records.check_shard_size(int(shard_size))
    batch_size = int(batch_size)
    out_dir = Path(out_dir)
    if not overwrite and records.holds_records(out_dir):
        raise FileExistsError(f"{str(out_dir)!r} already holds adversarial records. Choose "
                              "another directory or pass overwrite=True.")
    if seed is not None:
        tf.random.set_seed(int(seed))

    model, model_info, model_dir = resolve_model(model_or_preset)
    if isinstance(faces_dir, faces_lib.FaceSet):
        faceset, faces_source = faces_dir, "FaceSet"
    else:
        faceset = faces_lib.load_face_folder(faces_dir, size=model.input_shape[1],
                                             detector=detector, align=align,
                                             class_names=class_names, progress=progress)
        faces_source = str(Path(faces_dir).resolve())
    images = np.asarray(faceset.images, np.float32)
    labels = np.asarray(faceset.labels, np.int64)
    names = [str(n) for n in faceset.class_names]
    if images.shape[1:3] != tuple(model.input_shape[1:3]):
        raise ValueError(f"Face crops of shape {images.shape[1:]} do not fit the model input "
                         f"{model.input_shape[1:]}.")

    clean_emb = np.asarray(embed(model, images, batch_size), np.float32)
    references = identity_references(clean_emb, labels, len(names))
    present = np.unique(labels)
    target_of = impersonation_targets(labels, present)  # the next identity present, per face
    if "impersonation" in modes and len(present) < 2:
        raise ValueError("Impersonation needs faces of at least two identities; the set has "
                         f"{len(present)}. Use modes=('dodging',).")

    if threshold is not None:
        threshold_source = "argument"
    elif model_dir is not None and verification.threshold_file(model_dir).exists():
        threshold = verification.load_threshold(model_dir)
        threshold_source = str(verification.threshold_file(model_dir).resolve())
    else:
        threshold = default_threshold(clean_emb, labels)
        threshold_source = "best-accuracy threshold on all pairs of the clean faces"

    selected = _round_robin(labels, None if limit is None else int(limit))
    jobs = [(name, mode, eps) for name in attacks for mode in modes
            for eps in ((None,) if name in BUDGETLESS else eps_list)]
    settings = dict(threshold=threshold, steps=int(steps), step_size=step_size, norm=norm,
                    random_start=bool(random_start), cw_iterations=int(cw_iterations),
                    cw_search_steps=int(cw_search_steps), cw_confidence=float(cw_confidence),
                    cw_learning_rate=float(cw_learning_rate))
    built = {job: make_attack(*job, **settings) for job in jobs}  # validate before any work

    rates: dict = {}
    seconds: dict = {}
    bar = (tqdm(total=len(jobs) * len(selected), desc="adversarial faces", unit="img")
           if progress else None)

    def examples():
        for job in jobs:
            name, mode, eps = job
            fn, config = built[job]
            run = _runner(model, job, fn, settings, compiled)
            key = "-" if eps is None else f"{eps:g}"
            if bar is not None:
                bar.set_postfix_str(f"{name} {mode} eps={key}")
            for s in range(0, len(selected), batch_size):
                idx = selected[s:s + batch_size]
                x = images[idx]
                targets = (np.full(len(idx), records.NO_TARGET) if mode == "dodging"
                           else target_of[idx])
                ref = references[labels[idx] if mode == "dodging" else targets]
                t0 = time.perf_counter()
                x_adv = np.asarray(run(tf.constant(x), tf.constant(ref)), np.float32)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                if image_format == "png":
                    x_adv = np.clip(np.rint(x_adv), 0.0, 255.0)
                adv_emb = call_model(model, tf.constant(x_adv))
                clean_sim = cosine_similarity(clean_emb[idx], ref).numpy()
                adv_sim = cosine_similarity(adv_emb, ref).numpy()
                ok = attack_success(adv_emb, ref, threshold, mode).numpy()
                delta = (x_adv - x).reshape(len(idx), -1)
                linf = np.abs(delta).max(axis=1)
                l2 = np.sqrt(np.square(delta.astype(np.float64)).sum(axis=1))
                cell = rates.setdefault(name, {}).setdefault(mode, {}).setdefault(key, [0, 0])
                cell[0] += int(ok.sum())
                cell[1] += len(idx)
                for k, i in enumerate(idx):
                    t = int(targets[k])
                    yield records.AdversarialExample(
                        image=x_adv[k], label=int(labels[i]), identity=names[int(labels[i])],
                        source_path=str(faceset.paths[i]) if faceset.paths else "",
                        attack=name, attack_config=config,
                        eps=records.NO_EPS if eps is None else float(eps),
                        norm="2" if name in BUDGETLESS else config.get("norm", norm),
                        mode=mode, target_label=t, target_identity="" if t < 0 else names[t],
                        threshold=threshold, success=bool(ok[k]),
                        clean_similarity=float(clean_sim[k]),
                        adversarial_similarity=float(adv_sim[k]),
                        perturbation_linf=float(linf[k]), perturbation_l2=float(l2[k]),
                        source_index=int(i),
                    )
                if bar is not None:
                    bar.update(len(idx))

    def run_metadata():
        return {
            "model": model_info,
            "threshold": threshold,
            "threshold_source": threshold_source,
            "faces": {"source": faces_source, "images": int(len(labels)),
                      "identities": [names[int(lab)] for lab in present],
                      "attacked": int(len(selected)), "limit": limit},
            "modes": list(modes),
            "eps_list": list(eps_list),
            "references": {"dodging": "mean clean embedding of the person over the face set",
                           "impersonation": "mean clean embedding of the next identity "
                                            "(label order, cyclic)"},
            "impersonation_targets": {names[int(k)]: names[int(t)] for k, t in
                                      zip(present, impersonation_targets(present, present))},
            "settings": {**{k: v for k, v in settings.items() if k != "threshold"},
                         "batch_size": batch_size, "seed": seed, "image_format": image_format,
                         "compiled": bool(compiled)},
            "notes": {name: "no budget: eps does not apply (eps = -1 in the records); the size "
                            "of each perturbation is in perturbation_l2"
                      for name in attacks if name in BUDGETLESS},
            "success_rates": {a: {m: {e: (c[0] / c[1] if c[1] else None)
                                      for e, c in by_eps.items()}
                                  for m, by_eps in by_mode.items()}
                              for a, by_mode in rates.items()},
            # Time inside each attack's calls (a compiled attack's one-off trace included).
            "attack_seconds": {a: round(v, 2) for a, v in seconds.items()},
            "elapsed_seconds": round(time.time() - start_time, 2),
        }

    try:
        return records.write_records(out_dir, examples(), shard_size=shard_size,
                                     image_format=image_format, metadata=run_metadata,
                                     overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()


def generate_from_config(model_or_preset, cfg: GenerateConfig, *,
                         class_names: Sequence[str] | None = None,
                         compiled: bool = True) -> dict:
    """`generate` with the settings of a `GenerateConfig` (what `tfadv facenet generate` runs).

    Args:
        model_or_preset: as `generate` (a model, a preset name, a `.keras`
            file or a directory with `embedder.keras`).
        cfg: the settings; `cfg.faces=None` takes the demo set's val split
            (after `tfadv assets fetch`), `cfg.detector="none"` reads ready
            face crops.
        class_names, compiled: as `generate` (settings only code passes).

    Returns:
        The metadata `generate` returns (see `summary_lines` to print it).

    Raises:
        As `generate`; FileNotFoundError also when `cfg.faces` is None and
        the demo assets are missing.
    """
    faces = cfg.faces if cfg.faces is not None else assets.require().demo_faces / "val"
    return generate(
        model_or_preset, faces, cfg.out, attacks=cfg.attacks, eps_list=cfg.eps, modes=cfg.modes,
        threshold=cfg.threshold, steps=cfg.steps, step_size=cfg.step_size, norm=cfg.norm,
        random_start=cfg.random_start, batch_size=cfg.batch_size, limit=cfg.limit,
        cw_iterations=cfg.cw_iterations, cw_search_steps=cfg.cw_search_steps,
        cw_confidence=cfg.cw_confidence, cw_learning_rate=cfg.cw_learning_rate,
        image_format=cfg.image_format, shard_size=cfg.shard_size, detector=cfg.detector,
        align=cfg.align, class_names=class_names, seed=cfg.seed, compiled=compiled,
        overwrite=cfg.overwrite, progress=cfg.progress)


def summary_lines(summary: dict, out_dir) -> list[str]:
    """What a finished run reports: where it wrote, the threshold, one line per group."""
    lines = [f"wrote {summary['count']} adversarial examples in {len(summary['shards'])} "
             f"shard(s) to {out_dir} ({summary['elapsed_seconds']:.0f} s; threshold "
             f"{summary['threshold']:.3f} from {summary['threshold_source']})"]
    for g in summary["groups"]:
        eps = "-" if g["eps"] is None else f"{g['eps']:g}"
        lines.append(f"  {g['attack']:<16} {g['mode']:<13} eps={eps:<4} success "
                     f"{g['success_rate']:.3f} ({g['successes']}/{g['count']}), clean "
                     f"{g['clean_success_rate']:.3f}")
    return lines
