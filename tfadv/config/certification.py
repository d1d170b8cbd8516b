"""Settings of `tfadv certify`: randomized smoothing's certified accuracy of a classifier."""

from __future__ import annotations

from dataclasses import dataclass

from tfadv import argtypes
from tfadv.config.options import comma_list, setting


def _check_alpha_and_radii(alpha, radii, flag):
    if not 0 < alpha < 0.5:
        raise ValueError(f"Expected 0 < alpha < 0.5. Received: alpha={alpha}")
    if not radii:
        raise ValueError(f"Expected at least one radius in {flag}.")


@dataclass(frozen=True)
class CertifyConfig:
    """Cohen et al.'s CERTIFY on the first test digits (L2 radii in [0, 1] input units)."""

    sigma: float = setting(0.25, type=argtypes.positive_float,
                           help="noise standard deviation ([0, 1] units)")
    n: int = setting(100_000, type=argtypes.positive_int, help="estimation noise samples")
    n0: int = setting(100, type=argtypes.positive_int, help="selection noise samples")
    n_test: int = setting(500, type=argtypes.positive_int,
                          help="test digits to certify: a random sample (--seed), all classes")
    alpha: float = setting(0.001, type=argtypes.positive_float,
                           help="1 - confidence of every certificate")
    batch_size: int = setting(1000, type=argtypes.positive_int,
                              help="noise samples per model call")
    radii: tuple = setting((0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                           type=comma_list(argtypes.nonneg_float),
                           help="radii of the certified-accuracy table")
    seed: int = setting(0, help="seed of the noise and of the digits' sample")
    out: str | None = setting(None, help="also write certify.json, certify.md and the curve "
                                         "certify.png here")

    def __post_init__(self):
        _check_alpha_and_radii(self.alpha, self.radii, "--radii")


@dataclass(frozen=True)
class FaceCertifyConfig:
    """Center smoothing of a face embedder on the val faces (radii in pixel units, 0-255)."""

    sigma: float = setting(8.0, type=argtypes.positive_float,
                           help="noise standard deviation (pixels, 0-255)")
    radii: tuple = setting((0.0, 2.0, 4.0, 8.0), flags=("--radius",),
                           type=comma_list(argtypes.nonneg_float),
                           help="input L2 radii to certify (pixels; comma-separated)")
    n0: int = setting(400, type=argtypes.positive_int,
                      help="noise samples of each centre step (choice, check)")
    n: int = setting(1000, type=argtypes.positive_int,
                     help="noise samples of the certified radius")
    alpha: float = setting(0.01, type=argtypes.positive_float,
                           help="1 - confidence of each face's certificate")
    delta: float = setting(0.1, type=argtypes.positive_float,
                           help="center smoothing's margin (Kumar & Goldstein: 0.05; with "
                                "n0 < 1200 only delta >= 0.1 can validate a centre at "
                                "alpha 0.01)")
    batch_size: int = setting(32, type=argtypes.positive_int,
                              help="noisy faces per model call")
    limit: int | None = setting(None, type=argtypes.positive_int,
                                help="certify only the first N val faces")
    seed: int = setting(0, help="noise seed")
    out: str | None = setting(None, help="also write certify.json and certify.md here")

    def __post_init__(self):
        _check_alpha_and_radii(self.alpha, self.radii, "--radius")
        if not 0 < self.delta < 0.5:
            raise ValueError(f"Expected 0 < delta < 0.5. Received: delta={self.delta}")
