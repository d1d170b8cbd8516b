"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), and AutoAttack's FAB-T.

F. Croce, M. Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020; FAB-T as in F. Croce, M. Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", ICML 2020.
"""

from __future__ import annotations

import tensorflow as tf

from tfadv.attacks import objectives as objectives_lib
from tfadv.attacks.base import Attack, _check_number, call_model
from tfadv.ops import norms

# Restart radius (times the width of the bounds) when no eps is given and nothing was
# found yet: AutoAttack's default eps per norm.
_DEFAULT_RESTART_EPS = {"inf": 0.3, "2": 1.0}


def _in_xla_context():
    """Whether the graph being built is compiled by XLA (`jit_compile=True`)."""
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415

        return bool(control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - a private API: assume no XLA
        return False


def _flat(grad, m):
    """A gradient [m, ...] as [m, D].

    Raises:
        ValueError: the gradient is None (the model's output does not depend on x).
    """
    if grad is None:
        raise ValueError("The model's output does not depend on its input (gradient is None). "
                         "FAB needs a differentiable model that maps x to logits.")
    return tf.reshape(grad, [m, -1])


def _hyperplane_delta(t, w, s, norm, bounds):
    """The smallest-norm d with `w . d = s` and `t + d` in the box, per row.

    Args:
        t: points [N, D]; w: normals [N, D]; s: offsets [N] (all one float dtype).
        norm: "inf" or "2"; bounds: (low, high) or None (no box).

    Returns:
        d [N, D]. Where the box cannot reach the hyperplane: the box corner that gets
        closest to it (largest `w . d` toward s).

    The solution is `d_i = sign(w_i) min(lam c_i, room_i)` (c_i = 1 for Linf, |w_i|
    for L2, room_i the distance to the box face in the direction sign(w_i)), with
    `lam` the root of the concave piecewise-linear `g(lam) = sum |w_i| min(lam c_i,
    room_i) = s`: found by sorting the breakpoints room_i / c_i, evaluating g there
    by cumulative sums, counting the breakpoints below s, and solving the linear
    piece that follows.
    """
    flip = tf.where(s < 0, -tf.ones_like(s), tf.ones_like(s))
    w = w * flip[:, None]
    s = s * flip
    a = tf.abs(w)
    direction = tf.sign(w)
    c = tf.ones_like(a) if norm == "inf" else a
    if bounds is None:
        lam = tf.math.divide_no_nan(s, tf.reduce_sum(a * c, axis=1))
        return direction * lam[:, None] * c
    low, high = (tf.cast(b, t.dtype) for b in bounds)
    room = tf.maximum(tf.where(w > 0, high - t, t - low), 0.0)
    room = tf.where(w == 0, tf.zeros_like(room), room)
    brk = tf.math.divide_no_nan(room, c)
    order = tf.argsort(brk, axis=1)
    brk_s = tf.gather(brk, order, batch_dims=1)
    cau = tf.cumsum(tf.gather(a * room, order, batch_dims=1), axis=1)
    cac = tf.cumsum(tf.gather(a * c, order, batch_dims=1), axis=1)
    total = cac[:, -1:]
    g_at_brk = cau + brk_s * (total - cac)
    k = tf.reduce_sum(tf.cast(g_at_brk < s[:, None], tf.int32), axis=1)
    prev = tf.maximum(k - 1, 0)[:, None]
    cau_k = tf.where(k > 0, tf.gather(cau, prev, batch_dims=1)[:, 0], tf.zeros_like(s))
    cac_k = tf.where(k > 0, tf.gather(cac, prev, batch_dims=1)[:, 0], tf.zeros_like(s))
    lam = tf.math.divide_no_nan(s - cau_k, total[:, 0] - cac_k)
    lam = tf.where(k < tf.shape(t)[1], lam, brk_s[:, -1])  # infeasible: the box corner
    return direction * tf.minimum(lam[:, None] * c, room)


def project_hyperplane_box(points, w, b, norm, bounds=None):
    """Exact Lp projection onto `{z : w . z + b = 0}` intersected with the box `bounds`.

    Args:
        points: [N, D] float tensor; w: [N, D] normals; b: [N] offsets (same dtype).
        norm: "inf" or "2" (any spelling `tfadv.ops.norms.canonical_norm` accepts).
        bounds: (low, high) of every coordinate, or None for the plain hyperplane.

    Returns:
        [N, D]: per row the point of the intersection closest to `points` in the
        norm; where the box does not meet the hyperplane, the box corner closest to
        it. Rows with `w = 0` are returned unchanged.
    """
    s = -(tf.reduce_sum(w * points, axis=1) + b)
    bounds = None if bounds is None else tuple(float(v) for v in bounds)
    return points + _hyperplane_delta(points, w, s, norms.canonical_norm(norm), bounds)


class FAB(Attack):
    """FAB: the minimally distorted adversarial example by adaptive boundary steps.

    Each step linearises the classifier at the current point x1, takes the decision
    boundary that is closest in the linearisation (untargeted: over all other classes;
    targeted: target against the strongest other class), projects both x1 and the
    original x onto that hyperplane within the box, and moves to the convex combination
    `(1 - a)(x1 + eta d1) + a (x + eta d2)`, `a = min(|d1| / (|d1| + |d2|), alpha_max)`
    (extrapolation eta). An adversarial x1 is recorded and pulled back toward x by
    `beta` (the backward step). Restart r > 0 starts from a random point on the sphere
    of radius `min(best norm, eps) / 2` around x (no eps: 0.3 / 1.0 times the width of
    the bounds for Linf / L2 until something was found).

    Returns, per example, the smallest adversarial point found over all steps and
    restarts, and x where none was found (or, with eps, none within eps; then the
    restarts after the first attack only the examples not yet broken within eps).
    Examples the model already misclassifies (targeted: already classifies as the
    target) are returned as x. Success: `argmax(model(x_adv)) != y` (untargeted) or
    `== y` (targeted).

    Cost per step: C backward passes for C classes untargeted (the Jacobian), one
    targeted, plus two forward passes.

    Args:
        norm: "inf" or "2"; eps: optional budget in input units (None: unbounded).
        steps: iterations per restart (100); restarts: runs per example (1).
        targeted: y are target labels. alpha_max (0.1), eta (1.05), beta (0.9): the
            paper's bias toward x, extrapolation and backward step.
        final_search: steps of the paper's final search after each run (regula falsi on
            the segment from x to the best point; about 3 forward passes, it brings a
            linear model's distance from the ~0.5% above the minimum that eta and beta
            leave to ~1e-4); 0 is AutoAttack's FAB.
        bounds: valid input range, or None; seed: seed of the random restarts.

    Shape:
        x: [N, ...] float (float64 is attacked in float64, half precision in float32);
        y: [N] labels. Returns x_adv like x. Model outputs: logits [N, C], C >= 2.

    Raises:
        ValueError: invalid hyper-parameters; a model with fewer than 2 classes or no
            static number of classes; and everything `Attack.__call__` raises.

    Example:
        >>> x_adv = FAB(norm="2", steps=100)(model, x, y)
    """

    name = "fab"
    uses_eps = False

    def __init__(self, *, norm="inf", eps=None, steps=100, restarts=1, targeted=False,
                 alpha_max=0.1, eta=1.05, beta=0.9, final_search=3, bounds=(0.0, 1.0), seed=0):
        super().__init__(eps=eps, norm=norm, bounds=bounds, targeted=targeted, objective="margin")
        _check_number("steps", steps, minimum=1, integer=True)
        _check_number("restarts", restarts, minimum=1, integer=True)
        _check_number("alpha_max", alpha_max, minimum=0)
        _check_number("eta", eta, minimum=1)
        _check_number("beta", beta, minimum=0)
        _check_number("seed", seed, minimum=0, integer=True)
        _check_number("final_search", final_search, minimum=0, integer=True)
        if alpha_max > 1 or beta > 1:
            raise ValueError(f"Expected alpha_max and beta in [0, 1]. Received: "
                             f"alpha_max={alpha_max}, beta={beta}")
        self.steps, self.restarts, self.seed = int(steps), int(restarts), int(seed)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.final_search = int(final_search)

    # -- pieces --------------------------------------------------------------
    def _linearize(self, model, x1, labels, target):
        """Normal w [m, D] and value f [m] of the chosen linearised boundary at x1."""
        m = tf.shape(x1)[0]
        with tf.GradientTape(persistent=target is None) as tape:
            tape.watch(x1)
            logits = tf.cast(call_model(model, x1), x1.dtype)
            if target is not None:
                if labels is None:  # targeted FAB: against the strongest other class
                    masked = logits - 1e30 * tf.one_hot(target, tf.shape(logits)[1],
                                                        dtype=logits.dtype)
                    labels = tf.argmax(masked, axis=1, output_type=tf.int32)
                f = (tf.gather(logits, labels, batch_dims=1)
                     - tf.gather(logits, target, batch_dims=1))
                loss = tf.reduce_sum(f)
        if target is not None:
            return _flat(tape.gradient(loss, x1), m), f
        num_classes = logits.shape[-1]
        own = tf.one_hot(labels, num_classes, dtype=logits.dtype)
        # One backward pass per class: the rows of the Jacobian of f_k - f_y.
        dg = tf.stack([_flat(tape.gradient(
            logits, x1, output_gradients=tf.one_hot(tf.fill([m], k), num_classes,
                                                    dtype=logits.dtype) - own), m)
            for k in range(num_classes)], axis=1)
        del tape
        df = logits - tf.reduce_sum(logits * own, axis=1, keepdims=True)
        dual = tf.reduce_sum(tf.abs(dg), axis=2) if self.norm == "inf" else tf.norm(dg, axis=2)
        dist = tf.abs(df) / (dual + 1e-12)
        dist = tf.where(own > 0, tf.constant(float("inf"), dist.dtype), dist)
        ind = tf.argmin(dist, axis=1, output_type=tf.int32)
        return tf.gather(dg, ind, batch_dims=1), tf.gather(df, ind, batch_dims=1)

    def _success(self, logits, labels, target):
        pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return tf.not_equal(pred, labels) if labels is not None else tf.equal(pred, target)

    def _run(self, model, x0, x1, labels, target):
        """One FAB run from x1 on the examples x0 [m, ...]: (best x, best norm [m])."""
        m = tf.shape(x0)[0]
        bshape = [-1] + [1] * (len(x0.shape) - 1)
        flat0 = tf.reshape(x0, [m, -1])

        def body(k, x1, best_x, best_n):
            w, f = self._linearize(model, x1, labels, target)
            flat1 = tf.reshape(x1, [m, -1])
            s0 = -(f + tf.reduce_sum(w * (flat0 - flat1), axis=1))
            d = _hyperplane_delta(tf.concat([flat1, flat0], 0), tf.concat([w, w], 0),
                                  tf.concat([-f, s0], 0), self.norm, self.bounds)
            size = tf.maximum(norms.lp_norm(d, self.norm), 1e-8)
            a1, a2 = size[:m], size[m:]
            alpha = tf.reshape(tf.clip_by_value(a1 / (a1 + a2), 0.0, self.alpha_max), bshape)
            d1, d2 = tf.reshape(d[:m], tf.shape(x0)), tf.reshape(d[m:], tf.shape(x0))
            x_new = norms.clip_to_bounds(
                (x1 + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha, self.bounds)
            adv = self._success(call_model(model, x_new), labels, target)
            n_new = norms.lp_norm(x_new - x0, self.norm)
            better = adv & (n_new < best_n)
            best_x = tf.where(tf.reshape(better, bshape), x_new, best_x)
            best_n = tf.where(better, n_new, best_n)
            x_new = tf.where(tf.reshape(adv, bshape), x0 + self.beta * (x_new - x0), x_new)
            return k + 1, x_new, best_x, best_n

        inf = tf.fill([m], tf.constant(float("inf"), x0.dtype))
        _, _, best_x, best_n = tf.while_loop(
            lambda k, *_: k < self.steps, body, [tf.constant(0), x1, x0, inf])
        return best_x, best_n

    def _final_search(self, model, x, x_adv, active, labels, target):
        """The paper's final search: `final_search` regula-falsi steps on the segment
        from x (not adversarial) to x_adv (adversarial), keeping the adversarial end
        (never farther from x than x_adv)."""
        bshape = [-1] + [1] * (len(x.shape) - 1)
        ref = labels if labels is not None else target
        sign = 1.0 if labels is not None else -1.0

        def gap(logits):  # > 0 on the clean side of the boundary, <= 0 beyond it
            logits = tf.cast(logits, x.dtype)
            own = tf.one_hot(ref, tf.shape(logits)[1], dtype=logits.dtype)
            other = tf.reduce_max(logits - 1e30 * own, axis=1)
            return sign * (tf.reduce_sum(logits * own, axis=1) - other)

        lo_x, hi_x = x, x_adv
        g_lo, g_hi = gap(call_model(model, lo_x)), gap(call_model(model, hi_x))
        for _ in range(self.final_search):
            t = tf.math.divide_no_nan(g_lo, g_lo - g_hi)
            # 1% of the remaining segment past the estimated crossing: on the
            # adversarial side even where the estimate is exact (a linear model).
            t = tf.where((t >= 0) & (t <= 1), t + 0.01 * (1 - t), tf.ones_like(t))
            mid = norms.clip_to_bounds(lo_x + tf.reshape(t, bshape) * (hi_x - lo_x), self.bounds)
            logits = call_model(model, mid)
            adv = self._success(logits, labels, target) & active
            keep = ~adv & active
            g_mid = gap(logits)
            hi_x = tf.where(tf.reshape(adv, bshape), mid, hi_x)
            g_hi = tf.where(adv, g_mid, g_hi)
            lo_x = tf.where(tf.reshape(keep, bshape), mid, lo_x)
            g_lo = tf.where(keep, g_mid, g_lo)
        return hi_x

    def _targets(self, logits0, y):
        """(labels, target order or None, number of targets, already-broken mask)."""
        pred = tf.argmax(logits0, axis=-1, output_type=tf.int32)
        if self.targeted:
            return None, None, 1, tf.equal(pred, y)
        return y, None, 1, tf.not_equal(pred, y)

    # -- the attack ----------------------------------------------------------
    def perturb(self, model, x, y, objective, scale):
        del objective  # FAB has its own boundary geometry
        dtype = x.dtype
        n = tf.shape(x)[0]
        bshape = [-1] + [1] * (len(x.shape) - 1)
        y = tf.cast(y, tf.int32)
        logits0 = call_model(model, x)
        num_classes = objectives_lib.check_num_classes(logits0, type(self).__name__, 2)
        if num_classes is None:
            raise ValueError(f"{type(self).__name__} needs a model whose number of classes "
                             f"(the last dimension of its logits) is static.")
        labels, order, num_targets, broken = self._targets(logits0, y)
        if self.eps is None:
            floor = tf.zeros([n], dtype)
            width = 1.0 if self.bounds is None else self.bounds[1] - self.bounds[0]
            eps_r = tf.fill([n], tf.constant(_DEFAULT_RESTART_EPS[self.norm] * width, dtype))
        else:
            floor = tf.broadcast_to(tf.reshape(tf.cast(self.eps * scale, dtype), [-1]), [n])
            eps_r = floor
        best_norm = tf.where(broken, tf.zeros([n], dtype),
                             tf.fill([n], tf.constant(float("inf"), dtype)))

        xla = _in_xla_context()

        def outer(r, best_x, best_norm):
            # Runs after the first attack only what is left: a gathered subset, or
            # (under XLA, which needs static shapes) the whole batch, masked.
            active = best_norm > floor
            idx = tf.range(n, dtype=tf.int64) if xla else tf.where(active)[:, 0]
            active = tf.gather(active, idx)
            x0 = tf.gather(x, idx)
            sub_labels = None if labels is None else tf.gather(labels, idx)
            if order is None:
                target = None if labels is not None else tf.gather(y, idx)
            else:
                target = tf.gather(tf.gather(order, 1 + r // self.restarts, axis=1), idx)
            seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(r, tf.int64)])
            if self.norm == "inf":
                noise = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0, dtype=dtype)
            else:
                noise = tf.random.stateless_normal(tf.shape(x), seed, dtype=dtype)
            noise = tf.gather(norms.normalize_gradient(noise, "2") if self.norm == "2"
                              else noise / tf.reshape(norms.lp_norm(noise, "inf"), bshape), idx)
            radius = 0.5 * tf.minimum(tf.gather(best_norm, idx), tf.gather(eps_r, idx))
            start = norms.clip_to_bounds(x0 + tf.reshape(radius, bshape) * noise, self.bounds)
            x1 = tf.where(r % self.restarts > 0, start, x0)

            def attack():
                bx, bn = self._run(model, x0, x1, sub_labels, target)
                if self.final_search:
                    hit = tf.math.is_finite(bn)
                    bx = self._final_search(model, x0, bx, hit, sub_labels, target)
                    bn = tf.where(hit, norms.lp_norm(bx - x0, self.norm), bn)
                return bx, bn

            # Nothing left: no model call (Keras convolutions reject an empty batch).
            bx, bn = tf.cond(tf.reduce_any(active), attack,
                             lambda: (x0, tf.fill(tf.shape(idx), tf.constant(float("inf"), dtype))))
            better = (bn < tf.gather(best_norm, idx)) & active
            pos = idx[:, None]
            best_x = tf.tensor_scatter_nd_update(
                best_x, pos, tf.where(tf.reshape(better, bshape), bx, tf.gather(best_x, idx)))
            best_norm = tf.tensor_scatter_nd_update(
                best_norm, pos, tf.where(better, bn, tf.gather(best_norm, idx)))
            return r + 1, best_x, best_norm

        _, best_x, best_norm = tf.while_loop(
            lambda r, *_: r < self.restarts * num_targets, outer,
            [tf.constant(0), x, best_norm])
        found = best_norm <= floor if self.eps is not None else tf.math.is_finite(best_norm)
        return tf.where(tf.reshape(found & ~broken, bshape), best_x, x)

    def get_config(self):
        config = super().get_config()
        config.pop("objective")
        config.update(steps=self.steps, restarts=self.restarts, alpha_max=self.alpha_max,
                      eta=self.eta, beta=self.beta, final_search=self.final_search,
                      seed=self.seed)
        return config


class FABT(FAB):
    """FAB-T, AutoAttack's targeted FAB: y are the TRUE labels.

    For each of the `num_targets` classes with the highest clean logits after the
    top one (2nd, 3rd, ...; all other classes when the model has fewer), runs FAB
    toward that class (the boundary between it and the true class; success is
    misclassification, `argmax != y`) and keeps per example the smallest adversarial
    point over targets and restarts. With eps, later targets attack only the examples
    not yet broken within eps (as AutoAttack does). One backward pass per step, so
    it is cheaper than untargeted FAB on many classes (Croce & Hein, "Reliable
    evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks", ICML 2020).

    Args:
        num_targets: how many target classes to try (9 in AutoAttack).
        norm, eps, steps, restarts (per target), alpha_max, eta, beta, final_search,
            bounds, seed: as `FAB`.

    Raises:
        ValueError: as `FAB`, and num_targets < 1.

    Example:
        >>> x_adv = FABT(norm="inf", eps=0.3)(model, x, y)
    """

    name = "fab_t"

    def __init__(self, *, norm="inf", eps=None, steps=100, restarts=1, num_targets=9,
                 alpha_max=0.1, eta=1.05, beta=0.9, final_search=3, bounds=(0.0, 1.0), seed=0):
        super().__init__(norm=norm, eps=eps, steps=steps, restarts=restarts, targeted=False,
                         alpha_max=alpha_max, eta=eta, beta=beta, final_search=final_search,
                         bounds=bounds, seed=seed)
        _check_number("num_targets", num_targets, minimum=1, integer=True)
        self.num_targets = int(num_targets)

    def _targets(self, logits0, y):
        pred = tf.argmax(logits0, axis=-1, output_type=tf.int32)
        order = tf.argsort(logits0, axis=-1, direction="DESCENDING")
        count = min(self.num_targets, int(logits0.shape[-1]) - 1)
        return y, order, count, tf.not_equal(pred, y)

    def get_config(self):
        config = super().get_config()
        config.pop("targeted")
        config["num_targets"] = self.num_targets
        return config
