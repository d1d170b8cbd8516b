"""Auto-PGD (Croce & Hein, ICML 2020): the step-size-free PGD that starts AutoAttack."""

from __future__ import annotations

import math

import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.base import Attack, _check_number, call_model, input_gradient
from tfadv.ops import norms


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step size.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06);
    checkpoints are ceil(p_j * steps) for p_j <= 1.
    """
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    # round() first: 0.57 * 100 is 57.000000000000007 in floating point.
    points = sorted({int(math.ceil(round(pj * steps, 6))) for pj in p[1:]})
    return [w for w in points if 0 < w < steps]


class APGD(Attack):
    """Auto-PGD with cross-entropy (APGD-CE) or DLR loss.

    PGD with momentum (alpha = 0.75) whose step size starts at `2 * eps` and is
    halved at checkpoints when progress stalls (fewer than `rho` of the steps
    since the last checkpoint raised the loss, or the best loss and the step
    size did not change), restarting from the best point found. No step size
    to tune, which makes it a reliable evaluation attack.

    Returns, per example, the first iterate the model misclassifies (for
    targeted: classifies as the target), else the iterate of highest loss.
    With an objective whose target is not class labels ("kl", a custom
    callable), success is not defined and the iterate of highest loss is
    returned.

    Args:
        eps: budget; steps: iterations (100 in the paper).
        norm: "inf" or "2".
        objective: "ce" (APGD-CE, default) or "dlr" (APGD-DLR).
        rho: checkpoint condition threshold (0.75).
        alpha: weight of the new step against the previous one (0.75;
            1.0 disables momentum).
        random_start: start from a random point of the ball.
        targeted, bounds: as PGD.
        eot_iter: forward passes each gradient is averaged over
            (expectation over transformation; AutoAttack's "rand" version
            uses 20 for randomised models, 1 otherwise).

    Example:
        >>> x_adv = APGD(eps=0.3, steps=100)(model, x, y)
    """

    name = "apgd"

    def __init__(
        self,
        *,
        eps,
        steps=100,
        norm="inf",
        objective="ce",
        rho=0.75,
        alpha=0.75,
        random_start=True,
        targeted=False,
        bounds=(0.0, 1.0),
        eot_iter=1,
    ):
        super().__init__(eps=eps, norm=norm, bounds=bounds, targeted=targeted, objective=objective)
        _check_number("steps", steps, minimum=1, integer=True)
        _check_number("rho", rho, minimum=0)
        _check_number("alpha", alpha, minimum=0)
        _check_number("eot_iter", eot_iter, minimum=1, integer=True)
        if alpha > 1:
            raise ValueError(f"Expected 0 <= alpha <= 1. Received: alpha={alpha}")
        self.steps = int(steps)
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.random_start = bool(random_start)
        self.eot_iter = int(eot_iter)

    def _loss_and_gradient(self, model, target, objective, sign):
        """`x -> (sign * loss [N], outputs, sign * gradient)`, averaged over `eot_iter`
        forward passes (expectation over transformation, for randomised models)."""

        def f(x_in):
            loss, out, grad = input_gradient(model, x_in, target, objective, direction_only=True)
            for _ in range(self.eot_iter - 1):
                more_loss, _, more_grad = input_gradient(model, x_in, target, objective,
                                                         direction_only=True)
                loss, grad = loss + more_loss, grad + more_grad
            return sign * loss / self.eot_iter, out, sign * grad

        return f

    def perturb(self, model, x, y, objective, scale):
        # Success (misclassified, or classified as the target) needs class labels:
        # with an objective that takes another target (KL's probabilities, a
        # custom callable) APGD returns the iterate of highest loss instead,
        # unless a subclass defines its own success (embeddings at a threshold).
        tracks = (objectives_lib.targets_labels(objective)
                  or type(self).is_success is not APGD.is_success)

        def success(out):
            if not tracks:
                return tf.zeros([tf.shape(out)[0]], tf.bool)
            return self.is_success(out, y)

        f = self._loss_and_gradient(model, y, objective, -1.0 if self.targeted else 1.0)
        found, x_found, x_best = self._search(f, success, x, scale)
        bshape = [-1] + [1] * (len(x.shape) - 1)
        return tf.where(tf.reshape(found, bshape), x_found, x_best)

    def _search(self, f, success, x, scale):
        """The APGD loop: ascends `f` from x; returns (found [N] bool, the first
        successful iterate, the iterate of highest loss)."""
        dtype = x.dtype
        eps = tf.constant(self.eps, dtype) * scale
        n = tf.shape(x)[0]
        bshape = [-1] + [1] * (len(x.shape) - 1)

        x0 = x
        if self.random_start and self.eps > 0:
            x0 = norms.clip_to_bounds(
                x + norms.random_start(tf.shape(x), eps, self.norm, dtype), self.bounds
            )
        loss0, out0, grad0 = f(x0)
        found0 = success(out0)

        ckpts = apgd_checkpoints(self.steps)
        is_ckpt = [False] * (self.steps + 1)
        interval = [0.0] * (self.steps + 1)
        prev = 0
        for w in ckpts:
            is_ckpt[w] = True
            interval[w] = float(w - prev)
            prev = w
        is_ckpt_t = tf.constant(is_ckpt)
        interval_t = tf.constant(interval, tf.float32)

        state = dict(
            k=tf.constant(0),
            x_k=x0,
            x_prev=x0,
            loss_k=loss0,
            grad_k=grad0,
            eta=2.0 * tf.broadcast_to(tf.reshape(tf.cast(eps, tf.float32), [-1]), [n]),
            x_best=x0,
            loss_best=loss0,
            grad_best=grad0,
            count=tf.zeros([n], tf.float32),
            loss_best_ckpt=loss0,
            reduced_ckpt=tf.ones([n], tf.bool),
            found=found0,
            x_found=x0,
        )

        def body(s):
            eta = tf.reshape(tf.cast(s["eta"], dtype), bshape)
            step_dir = norms.normalize_gradient(s["grad_k"], self.norm)
            z = self._project(s["x_k"] + eta * step_dir, x, eps)
            # The first step has no history: a plain projected step.
            a = tf.where(s["k"] > 0, tf.constant(self.alpha, dtype), tf.constant(1.0, dtype))
            x_new = self._project(
                s["x_k"] + a * (z - s["x_k"]) + (1 - a) * (s["x_k"] - s["x_prev"]), x, eps
            )
            loss_new, out_new, grad_new = f(x_new)
            k1 = s["k"] + 1

            newly = success(out_new) & ~s["found"]
            x_found = tf.where(tf.reshape(newly, bshape), x_new, s["x_found"])
            found = s["found"] | newly

            count = s["count"] + tf.cast(loss_new > s["loss_k"], tf.float32)
            better = loss_new > s["loss_best"]
            bmask = tf.reshape(better, bshape)
            x_best = tf.where(bmask, x_new, s["x_best"])
            grad_best = tf.where(bmask, grad_new, s["grad_best"])
            loss_best = tf.where(better, loss_new, s["loss_best"])

            at_ckpt = is_ckpt_t[k1]
            cond1 = count < self.rho * interval_t[k1]
            cond2 = (~s["reduced_ckpt"]) & (s["loss_best_ckpt"] >= loss_best)
            reduce = at_ckpt & (cond1 | cond2)
            rmask = tf.reshape(reduce, bshape)
            eta_new = tf.where(reduce, s["eta"] / 2.0, s["eta"])
            x_k = tf.where(rmask, x_best, x_new)
            grad_k = tf.where(rmask, grad_best, grad_new)
            loss_k = tf.where(reduce, loss_best, loss_new)
            return dict(
                k=k1,
                x_k=x_k,
                x_prev=s["x_k"],
                loss_k=loss_k,
                grad_k=grad_k,
                eta=eta_new,
                x_best=x_best,
                loss_best=loss_best,
                grad_best=grad_best,
                count=tf.where(at_ckpt, tf.zeros_like(count), count),
                loss_best_ckpt=tf.where(at_ckpt, loss_best, s["loss_best_ckpt"]),
                reduced_ckpt=tf.where(at_ckpt, reduce, s["reduced_ckpt"]),
                found=found,
                x_found=x_found,
            )

        (s,) = tf.while_loop(lambda s: s["k"] < self.steps, lambda s: (body(s),), [state])
        return s["found"], s["x_found"], s["x_best"]

    def is_success(self, outputs, y):
        """Per-example success: misclassified (untargeted) or classified as y (targeted)."""
        pred = tf.argmax(outputs, axis=-1, output_type=tf.int64)
        labels = tf.cast(y, tf.int64)
        return tf.equal(pred, labels) if self.targeted else tf.not_equal(pred, labels)

    def get_config(self):
        config = super().get_config()
        config.update(
            steps=self.steps, rho=self.rho, alpha=self.alpha, random_start=self.random_start,
        )
        if self.eot_iter != 1:
            # Only when set: the configs (and the run keys of saved results) of attacks on
            # deterministic models are those of the versions before EOT.
            config["eot_iter"] = self.eot_iter
        return config


def dlr_targeted(logits, labels, targets):
    """Targeted DLR loss of Croce & Hein (2020), ascended by APGD-T.

    `-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`: raising it moves the
    target logit z_t above the true logit z_y; like DLR it is invariant to
    shifting and scaling the logits.

    Args:
        logits: [N, C] with C >= 4; labels, targets: [N] int class indices.

    Returns:
        float32 [N] (float64 for float64 logits).

    Raises:
        ValueError: fewer than 4 classes.
    """
    logits = tf.convert_to_tensor(logits)
    logits = logits if logits.dtype == tf.float64 else tf.cast(logits, tf.float32)
    objectives_lib.check_num_classes(
        logits, "targeted DLR", 4,
        'APGD-T needs 4 classes for its denominator; with fewer, use APGD with '
        'objective="dlr" (3 classes) or "margin".')
    z_y = tf.gather(logits, tf.cast(labels, tf.int32), axis=-1, batch_dims=1)
    z_t = tf.gather(logits, tf.cast(targets, tf.int32), axis=-1, batch_dims=1)
    z = tf.sort(logits, axis=-1, direction="DESCENDING")
    return -(z_y - z_t) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


class APGDT(APGD):
    """APGD-T, AutoAttack's targeted APGD (Croce & Hein, ICML 2020).

    For each of the `num_targets` classes the model ranks highest after the
    true one (on the clean input), runs APGD on the targeted DLR loss
    (`dlr_targeted`) toward that class; an example is broken as soon as any
    run makes the model misclassify it (any wrong class counts, as in
    AutoAttack). Returns per example the first misclassified iterate, else
    the last target's iterate of highest loss.

    `y` holds the TRUE labels: the targets are chosen by the attack. (To
    attack toward given target labels, use `APGD(targeted=True)`.)

    Args:
        eps, steps, norm, rho, alpha, random_start, bounds, eot_iter: as APGD
            (AutoAttack: 100 steps).
        num_targets: how many target classes to try (AutoAttack: 9; capped
            at C - 1).
        target_ranks: optional explicit ranks to try, 1 = the class ranked
            highest after the true one (default 1..num_targets). The
            AutoAttack evaluator uses it to run one target at a time on the
            examples still standing.

    Raises:
        ValueError: invalid hyper-parameters; a model with fewer than 4 classes.

    Example:
        >>> x_adv = APGDT(eps=0.3)(model, x, y)
    """

    name = "apgd_t"

    def __init__(self, *, eps, steps=100, norm="inf", num_targets=9, target_ranks=None,
                 rho=0.75, alpha=0.75, random_start=True, bounds=(0.0, 1.0), eot_iter=1):
        super().__init__(eps=eps, steps=steps, norm=norm, objective="ce", rho=rho, alpha=alpha,
                         random_start=random_start, targeted=False, bounds=bounds,
                         eot_iter=eot_iter)
        _check_number("num_targets", num_targets, minimum=1, integer=True)
        self.num_targets = int(num_targets)
        if target_ranks is not None:
            ranks = tuple(int(r) for r in target_ranks)
            if not ranks or any(r < 1 for r in ranks) or any(float(r) != float(q) for r, q in
                                                             zip(ranks, target_ranks)):
                raise ValueError(f"Expected target_ranks to be integers >= 1 (1 = the class "
                                 f"ranked highest after the true one). Received: {target_ranks!r}")
            target_ranks = ranks
        self.target_ranks = target_ranks

    @property
    def ranks(self) -> tuple:
        """The target ranks this attack tries, in order."""
        return self.target_ranks or tuple(range(1, self.num_targets + 1))

    def perturb(self, model, x, y, objective, scale):
        clean = tf.stop_gradient(call_model(model, x))
        num_classes = objectives_lib.check_num_classes(
            clean, "targeted DLR", 4,
            'APGD-T needs 4 classes for its denominator; with fewer, use APGD with '
            'objective="dlr" (3 classes) or "margin".')
        labels = tf.cast(y, tf.int64)
        # Classes by clean logit, the true class pushed to the end.
        order = tf.argsort(
            tf.cast(clean, tf.float32) - 1e30 * tf.one_hot(labels, tf.shape(clean)[-1]),
            axis=-1, direction="DESCENDING", stable=True)
        bshape = [-1] + [1] * (len(x.shape) - 1)
        found = tf.zeros([tf.shape(x)[0]], tf.bool)
        x_out = x
        ranks = [r for r in self.ranks if num_classes is None or r <= int(num_classes) - 1]
        for rank in ranks:
            targets = tf.cast(order[:, rank - 1], tf.int64)

            def objective_t(outputs, target, targets=targets):
                return dlr_targeted(outputs, target, targets)

            f = self._loss_and_gradient(model, labels, objective_t, 1.0)
            done, x_found, x_best = self._search(
                f, lambda out: self.is_success(out, labels), x, scale)
            newly = done & ~found
            # The first success is kept; until then, this target's best iterate.
            x_out = tf.where(tf.reshape(newly, bshape), x_found,
                             tf.where(tf.reshape(found, bshape), x_out, x_best))
            found = found | done
        return x_out

    def get_config(self):
        config = super().get_config()
        for key in ("targeted", "objective"):
            config.pop(key)
        config.update(num_targets=self.num_targets,
                      target_ranks=None if self.target_ranks is None else list(self.target_ranks))
        return config
