"""Offline generation of adversarial faces: craft once, save as TFRecords, re-use.

For every face of a folder-per-identity set, every attack, every budget and
every mode, `generate` crafts an adversarial image against a FaceNet-style
embedding model and writes it with its metadata (`tfadv.data.adversarial_records`).

References (both modes judge success at the model's verification threshold):

- dodging: the reference is the person's own identity embedding, the mean
  clean embedding of all of that person's images in the given set (as a face
  system compares a probe with the enrolled gallery). The attack pushes the
  embedding away from it; success: cosine similarity < threshold.
- impersonation: the target is a fixed other person, the next identity of the
  set in label order (cyclically), and the reference is that person's mean
  clean embedding. The attack pulls the embedding toward it; success:
  similarity >= threshold.

Attacks (names of `ATTACKS`):

- "fgsm", "pgd", "apgd": ours (`tfadv.attacks.embedding`), on the cosine
  distance to the reference, in pixel units with bounds (0, 255);
- "cleverhans_fgsm", "cleverhans_pgd": cleverhans 4's
  `fast_gradient_method` / `projected_gradient_descent` with a `loss_fn`
  returning the per-example cosine distance and the references passed as `y`
  (cleverhans ascends `loss_fn(labels=y, logits=model(x))`, descends it when
  `targeted=True`), an independent implementation of the same threat model;
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

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from tfadv import argtypes
from tfadv.data import adversarial_records as records

ATTACKS = ("fgsm", "pgd", "apgd", "cw", "cleverhans_fgsm", "cleverhans_pgd")
DEFAULT_ATTACKS = ("fgsm", "pgd", "cw", "cleverhans_fgsm", "cleverhans_pgd")
# Attacks whose size is found, not given: one run per mode, eps = NO_EPS.
BUDGETLESS = ("cw",)
MODES = ("dodging", "impersonation")
PIXEL_BOUNDS = (0.0, 255.0)
EMBEDDER_FILE = "embedder.keras"


# --------------------------------------------------------------------------- attacks


def _cosine_distance_loss(labels, logits):
    """cleverhans `loss_fn(labels, logits)`: per-example `1 - cos(embedding, reference)`."""
    from tfadv.attacks.embedding import cosine_distance

    return cosine_distance(logits, labels)


def default_step_size(eps: float, norm: str) -> float:
    """The step `embedding_pgd` uses: eps / 4 (Linf) or eps / 5 (L2), any norm spelling.

    Raises:
        ValueError: unknown norm.
    """
    from tfadv.attacks.embedding import default_step_size as step

    return step(eps, norm)


def make_attack(name: str, mode: str, eps: float | None, *, threshold: float, steps: int = 20,
                step_size: float | None = None, norm: str = "inf", random_start: bool = True,
                cw_iterations: int = 100, cw_search_steps: int = 5, cw_confidence: float = 0.0,
                cw_learning_rate: float = 0.01, bounds=PIXEL_BOUNDS):
    """One configured attack of `ATTACKS` as a callable and its JSON config.

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
    from tfadv.attacks import embedding as E
    from tfadv.evaluation.verification import check_threshold
    from tfadv.ops import norms

    threshold = check_threshold(threshold)

    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}. Expected one of {ATTACKS}.")
    if mode not in MODES:
        raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
    norm = norms.canonical_norm(norm)
    targeted = mode == "impersonation"
    if name not in BUDGETLESS:
        if eps is None or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"Expected eps >= 0 for attack {name!r}. Received: eps={eps!r}")
        eps = float(eps)
        if step_size is None:
            step_size = default_step_size(eps, norm)
        step_size = float(step_size)

    if name == "cw":
        attack = E.EmbeddingCW(threshold=threshold, confidence=cw_confidence,
                               learning_rate=cw_learning_rate, max_iterations=cw_iterations,
                               binary_search_steps=cw_search_steps, targeted=targeted,
                               bounds=bounds)
    elif name == "fgsm":
        attack = E.embedding_fgsm(mode, eps=eps, norm=norm, bounds=bounds)
    elif name == "pgd":
        attack = E.embedding_pgd(mode, eps=eps, steps=steps, step_size=step_size, norm=norm,
                                 random_start=random_start, bounds=bounds)
    elif name == "apgd":
        attack = E.EmbeddingAPGD(eps=eps, threshold=threshold, steps=steps, norm=norm,
                                 random_start=random_start, targeted=targeted, bounds=bounds)
    else:
        return _cleverhans_attack(name, eps, step_size=step_size, steps=steps, norm=norm,
                                  random_start=random_start, targeted=targeted, bounds=bounds)

    config = {"library": "tfadv", "class": type(attack).__name__, **attack.get_config()}
    if name == "fgsm":
        config["step_size"] = eps

    def run(model, x, ref):
        return attack(model, x, ref)

    run.attack = attack  # our Attack object, for callers that compile it (see generate)
    return run, config


def _cleverhans_attack(name, eps, *, step_size, steps, norm, random_start, targeted, bounds):
    import cleverhans
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    from tfadv.attacks.base import call_model
    from tfadv.ops import norms

    norm = norms.canonical_norm(norm)
    ch_norm = np.inf if norm == "inf" else 2
    clip_min, clip_max = (float(b) for b in bounds)
    config = {"library": "cleverhans", "version": getattr(cleverhans, "__version__", "unknown"),
              "eps": eps, "norm": norm, "targeted": targeted, "loss": "cosine_distance",
              "clip_min": clip_min, "clip_max": clip_max}

    def model_fn(model):
        return lambda x: call_model(model, x)

    if name == "cleverhans_fgsm":
        config["function"] = "fast_gradient_method"

        def run(model, x, ref):
            return fast_gradient_method(model_fn(model), x, eps, ch_norm,
                                        loss_fn=_cosine_distance_loss, clip_min=clip_min,
                                        clip_max=clip_max, y=ref, targeted=targeted)

        return run, config

    if int(steps) < 1:
        raise ValueError(f"Expected steps >= 1. Received: steps={steps}")
    if step_size > eps:
        # cleverhans asserts this; say it as a ValueError first.
        raise ValueError(f"cleverhans PGD needs step_size <= eps. Received: "
                         f"step_size={step_size}, eps={eps}")
    config.update(function="projected_gradient_descent", eps_iter=step_size, nb_iter=int(steps),
                  rand_init=bool(random_start))

    def run(model, x, ref):
        return projected_gradient_descent(
            model_fn(model), x, eps, step_size, int(steps), ch_norm,
            loss_fn=_cosine_distance_loss, clip_min=clip_min, clip_max=clip_max, y=ref,
            targeted=targeted, rand_init=bool(random_start), sanity_checks=False)

    return run, config


# --------------------------------------------------------------------------- inputs


def resolve_model(model_or_preset):
    """`(model, description, model_dir)` from a Keras model, a preset name or a path.

    A path may be a `.keras` file or a directory holding `embedder.keras`
    (as written by `tfadv facenet finetune`); `model_dir` is where a
    `threshold.json` would be (None for presets and model objects).
    """
    import keras

    from tfadv.models.facenet import PRESETS, facenet, load_embedder

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
    from tfadv.evaluation.verification import best_threshold, cosine_similarity

    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), k=1)
    same = labels[i] == labels[j]
    if not same.any() or same.all():
        raise ValueError("Cannot fit a default threshold: the faces need at least one "
                         "same-person and one different-person pair. Pass threshold=.")
    embeddings = np.asarray(embeddings, np.float32)
    threshold = float(best_threshold(cosine_similarity(embeddings[i], embeddings[j]), same,
                                     max_threshold=1.0)[0])
    return threshold


def _embed(model, images, batch_size):
    import tensorflow as tf

    from tfadv.attacks.base import call_model

    out = [call_model(model, tf.constant(images[s:s + batch_size])).numpy()
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _round_robin(labels, limit):
    """Indices that take one image of each identity in turn (so a small limit covers all)."""
    queues = [list(np.flatnonzero(labels == lab)) for lab in np.unique(labels)]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return np.asarray(order[:limit] if limit is not None else sorted(order), np.int64)


def _cosine(a, b):
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=-1)


def _success(sim, threshold, mode):
    return sim < threshold if mode == "dodging" else sim >= threshold


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
            seconds, is paid once). cleverhans' attacks always run eagerly, as
            shipped (their Python step loop would be unrolled into one large
            graph).
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
    import tensorflow as tf

    from tfadv.data import faces as faces_lib

    start_time = time.time()
    attacks = tuple(attacks)
    modes = tuple(modes)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"Expected attacks from {ATTACKS}. Received: attacks={list(attacks)}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
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
    from tfadv.evaluation.verification import check_threshold
    from tfadv.ops import norms

    norm = norms.canonical_norm(norm)
    if threshold is not None:
        threshold = check_threshold(threshold)
    records._check_image_format(image_format)
    batch_size = int(batch_size)
    out_dir = Path(out_dir)
    if not overwrite and out_dir.is_dir() and (records._existing_shards(out_dir)
                                               or (out_dir / records.METADATA_FILE).exists()):
        raise FileExistsError(f"{str(out_dir)!r} already holds adversarial records. Choose "
                              "another directory or pass overwrite=True.")
    if seed is not None:
        tf.random.set_seed(int(seed))

    model, model_info, model_dir = resolve_model(model_or_preset)
    size = model.input_shape[1]
    if isinstance(faces_dir, faces_lib.FaceSet):
        faceset, faces_source = faces_dir, "FaceSet"
    else:
        faceset = faces_lib.load_face_folder(faces_dir, size=size, detector=detector, align=align,
                                             class_names=class_names, progress=progress)
        faces_source = str(Path(faces_dir).resolve())
    images = np.asarray(faceset.images, np.float32)
    labels = np.asarray(faceset.labels, np.int64)
    if images.shape[1:3] != tuple(model.input_shape[1:3]):
        raise ValueError(f"Face crops of shape {images.shape[1:]} do not fit the model input "
                         f"{model.input_shape[1:]}.")

    clean_emb = _embed(model, images, batch_size)
    present = np.unique(labels)
    centres = {int(lab): clean_emb[labels == lab].mean(axis=0) for lab in present}
    centres = {k: v / max(np.linalg.norm(v), 1e-12) for k, v in centres.items()}
    target_of = {int(lab): int(present[(i + 1) % len(present)]) for i, lab in enumerate(present)}
    if "impersonation" in modes and len(present) < 2:
        raise ValueError("Impersonation needs faces of at least two identities; the set has "
                         f"{len(present)}. Use modes=('dodging',).")

    if threshold is not None:
        threshold_source = "argument"
    elif model_dir is not None and (Path(model_dir) / "threshold.json").exists():
        from tfadv.evaluation.verification import load_threshold

        threshold = load_threshold(Path(model_dir))
        threshold_source = str((Path(model_dir) / "threshold.json").resolve())
    else:
        threshold = default_threshold(clean_emb, labels)
        threshold_source = "best-accuracy threshold on all pairs of the clean faces"

    selected = _round_robin(labels, None if limit is None else int(limit))
    jobs = []
    for name in attacks:
        for mode in modes:
            for eps in ((None,) if name in BUDGETLESS else eps_list):
                jobs.append((name, mode, eps))
    settings = dict(threshold=threshold, steps=int(steps), step_size=step_size, norm=norm,
                    random_start=bool(random_start), cw_iterations=int(cw_iterations),
                    cw_search_steps=int(cw_search_steps), cw_confidence=float(cw_confidence),
                    cw_learning_rate=float(cw_learning_rate))
    built = {job: make_attack(*job, **settings) for job in jobs}  # validate before any work

    def runner(job):
        """The attack of `job` as `f(x, ref)`; ours compiled, shared across budgets and runs."""
        from tfadv.evaluation.compiled import compiled_attack

        name, mode, eps = job
        fn = built[job][0]
        if not compiled or getattr(fn, "attack", None) is None:
            return lambda x, ref: fn(model, x, ref)
        if name in BUDGETLESS:
            f = compiled_attack(model, fn.attack)
            return lambda x, ref: f(x, ref)
        else:
            # The budget is an input of the call (on an eps=1 attack), so one
            # trace serves every eps; the step is kept relative to eps.
            rel = (default_step_size(1.0, norm) if step_size is None
                   else (float(step_size) / eps if eps > 0 else 0.0))
            base = make_attack(name, mode, 1.0, **{**settings, "step_size": rel})[0].attack
        # Cached with the model, keyed by the attack's config: equal attacks (other
        # budgets, later generate calls) reuse one trace.
        f = compiled_attack(model, base, with_eps=True)
        return lambda x, ref: f(x, ref, tf.constant(eps, tf.float32))

    rates: dict = {}
    seconds: dict = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) * len(selected), desc="adversarial faces", unit="img")

    def examples():
        for job in jobs:
            name, mode, eps = job
            config = built[job][1]
            fn = runner(job)
            if bar is not None:
                bar.set_postfix_str(f"{name} {mode} eps={'-' if eps is None else f'{eps:g}'}")
            for s in range(0, len(selected), batch_size):
                idx = selected[s:s + batch_size]
                x = images[idx]
                own = np.stack([centres[int(lab)] for lab in labels[idx]])
                if mode == "dodging":
                    ref, targets = own, np.full(len(idx), records.NO_TARGET)
                else:
                    targets = np.asarray([target_of[int(lab)] for lab in labels[idx]])
                    ref = np.stack([centres[int(t)] for t in targets])
                t0 = time.perf_counter()
                x_adv = np.asarray(fn(tf.constant(x), tf.constant(ref)), np.float32)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                if image_format == "png":
                    x_adv = np.clip(np.rint(x_adv), 0.0, 255.0)
                adv_emb = _embed(model, x_adv, batch_size)
                clean_sim = _cosine(clean_emb[idx], ref)
                adv_sim = _cosine(adv_emb, ref)
                ok = _success(adv_sim, threshold, mode)
                delta = (x_adv - x).reshape(len(idx), -1)
                linf = np.abs(delta).max(axis=1)
                l2 = np.sqrt(np.square(delta.astype(np.float64)).sum(axis=1))
                key = "-" if eps is None else f"{eps:g}"
                cell = rates.setdefault(name, {}).setdefault(mode, {}).setdefault(key, [0, 0])
                cell[0] += int(ok.sum())
                cell[1] += len(idx)
                for k, i in enumerate(idx):
                    t = int(targets[k])
                    yield records.AdversarialExample(
                        image=x_adv[k], label=int(labels[i]),
                        identity=str(faceset.class_names[int(labels[i])]),
                        source_path=str(faceset.paths[i]) if faceset.paths else "",
                        attack=name, attack_config=config,
                        eps=records.NO_EPS if eps is None else float(eps),
                        norm="2" if name in BUDGETLESS else config.get("norm", norm),
                        mode=mode, target_label=t,
                        target_identity="" if t < 0 else str(faceset.class_names[t]),
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
                      "identities": [str(faceset.class_names[int(lab)]) for lab in present],
                      "attacked": int(len(selected)), "limit": limit},
            "modes": list(modes),
            "eps_list": list(eps_list),
            "references": {"dodging": "mean clean embedding of the person over the face set",
                           "impersonation": "mean clean embedding of the next identity "
                                            "(label order, cyclic)"},
            "impersonation_targets": {str(faceset.class_names[k]): str(faceset.class_names[v])
                                      for k, v in target_of.items()},
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
        return records.write_records(out_dir, examples(), shard_size=int(shard_size),
                                     image_format=image_format, metadata=run_metadata,
                                     overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- command line


_positive_int = argtypes.positive_int


_nonneg_float = argtypes.nonneg_float


def add_generate_command(subparsers, name: str = "generate"):
    """Registers `generate` on a subparsers object (e.g. the `tfadv facenet` group).

    The parser's `func(args)` runs `generate` and returns an exit code (0, or
    2 after printing an error a user can fix).

    Args:
        subparsers: from `parser.add_subparsers()`.
        name: command name.

    Returns:
        The new sub-parser.
    """
    g = subparsers.add_parser(
        name, help="craft adversarial faces (ours and cleverhans) and save them as TFRecords",
        description="Craft adversarial examples against a FaceNet embedding model for every "
                    "face of a folder (one sub-folder per identity) and write them as "
                    "TFRecord shards with metadata.json.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="FaceNet preset, e.g. facenet-mscele1m-128")
    src.add_argument("--model", help="embedder .keras file, or a folder with embedder.keras "
                                     "(its threshold.json is used)")
    g.add_argument("--faces", default=None,
                   help="folder with one sub-folder of photos per identity "
                        "(default: the demo set's val split, after `tfadv assets fetch`)")
    g.add_argument("--out", required=True, help="output directory for shards and metadata.json")
    g.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(DEFAULT_ATTACKS))
    g.add_argument("--eps", nargs="+", type=_nonneg_float, default=[1.0, 2.0, 4.0, 8.0],
                   help="budgets in pixel units (0-255)")
    g.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    g.add_argument("--limit", type=_positive_int, default=None,
                   help="attack at most N faces (one identity at a time in turn)")
    g.add_argument("--threshold", type=argtypes.cosine_threshold, default=None,
                   help="cosine threshold (default: threshold.json next to --model, else "
                        "the best-accuracy threshold on the clean faces)")
    g.add_argument("--steps", type=_positive_int, default=20)
    g.add_argument("--step-size", type=_nonneg_float, default=None,
                   help="default eps/4 (Linf) or eps/5 (L2)")
    g.add_argument("--norm", type=argtypes.norm, default="inf")
    g.add_argument("--no-random-start", dest="random_start", action="store_false")
    g.add_argument("--cw-iterations", type=_positive_int, default=100)
    g.add_argument("--cw-search-steps", type=_positive_int, default=5)
    g.add_argument("--cw-confidence", type=_nonneg_float, default=0.0)
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--shard-size", type=_positive_int, default=1000)
    g.add_argument("--image-format", choices=records.IMAGE_FORMATS, default="raw")
    g.add_argument("--detector", choices=("mtcnn", "none"), default="mtcnn",
                   help="'none' for folders of ready face crops")
    g.add_argument("--align", action="store_true", help="level the eyes when cropping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.set_defaults(func=run_generate_command, command_name=name)
    return g


def run_generate_command(args) -> int:
    """Runs `generate` from parsed arguments; prints the success rates. Returns an exit code."""
    try:
        faces = args.faces
        if faces is None:
            from tfadv import assets

            faces = assets.require().demo_faces / "val"
        summary = generate(
            args.model or args.preset, faces, args.out, attacks=args.attacks, eps_list=args.eps,
            modes=args.modes, threshold=args.threshold, steps=args.steps,
            step_size=args.step_size, norm=args.norm, random_start=args.random_start,
            batch_size=args.batch_size, limit=args.limit, cw_iterations=args.cw_iterations,
            cw_search_steps=args.cw_search_steps, cw_confidence=args.cw_confidence,
            image_format=args.image_format, shard_size=args.shard_size,
            detector=None if args.detector == "mtcnn" else "none", align=args.align,
            seed=args.seed, overwrite=args.overwrite, progress=args.progress)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if os.environ.get("TFADV_DEBUG"):
            raise
        print(f"tfadv facenet generate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['count']} adversarial examples in {len(summary['shards'])} shard(s) "
          f"to {args.out} ({summary['elapsed_seconds']:.0f} s; threshold "
          f"{summary['threshold']:.3f} from {summary['threshold_source']})")
    for g in summary["groups"]:
        eps = "-" if g["eps"] is None else f"{g['eps']:g}"
        print(f"  {g['attack']:<16} {g['mode']:<13} eps={eps:<4} success "
              f"{g['success_rate']:.3f} ({g['successes']}/{g['count']}), clean "
              f"{g['clean_success_rate']:.3f}")
    return 0


def main(argv=None) -> int:
    """`python training/generate_facenet_adversarial.py ...`: the `generate` options alone."""
    parser = argparse.ArgumentParser(prog="generate_facenet_adversarial")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_command(sub)
    args = parser.parse_args(["generate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
