"""The peer library's embedding attacks: cleverhans 4's FGM and PGD on the cosine distance.

An independent implementation of the threat model of our embedding attacks
(`tfadv.attacks.embedding`), used by `tfadv.recipes.facenet_generate` beside
them ("cleverhans_fgsm", "cleverhans_pgd"): cleverhans ascends
`loss_fn(labels=y, logits=model(x))` (descends it when `targeted=True`), with
`loss_fn` the per-example cosine distance and the references passed as `y`.
cleverhans runs eagerly, as shipped: its Python step loop would unroll into
one large graph.
"""

from __future__ import annotations

import numpy as np

from tfadv.attacks.base import call_model
from tfadv.attacks.embedding import MODES, PIXEL_BOUNDS, cosine_distance, default_step_size
from tfadv.ops import norms

PEER_ATTACKS = ("cleverhans_fgsm", "cleverhans_pgd")


def _loss_fn(labels, logits):
    """cleverhans' keyword names for `cosine_distance(embedding, reference)`."""
    return cosine_distance(logits, labels)


def cleverhans_attack(name: str, mode: str, eps: float, *, steps: int = 20,
                      step_size: float | None = None, norm: str = "inf",
                      random_start: bool = True, bounds=PIXEL_BOUNDS):
    """A cleverhans attack on the cosine distance to a reference, and its JSON config.

    Args:
        name: "cleverhans_fgsm" (`fast_gradient_method`) or "cleverhans_pgd"
            (`projected_gradient_descent`).
        mode: "dodging" (untargeted) or "impersonation" (targeted).
        eps: budget in pixel units.
        steps, step_size, random_start: PGD (`nb_iter`, `eps_iter`,
            `rand_init`); `step_size` defaults to `default_step_size(eps, norm)`.
        norm: "inf" or "2" (any spelling `canonical_norm` accepts).
        bounds: valid pixel range (`clip_min`, `clip_max`).

    Returns:
        `(run, config)`: `run(model, x, reference) -> x_adv` (eager tensors)
        and a JSON-serialisable dict with the library, its version and the
        settings passed to it.

    Raises:
        ValueError: unknown name or mode, steps < 1, or a PGD step larger
            than eps (which cleverhans would assert).
    """
    # Imported here: only the peer path needs cleverhans, and its import costs seconds.
    import cleverhans
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    if name not in PEER_ATTACKS:
        raise ValueError(f"Unknown peer attack {name!r}. Expected one of {PEER_ATTACKS}.")
    if mode not in MODES:
        raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
    norm = norms.canonical_norm(norm)
    eps = float(eps)
    step_size = default_step_size(eps, norm) if step_size is None else float(step_size)
    targeted = mode == "impersonation"
    ch_norm = np.inf if norm == "inf" else 2
    clip_min, clip_max = (float(b) for b in bounds)
    config = {"library": "cleverhans", "version": getattr(cleverhans, "__version__", "unknown"),
              "eps": eps, "norm": norm, "targeted": targeted, "loss": "cosine_distance",
              "clip_min": clip_min, "clip_max": clip_max}
    common = dict(loss_fn=_loss_fn, clip_min=clip_min, clip_max=clip_max, targeted=targeted)

    def model_fn(model):
        return lambda x: call_model(model, x)

    if name == "cleverhans_fgsm":
        config["function"] = "fast_gradient_method"

        def run(model, x, ref):
            return fast_gradient_method(model_fn(model), x, eps, ch_norm, y=ref, **common)

        return run, config

    if int(steps) < 1:
        raise ValueError(f"Expected steps >= 1. Received: steps={steps}")
    if step_size > eps:
        raise ValueError(f"cleverhans PGD needs step_size <= eps. Received: "
                         f"step_size={step_size}, eps={eps}")
    config.update(function="projected_gradient_descent", eps_iter=step_size, nb_iter=int(steps),
                  rand_init=bool(random_start))

    def run(model, x, ref):
        return projected_gradient_descent(model_fn(model), x, eps, step_size, int(steps),
                                          ch_norm, y=ref, rand_init=bool(random_start),
                                          sanity_checks=False, **common)

    return run, config
