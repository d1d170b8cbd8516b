"""The robustness protocol of face-embedding models: verification, attacks, curves.

RobFR-style (Yang et al. 2020), on a gallery and a probe set of face photos
(raw pixels in [0, 255]) and a model's operating cosine threshold:

- enrolment: each identity's reference is the normalised mean embedding of
  its gallery photos (`identity_references`);
- clean: nearest-neighbour identification of the probes against the
  gallery and verification of every probe against every gallery photo
  (k-fold accuracy, ROC AUC, TAR@FAR), per identity group;
- dodging: perturb a probe so that it no longer matches its own reference,
  among the probes that matched it clean; impersonation: perturb it to
  match the next identity's reference, among those that did not yet;
- the attack suite (`attack_suite`): FGSM, PGD (Linf, random start), APGD,
  C&W (L2, minimal size), success per photo at the threshold; PGD and APGD
  re-run `restarts` times with new random starts (a photo counts when any
  run wins); the worst case per photo is the OR over the Linf attacks and
  their restarts;
- the minimal Linf budget per matched photo (PGD bisection,
  `tfadv.attacks.embedding.minimal_eps`) and success-vs-eps curves, both
  run as one compiled attack called with a per-example budget.

Every success decision is `tfadv.attacks.embedding.attack_success`; every
attack is built by `tfadv.attacks.embedding.embedding_attack` and run as one
cached `tf.function` per model and attack (`tfadv.evaluation.compiled`).
Budgets and step sizes are in pixel units; `FaceEvalConfig.step_size` (None:
`eps / 4`) is the suite's PGD step, and curves and the minimal-eps search
keep the same step-to-budget ratio.

Results are dataclasses; `to_dict()` gives the JSON layout of `metrics.json`
(`tfadv.reports.facenet` renders it).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from tfadv.attacks.base import call_model
from tfadv.attacks.embedding import attack_success, embedding_attack, minimal_eps
from tfadv.attacks.square import EmbeddingSquare
from tfadv.config.faces import MODES, FaceEvalConfig
from tfadv.data.pairs import cross_pairs
from tfadv.evaluation import verification as V
from tfadv.evaluation.compiled import in_batches
from tfadv.evaluation.robustness import attack_batches

# The C&W settings of the face suite (cosine-unit confidence, pixel-sized Adam
# steps, a large initial constant): the published figures were made with them.
CW_SETTINGS = dict(cw_confidence=0.02, cw_learning_rate=1.0, cw_initial_const=10.0)
LINF_ATTACKS = ("fgsm", "pgd", "apgd", "square")   # the worst case is taken over these
RESTARTED = ("pgd", "apgd")              # re-run with new random starts
FARS = (1e-2, 1e-3)


def _rate(ok) -> float:
    return float(np.mean(ok)) if len(ok) else float("nan")


# -- results --------------------------------------------------------------------

@dataclass
class AttackResult:
    """One attack of the suite: per-photo success (any restart) and the images.

    `x_adv` holds, per photo, the images of the first winning run (the last
    run where none won); None when the suite was asked not to keep them.
    """

    name: str
    per_example: np.ndarray            # bool [N]
    runs: int = 1                      # runs configured (restarts stop once all are won)
    median_l2: float | None = None     # C&W: median L2 of the successful perturbations
    x_adv: np.ndarray | None = field(default=None, repr=False)

    @property
    def success(self) -> float:
        return _rate(self.per_example)

    def to_dict(self) -> dict:
        out = {"success": self.success, "per_example": np.asarray(self.per_example).tolist()}
        if self.median_l2 is not None:
            out["median_l2"] = self.median_l2
        return out


@dataclass
class ModeResult:
    """The attack suite in one mode, with per-group views of its per-photo results.

    `groups` maps a group name to a bool mask over the attacked photos.
    """

    mode: str
    attacks: dict                      # name -> AttackResult, in the suite's order
    worst_case: np.ndarray             # bool [N]: any Linf attack, any restart
    groups: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(len(self.worst_case))

    def suite_dict(self) -> dict:
        """{attack: {"success", "per_example"[, "median_l2"]}, "worst_case": ..., "n"}."""
        out = {name: r.to_dict() for name, r in self.attacks.items()}
        out["worst_case"] = {"success": _rate(self.worst_case),
                             "per_example": np.asarray(self.worst_case).tolist()}
        out["n"] = self.n
        return out

    def group_dict(self, mask) -> dict:
        """The success rates of the photos under `mask`: {"n", attack: {"success"}}."""
        mask = np.asarray(mask, bool)
        out = {"n": int(mask.sum())}
        for name, r in self.attacks.items():
            out[name] = {"success": _rate(np.asarray(r.per_example, bool)[mask])}
        out["worst_case"] = {"success": _rate(self.worst_case[mask])}
        return out

    def to_dict(self) -> dict:
        out = {"all": self.suite_dict()}
        out.update({g: self.group_dict(mask) for g, mask in self.groups.items()})
        return out


@dataclass
class GroupVerification:
    """Clean verification of the probes of one identity group against its gallery."""

    probes: int
    identities: int
    nn_accuracy: float
    verification_accuracy: float     # 10-fold
    accuracy_at_threshold: float
    auc: float | None
    tar_at_far: dict                 # far -> TAR (None where the pairs cannot resolve it)

    def to_dict(self) -> dict:
        out = {"probes": self.probes, "identities": self.identities,
               "nn_accuracy": self.nn_accuracy,
               "verification_accuracy": self.verification_accuracy,
               "accuracy_at_threshold": self.accuracy_at_threshold, "auc": self.auc}
        out.update({f"tar@far={far:g}": tar for far, tar in self.tar_at_far.items()})
        return out


@dataclass
class MinimalEps:
    """Per-photo smallest successful Linf budget (inf: not even at the largest)."""

    values: np.ndarray

    @property
    def median(self) -> float | None:
        return float(np.median(self.values)) if len(self.values) else None

    def to_dict(self) -> dict:
        return {"median": self.median, "values": [float(v) for v in self.values]}


@dataclass
class Curve:
    """Success rate against the budget; `per_example` is bool [len(eps), N]."""

    mode: str
    eps: list
    per_example: np.ndarray

    @property
    def success(self) -> list:
        return [_rate(row) for row in self.per_example]

    def to_dict(self) -> dict:
        return {"eps": list(self.eps), "success": self.success}


@dataclass
class FaceEvaluation:
    """Everything `evaluate_faces` measured for one model at its threshold."""

    threshold: float
    eps: float
    groups: dict                     # group -> GroupVerification
    matched_clean: float
    attacks: dict                    # mode -> ModeResult
    min_eps_dodging: MinimalEps
    curves: dict                     # mode -> Curve

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "eps": self.eps,
                "groups": {g: r.to_dict() for g, r in self.groups.items()},
                "matched_clean": self.matched_clean,
                "attacks": {m: r.to_dict() for m, r in self.attacks.items()},
                "min_eps_dodging": self.min_eps_dodging.to_dict(),
                "curves": {m: c.to_dict() for m, c in self.curves.items()}}


# -- building blocks ------------------------------------------------------------

def embed(model, x, batch_size=32) -> np.ndarray:
    """Embeddings of `x` in batches, in inference mode (NumPy [N, D]; [0, 1] when empty).

    `model` is a Keras model or any callable taking a batch of images.
    """
    if len(x) == 0:
        return np.zeros((0, 1), np.float32)
    return in_batches(lambda xb: call_model(model, xb), x, batch_size)


def identity_references(emb, labels, num_classes) -> np.ndarray:
    """Normalised mean embedding per identity ([C, D]; zeros for absent ones)."""
    refs = np.zeros((num_classes, emb.shape[1]), np.float32)
    for c in range(num_classes):
        if np.any(labels == c):
            m = emb[labels == c].mean(0)
            refs[c] = m / max(np.linalg.norm(m), 1e-12)
    return refs


def impersonation_targets(labels, present) -> np.ndarray:
    """The target of each photo: the next present identity after its own (in order)."""
    present = sorted(present)
    nxt = {c: present[(i + 1) % len(present)] for i, c in enumerate(present)}
    return np.array([nxt[int(c)] for c in labels], np.int64)


def succeeded(embeddings, reference, threshold, mode) -> np.ndarray:
    """`attack_success` on NumPy embeddings: bool [N] (empty stays empty)."""
    if len(embeddings) == 0:
        return np.zeros(0, bool)
    return attack_success(np.asarray(embeddings, np.float32), np.asarray(reference, np.float32),
                          threshold, mode).numpy()


def attack_images(model, attack, x, reference, *, batch_size=16, eps=None) -> np.ndarray:
    """`attack` over NumPy photos in batches, compiled once per model and attack.

    Args:
        model, attack: the embedding model and a `tfadv.attacks.Attack`.
        x: float32 [N, H, W, 3] in [0, 255]; reference: [N, D].
        batch_size: photos per call.
        eps: optional per-photo budgets [N] (pixels): the attack then runs at
            each photo's budget (step scaled alike), with one trace for all.

    Returns:
        x_adv, NumPy like x.
    """
    if len(x) == 0:
        return np.asarray(x)
    return attack_batches(model, attack, x, reference, eps=eps, batch_size=batch_size)


def _step_size(cfg: FaceEvalConfig, budget):
    """PGD's step at `budget`: `cfg.step_size` scaled by budget / cfg.eps (None: eps / 4)."""
    if cfg.step_size is None or cfg.eps <= 0:
        return None
    return float(cfg.step_size) * float(budget) / float(cfg.eps)


def build_attack(name, mode, threshold, cfg: FaceEvalConfig):
    """One attack of the suite at `cfg.eps` (C&W: unbounded, `CW_SETTINGS`; Square:
    `EmbeddingSquare`, black-box, `cfg.square_queries` queries per photo)."""
    if name == "square":
        return EmbeddingSquare(eps=cfg.eps, threshold=threshold, mode=mode,
                               queries=cfg.square_queries, seed=cfg.seed,
                               batch_size=cfg.batch_size)
    steps = {"pgd": cfg.pgd_steps, "apgd": cfg.apgd_steps}.get(name, 20)
    return embedding_attack(
        name, mode, eps=None if name == "cw" else cfg.eps, threshold=threshold, steps=steps,
        step_size=cfg.step_size if name == "pgd" else None, random_start=cfg.random_start,
        unroll=False, cw_iterations=cfg.cw_iterations, cw_search_steps=cfg.cw_search_steps,
        **CW_SETTINGS)


def _scaled_pgd(mode, budget, steps, cfg):
    return embedding_attack("pgd", mode, eps=float(budget), steps=steps,
                            step_size=_step_size(cfg, budget), random_start=cfg.random_start,
                            unroll=False)


# -- the protocol ----------------------------------------------------------------

def attack_suite(model, x, ref, threshold, mode, cfg: FaceEvalConfig | None = None, *,
                 progress=None, keep_images=True) -> ModeResult:
    """Every configured attack in one mode at `cfg.eps`, judged per photo.

    Args:
        model: embedding model (raw pixels in [0, 255] -> embeddings [N, D]).
        x: photos, float32 [N, H, W, 3] in [0, 255].
        ref: references [N, D]: the own identity's (dodging) or the target's
            (impersonation).
        threshold: cosine threshold in [-1, 1] success is judged at.
        mode: "dodging" or "impersonation".
        cfg: attacks, budget (pixels), steps and restarts.
        progress: optional `print`-like callable.
        keep_images: keep each attack's adversarial images (`x_adv`).

    Returns:
        A `ModeResult` (no groups).

    Raises:
        ValueError: an unknown mode or attack name, or a threshold outside [-1, 1].
    """
    cfg = cfg or FaceEvalConfig()
    threshold = V.check_threshold(threshold)
    say = progress or (lambda *_: None)
    x = np.asarray(x, np.float32)
    ref = np.asarray(ref, np.float32)
    results = {}
    worst = np.zeros(len(x), bool)
    for name in cfg.attacks:
        t = time.perf_counter()
        attack = build_attack(name, mode, threshold, cfg)
        runs = cfg.restarts if name in RESTARTED and cfg.random_start else 1
        ok = np.zeros(len(x), bool)
        kept = np.empty_like(x)
        for _ in range(runs):
            # A restart attacks the photos not won yet (a win is final); they take this
            # run's images: their first win, or the latest try.
            todo = ~ok
            if not todo.any():
                break
            x_adv = attack_images(model, attack, x[todo], ref[todo], batch_size=cfg.batch_size)
            kept[todo] = x_adv
            ok[todo] = succeeded(embed(model, x_adv, cfg.batch_size), ref[todo], threshold, mode)
        result = AttackResult(name, ok, runs=runs, x_adv=kept if keep_images else None)
        if name == "cw":
            l2 = np.linalg.norm((kept - x).reshape(len(x), -1), axis=1)
            result.median_l2 = float(np.median(l2[ok])) if ok.any() else float("inf")
        if name in LINF_ATTACKS:
            worst |= ok
        results[name] = result
        say(f"    {mode:13s} {name:5s} eps {cfg.eps:g}: success {result.success:.3f} "
            f"({time.perf_counter() - t:.0f} s)")
    return ModeResult(mode, results, worst)


def success_curve(model, x, ref, threshold, mode, budgets, cfg: FaceEvalConfig | None = None,
                  *, steps=None) -> Curve:
    """PGD success against the budget: one compiled attack for every budget.

    The attack is built at the largest budget and called with a per-photo
    budget; the (budget, photo) pairs run in batches of `cfg.batch_size`.

    Args:
        budgets: Linf budgets in pixels (>= 0).
        steps: PGD steps (default `cfg.curve_steps`).
        Others as `attack_suite`.

    Returns:
        A `Curve`.
    """
    cfg = cfg or FaceEvalConfig()
    budgets = [float(b) for b in budgets]
    x = np.asarray(x, np.float32)
    ref = np.asarray(ref, np.float32)
    n = len(x)
    top = max(budgets, default=0.0)
    ok = np.zeros((len(budgets), n), bool)
    if n == 0 or not budgets:
        return Curve(mode, budgets, ok)
    if top <= 0:  # no budget: the clean photos
        ok[:] = succeeded(embed(model, x, cfg.batch_size), ref, threshold, mode)
        return Curve(mode, budgets, ok)
    attack = _scaled_pgd(mode, top, steps or cfg.curve_steps, cfg)
    photo = np.tile(np.arange(n), len(budgets))
    eps = np.repeat(np.asarray(budgets, np.float32), n)
    flat = np.zeros(len(photo), bool)
    # Chunks of whole batches: the attack and the judgement run on the same photos.
    chunk = cfg.batch_size * max(1, 256 // cfg.batch_size)
    for s in range(0, len(photo), chunk):
        idx = photo[s:s + chunk]
        x_adv = attack_images(model, attack, x[idx], ref[idx], batch_size=cfg.batch_size,
                              eps=eps[s:s + chunk])
        flat[s:s + chunk] = succeeded(embed(model, x_adv, cfg.batch_size), ref[idx],
                                      threshold, mode)
    return Curve(mode, budgets, flat.reshape(len(budgets), n))


def verify_groups(gallery_emb, gallery_labels, probe_emb, probe_labels, threshold, groups, *,
                  seed=0) -> dict:
    """Clean verification per identity group: {group: GroupVerification} (empty groups skipped)."""
    out = {}
    for group, ids in groups.items():
        if not ids:
            continue
        pm = np.isin(probe_labels, ids)
        gm = np.isin(gallery_labels, ids)
        pe, pl = probe_emb[pm], probe_labels[pm]
        ge, gl = gallery_emb[gm], gallery_labels[gm]
        ia, ib, same = cross_pairs(pl, gl)
        scores = V.cosine_similarity(pe[ia], ge[ib])
        tars = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for far in FARS:
                tar = V.tar_at_far(scores, same, far)
                tars[far] = None if tar is None or np.isnan(tar) else float(tar)
        out[group] = GroupVerification(
            probes=int(pm.sum()), identities=len(ids),
            nn_accuracy=float(V.nearest_neighbour_accuracy(pe, pl, ge, gl)),
            verification_accuracy=float(V.kfold_accuracy(scores, same, folds=10, seed=seed).mean),
            accuracy_at_threshold=float(V.accuracy_at(scores, same, threshold)),
            auc=float(V.roc_auc(scores, same)) if same.any() and (~same).any() else None,
            tar_at_far=tars)
    return out


def evaluate_faces(model, gallery, probes, threshold, cfg: FaceEvalConfig | None = None, *,
                   groups=None, progress=None) -> FaceEvaluation:
    """Clean verification and attack success of one embedding model (see module doc).

    Args:
        model: embedding model, raw pixels [N, H, W, 3] float32 in [0, 255]
            -> embeddings [N, D].
        gallery: enrolment photos: `.images`, `.labels` (int [N]) and
            `.class_names` (a `tfadv.data.faces.FaceSet`).
        probes: the photos verified and attacked (labels index the same classes).
        threshold: the model's operating cosine threshold, in [-1, 1].
        cfg: attacks and budgets (pixel units); default `FaceEvalConfig()`.
        groups: optional {name: identity indices} reported besides "all"
            (e.g. {"trained": [...], "held_out": [...]}); empty ones are skipped.
        progress: optional `print`-like callable for progress lines.

    Returns:
        A `FaceEvaluation`.

    Raises:
        ValueError: the threshold is not a finite number in [-1, 1], or an
            unknown attack name.
    """
    threshold = V.check_threshold(threshold)
    cfg = cfg or FaceEvalConfig()
    say = progress or (lambda *_: None)
    n_cls = len(gallery.class_names)
    groups = {"all": list(range(n_cls)), **(groups or {})}
    g_lab, labels = np.asarray(gallery.labels), np.asarray(probes.labels)
    g_emb = embed(model, gallery.images, cfg.batch_size)
    p_emb = embed(model, probes.images, cfg.batch_size)
    refs = identity_references(g_emb, g_lab, n_cls)
    verification = verify_groups(g_emb, g_lab, p_emb, labels, threshold, groups, seed=cfg.seed)

    # The photos each mode has not won clean: those matching their own identity
    # (dodging), those not yet matching their target (impersonation).
    x = probes.images
    own = refs[labels]
    tgt = refs[impersonation_targets(labels, set(int(c) for c in g_lab))]
    refs_of = {"dodging": own, "impersonation": tgt}
    masks = {mode: ~succeeded(p_emb, refs_of[mode], threshold, mode) for mode in MODES}
    attacks = {}
    for mode in MODES:
        mask, ref = masks[mode], refs_of[mode][masks[mode]]
        say(f"  {mode}: {int(mask.sum())} photos")
        res = attack_suite(model, x[mask], ref, threshold, mode, cfg, progress=say,
                           keep_images=False)
        for group, ids in groups.items():
            sel = np.isin(labels[mask], ids)
            if group != "all" and ids and sel.any():
                res.groups[group] = sel
        attacks[mode] = res

    matched = masks["dodging"]
    t = time.perf_counter()
    search = _scaled_pgd("dodging", cfg.min_eps_max, cfg.min_eps_steps, cfg)
    me = MinimalEps(minimal_eps(search, model, x[matched], own[matched], threshold, "dodging",
                                search_steps=cfg.min_eps_search, batch_size=cfg.batch_size))
    say(f"  median minimal dodging eps {me.median} ({time.perf_counter() - t:.0f} s)")
    curves = {}
    for mode in MODES:
        t = time.perf_counter()
        curves[mode] = success_curve(model, x[masks[mode]], refs_of[mode][masks[mode]],
                                     threshold, mode, cfg.curve_eps, cfg)
        say(f"  {mode} curve: success {[round(r, 3) for r in curves[mode].success]} "
            f"({time.perf_counter() - t:.0f} s)")
    return FaceEvaluation(threshold=float(threshold), eps=cfg.eps, groups=verification,
                          matched_clean=_rate(matched), attacks=attacks, min_eps_dodging=me,
                          curves=curves)


__all__ = [
    "AttackResult", "Curve", "FaceEvaluation", "GroupVerification", "MinimalEps", "ModeResult",
    "attack_images", "attack_suite", "build_attack", "embed", "evaluate_faces",
    "identity_references", "impersonation_targets", "succeeded", "success_curve",
    "verify_groups",
]
