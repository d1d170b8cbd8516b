"""Square Attack's geometry: the p schedule and the random windows it perturbs.

Andriushchenko et al., ECCV 2020 (arXiv:1912.00049), Sec. 3.3 and Algorithms
2-3: each iteration of `tfadv.attacks.Square` changes one window covering a
fraction p of the image (a square for images, a segment for vectors); the L2
attack fills it with `bump`s (nested rectangles weighted 1/(k+1)^2). NumPy.
"""

from __future__ import annotations

import math

import numpy as np

# The iterations (out of 10,000, rescaled to the budget) after which p halves (paper, Sec. 3.3).
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of the image a window covers at `iteration` (0 = first after the start).

    `p_init / 2**k`, with k the number of `P_HALVINGS` that
    `int(iteration / queries * 10000)` exceeds (the paper's schedule for
    10,000 queries, rescaled to the budget as in AutoAttack).
    """
    it = int(iteration / queries * 10000)
    return p_init / 2 ** sum(it > t for t in P_HALVINGS)


def rings(a, b):
    """Unit-L2 [a, b] bump: nested rectangles around the centre, ring k weighted 1/(k+1)^2."""
    dist = np.maximum(np.abs(np.arange(a) - a // 2)[:, None], np.abs(np.arange(b) - b // 2))
    weights = 1.0 / np.arange(1, max(a // 2, b // 2) + 2) ** 2
    m = np.cumsum(weights[::-1])[::-1][dist]  # sum of the weights of the rectangles covering
    return m / np.sqrt(np.sum(m ** 2))


def bump(h, w, split_rows):
    """Unit-L2 [h, w] update of the L2 attack: two bumps of opposite sign, side by side."""
    if split_rows and h >= 2:
        m = np.concatenate([rings(h // 2, w), -rings(h - h // 2, w)], 0)
    elif w >= 2:
        m = np.concatenate([rings(h, w // 2), -rings(h, w - w // 2)], 1)
    else:
        m = np.ones((h, w))
    return m / np.sqrt(np.sum(m ** 2))


def random_bumps(n, h, w, rng):
    """[n, h, w, 1]: `bump`s split along rows or columns at random (the paper's transpose)."""
    rows = (rng.random(n) < 0.5)[:, None, None, None]
    return np.where(rows, bump(h, w, True)[..., None], bump(h, w, False)[..., None])


def window_shape(h, w, p, l2):
    """(height, width) of the window covering a fraction p of the H x W image: a square
    (L2: odd side >= 3; Linf: side below the image's, as in the paper), a segment for vectors."""
    square = min(h, w) > 1
    side = int(round(math.sqrt(p * h * w) if square else p * h * w))
    if l2:
        side = max(side, 3)
        side += 1 - side % 2
    longest = min(h, w) if square else max(h, w)
    side = max(min(side, longest if l2 else longest - 1), 1)
    return (side, side) if square else ((1, side) if h == 1 else (side, 1))


def corners(n, h, w, sh, sw, rng):
    return rng.integers(0, h - sh + 1, n), rng.integers(0, w - sw + 1, n)


def window_index(rows, cols, sh, sw):
    """Index of the sh x sw windows at top-left corners (rows, cols): x[at] is [n, sh, sw, C]."""
    return (np.arange(len(rows))[:, None, None], (rows[:, None] + np.arange(sh))[:, :, None],
            (cols[:, None] + np.arange(sw))[:, None, :])


def window_mask(h, w, rows, cols, sh, sw):
    """bool [n, H, W, 1]: each example's window with top-left corner (rows, cols)."""
    r = np.arange(h) - rows[:, None]
    c = np.arange(w) - cols[:, None]
    return (((r >= 0) & (r < sh))[:, :, None] & ((c >= 0) & (c < sw))[:, None, :])[..., None]
