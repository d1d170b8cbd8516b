"""argparse value types shared by the `tfadv` commands (one message per kind of mistake)."""

from __future__ import annotations

import argparse
import math


def positive_int(text):
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def nonneg_int(text):
    """An integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}")
    return value


def port(text):
    """A TCP port: an integer in [0, 65535] (0: any free port)."""
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(
            f"expected a port in [0, 65535] (0: any free); got {text!r}")
    return value


def positive_float(text):
    """A finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0; got {text!r}")
    return value


def nonneg_float(text):
    """A finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}")
    return value


def cosine_threshold(text):
    """A cosine-similarity threshold: a finite number in [-1, 1].

    The rule is `tfadv.config.check_threshold`, the one the
    threshold files are read with.
    """
    from tfadv.config import check_threshold

    try:
        return check_threshold(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a cosine threshold, a number in [-1, 1]; got {text!r}") from None


def norm(text):
    """A perturbation norm in any usual spelling ("inf", "Linf", "l_inf", "infinity",
    "2", "L2"), returned as "inf" or "2" (`tfadv.ops.canonical_norm`)."""
    from tfadv.ops.norms import canonical_norm

    try:
        return canonical_norm(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected a norm: "inf" (also Linf, l_inf, infinity) or "2" (also L2); '
            f"got {text!r}") from None
