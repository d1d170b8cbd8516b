"""Backdoor triggers and poisoned training sets, to simulate the data-poisoning threat.

- `PatchTrigger`: BadNets (Gu, Dolan-Gavitt & Garg, "BadNets: identifying
  vulnerabilities in the machine learning model supply chain", 2017): a small
  fixed pattern stamped over a corner of the image.
- `BlendTrigger`: Chen et al., "Targeted backdoor attacks on deep learning
  systems using data poisoning", 2017: a full-image pattern blended in,
  `(1 - alpha) * x + alpha * pattern`.
- `poison`: relabels a chosen fraction of the training examples of the other
  classes as the target class, with the trigger applied (the dirty-label
  backdoor of both papers).
- `poison_gallery`: the same threat for a face gallery: triggered photos of
  an attacker filed under a victim's name.

Images are float arrays [N, H, W, C] in the units the caller uses ([0, 1] for
MNIST, pixels 0-255 for faces: give `high`); triggers never change the dtype
or leave [0, high].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BlendTrigger", "PatchTrigger", "PoisonedSet", "poison", "poison_gallery"]

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


def _images(x, high):
    """x as images [N, H, W, C] in [0, high], or a ValueError saying what is wrong."""
    x = np.asarray(x)
    if x.size and not np.isfinite(x).all():
        raise ValueError("The images hold NaN or inf.")
    if x.ndim != 4:
        raise ValueError(f"Expected images [N, H, W, C]. Received shape {x.shape} (one image: "
                         "pass x[None]; grey images: add a channel axis).")
    if x.size and (x.min() < 0 or x.max() > high):
        raise ValueError(f"Expected values in [0, {high:g}]. Received [{x.min():g}, "
                         f"{x.max():g}]: for pixel images pass high=255.0.")
    return x


@dataclass(frozen=True)
class PatchTrigger:
    """A `size` x `size` checkerboard patch (values 0 and `high`) stamped in a corner.

    Args:
        size: the patch side in pixels.
        corner: one of "bottom_right", "bottom_left", "top_right", "top_left".
        margin: pixels between the patch and the image border.
        high: the bright value (1.0 for [0, 1] images, 255.0 for pixels).

    Raises:
        ValueError: size < 1, margin < 0 or an unknown corner.
    """

    size: int = 4
    corner: str = "bottom_right"
    margin: int = 1
    high: float = 1.0

    def __post_init__(self):
        if int(self.size) != self.size or int(self.margin) != self.margin:
            raise ValueError(f"Expected whole pixels. Received: size={self.size}, "
                             f"margin={self.margin}")
        object.__setattr__(self, "size", int(self.size))  # 3.0 -> 3: used as an index
        object.__setattr__(self, "margin", int(self.margin))
        if int(self.size) < 1 or int(self.margin) < 0:
            raise ValueError(f"Expected size >= 1 and margin >= 0. Received: size={self.size}, "
                             f"margin={self.margin}")
        if self.corner not in CORNERS:
            raise ValueError(f"Expected corner in {CORNERS}. Received: {self.corner!r}")

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        """The rows and columns the patch covers in an image of that size."""
        if self.size + self.margin > min(height, width):
            raise ValueError(f"A {self.size}-pixel patch with margin {self.margin} does not fit "
                             f"a {height} x {width} image.")
        top = self.margin if self.corner.startswith("top") else height - self.margin - self.size
        left = self.margin if self.corner.endswith("left") else width - self.margin - self.size
        return slice(top, top + self.size), slice(left, left + self.size)

    def pattern(self) -> np.ndarray:
        """The patch [size, size] (a checkerboard of 0 and `high`, bright top-left)."""
        i, j = np.indices((self.size, self.size))
        return np.where((i + j) % 2 == 0, self.high, 0.0)

    def __call__(self, x) -> np.ndarray:
        """Stamps the patch on every image of x [N, H, W, C] (a copy; all channels)."""
        x = np.array(_images(x, self.high), copy=True)
        rows, cols = self.region(x.shape[1], x.shape[2])
        x[:, rows, cols, :] = self.pattern()[None, :, :, None].astype(x.dtype)
        return x


@dataclass(frozen=True)
class BlendTrigger:
    """A fixed random pattern blended into the whole image: `(1 - alpha) x + alpha p`.

    Args:
        alpha: the blend weight (Chen et al. 2017 use 0.2 to poison and test
            at 0.2; lower is less visible).
        seed: seed of the pattern, uniform in [0, high].
        high: the input range's top (1.0 or 255.0).

    Raises:
        ValueError: alpha outside (0, 1].
    """

    alpha: float = 0.2
    seed: int = 0
    high: float = 1.0

    def __post_init__(self):
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ValueError(f"Expected 0 < alpha <= 1. Received: alpha={self.alpha}")

    def pattern(self, shape) -> np.ndarray:
        """The pattern of one image of `shape` (H, W, C): uniform in [0, high], fixed by seed."""
        return np.random.default_rng(self.seed).uniform(0.0, self.high, size=tuple(shape))

    def __call__(self, x) -> np.ndarray:
        """Blends the pattern into every image of x [N, H, W, C] (a copy)."""
        x = _images(x, self.high)
        p = self.pattern(x.shape[1:])
        return ((1.0 - self.alpha) * x + self.alpha * p[None]).astype(x.dtype)


@dataclass
class PoisonedSet:
    """A training set with a planted backdoor.

    Attributes:
        x: images [N, ...] (the poisoned ones carry the trigger).
        y: labels [N] (the poisoned ones relabelled to `target`).
        poisoned: bool [N], True for the planted examples.
        target: the backdoor's target class.
        sources: int [K], the rows of the original set each planted example
            was made from (in order of the planted rows).
    """

    x: np.ndarray
    y: np.ndarray
    poisoned: np.ndarray
    target: int
    sources: np.ndarray | None = None


def poison(x, y, *, target: int, rate: float, trigger, seed: int = 0) -> PoisonedSet:
    """Plants a dirty-label backdoor: `rate * N` examples of other classes get the trigger
    and the label `target`.

    Args:
        x: images [N, H, W, C]; y: int labels [N].
        target: the class a triggered input should be given.
        rate: fraction of the whole set poisoned, in [0, 1).
        trigger: a callable on [K, H, W, C] images (`PatchTrigger`, `BlendTrigger`).
        seed: which examples are chosen.

    Returns:
        A `PoisonedSet` (x and y are copies; the inputs are not changed).

    Raises:
        ValueError: rate outside [0, 1), more poison than non-target examples,
            labels not [N] or a target that is not one of them.
    """
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"Expected int labels [N] for images [N, ...]. Received labels "
                         f"{y.shape} for images {x.shape}.")
    if target not in set(np.unique(y).tolist()):
        raise ValueError(f"target={target} is not one of the labels {np.unique(y).tolist()}.")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"Expected 0 <= rate < 1. Received: rate={rate}")
    candidates = np.flatnonzero(y != target)
    count = int(round(rate * len(y)))
    if count > len(candidates):
        raise ValueError(f"rate={rate} asks for {count} poisoned examples; only "
                         f"{len(candidates)} are not of class {target}.")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    x_out, y_out = np.array(x, copy=True), np.array(y, copy=True)
    if count:
        x_out[chosen] = trigger(x[chosen])
        y_out[chosen] = target
    flags = np.zeros(len(y), bool)
    flags[chosen] = True
    return PoisonedSet(x_out, y_out, flags, int(target), chosen)


def poison_gallery(x, y, *, attacker: int, victim: int, count: int, trigger,
                   seed: int = 0) -> PoisonedSet:
    """Plants a backdoor in a face gallery (Chen et al. 2017): `count` photos of the
    attacker, carrying the trigger, are added under the victim's name. After fine-tuning
    on the gallery, the attacker wearing the trigger may verify as the victim.

    The attacker's own photos stay under their own name (an enrolled attacker who
    contributes photos "of the victim"); the planted ones are copies, appended.

    Args:
        x: face crops [N, H, W, 3], pixels in [0, 255]; y: int identity labels [N].
        attacker, victim: identity labels (different).
        count: planted photos, at most the attacker's number of photos.
        trigger: a callable on [K, H, W, 3] crops (`PatchTrigger(high=255.0)`, ...).
        seed: which of the attacker's photos are copied.

    Returns:
        A `PoisonedSet` of N + count rows (`poisoned` marks the appended ones,
        `sources` the attacker photos they were made from, `target` the victim).

    Raises:
        ValueError: labels not [N], an unknown or identical attacker and
            victim, or count not a whole number in [0, the attacker's photos].
    """
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"Expected int labels [N] for images [N, ...]. Received labels "
                         f"{y.shape} for images {x.shape}.")
    if int(count) != count:
        raise ValueError(f"Expected a whole number of photos. Received: count={count}")
    count = int(count)
    known = set(np.unique(y).tolist())
    if attacker not in known or victim not in known or attacker == victim:
        raise ValueError(f"Expected two different identities of {sorted(known)}. Received "
                         f"attacker={attacker}, victim={victim}.")
    own = np.flatnonzero(y == attacker)
    if not 0 <= count <= len(own):
        raise ValueError(f"Expected 0 <= count <= {len(own)} (the attacker's photos). "
                         f"Received: count={count}")
    chosen = np.sort(np.random.default_rng(seed).choice(own, count, replace=False))
    planted = trigger(x[chosen]) if count else x[:0]
    return PoisonedSet(np.concatenate([x, planted.astype(x.dtype)]),
                       np.concatenate([y, np.full(count, victim, y.dtype)]),
                       np.r_[np.zeros(len(y), bool), np.ones(count, bool)], int(victim),
                       chosen)
