"""Center smoothing (Kumar & Goldstein 2021) against closed forms."""

import numpy as np
import pytest
from scipy.stats import ncx2, norm

from tfadv.certification.center import (NOT_CERTIFIED, CenterSmoothing, EmbeddingCertificate,
                                        certified_decisions)


def identity(x):
    return x


def test_center_of_the_identity_is_a_noisy_copy_and_its_radius_is_the_noncentral_chi_quantile():
    # The embedding is x itself on the unit sphere's tangent: points near
    # e_1 * 1000 normalise to e_1 + v / 1000 (to 1e-6), so with x = 1000 e_1 + u
    # the sphere distances are the input distances / 1000.
    d, sigma = 8, 2.0
    x = np.zeros((1, d), np.float32)
    x[0, 0] = 1000.0
    smoothing = CenterSmoothing(identity, sigma, batch_size=4096, delta=0.05, seed=1)
    eps_in, n = 1.0, 40_000
    cert = smoothing.certify(x, [eps_in], n0=4000, n=n, alpha=0.01)
    assert cert.valid[0]
    # The centre is one noisy copy x + e_c; the distances from it to fresh copies
    # are sigma * sqrt(noncentral chi2(d - 1 on the sphere's tangent, |e_c|^2 / sigma^2)).
    offset = (cert.centers[0] - np.eye(d)[0]) * 1000.0
    lam = float(offset[1:] @ offset[1:]) / sigma ** 2
    q = norm.cdf(norm.ppf(0.55) + eps_in / sigma) + np.sqrt(np.log(2 / 0.01) / (2 * n))
    expected = 3.0 * sigma * np.sqrt(ncx2.ppf(q, d - 1, lam)) / 1000.0
    np.testing.assert_allclose(cert.eps_out[0, 0], expected, rtol=0.03)
    # Sound: the smoothed embedding of x moved by eps_in (the true centre moves with
    # x) stays within eps_out of the certified one.
    moved = x + np.r_[0.0, eps_in, np.zeros(d - 2)].astype(np.float32)
    again = smoothing.certify(moved, [eps_in], n0=4000, n=n, alpha=0.01)
    assert np.linalg.norm(again.centers[0] - cert.centers[0]) <= cert.eps_out[0, 0]
    assert cert.smoothing_error[0] == pytest.approx(np.linalg.norm(offset) / 1000.0, rel=1e-3)


def test_a_radius_past_what_the_samples_can_show_is_not_certified():
    x = np.zeros((1, 4), np.float32)
    x[0, 0] = 100.0
    sigma, n = 1.0, 500
    # q = Phi(Phi^-1(0.55) + r / sigma) + sqrt(ln(200) / 1000) > 1 from r ~ 1.4 sigma.
    cert = CenterSmoothing(identity, sigma, seed=0).certify(x, [0.5, 3.0], n0=2000, n=n)
    assert np.isfinite(cert.eps_out[0, 0]) and np.isinf(cert.eps_out[0, 1])


def test_a_two_cluster_output_certifies_no_move_or_the_jump_to_the_other_cluster():
    import tensorflow as tf

    def split(x):  # a draw lands on e_1 with probability Phi(0.5) = 0.69, else on e_2
        side = tf.cast(x[:, :1] > -0.5, tf.float32)
        return tf.concat([side, 1.0 - side], axis=1)

    # Radius 0 needs the 0.55 + 0.05 quantile of the distances to the centre e_1: 0.
    # Radius 0.5 needs Phi(Phi^-1(0.55) + 0.5) + 0.05 = 0.78 > 0.69: sqrt(2), the jump.
    cert = CenterSmoothing(split, 1.0, delta=0.05, seed=0).certify(np.zeros((3, 3), np.float32),
                                                      [0.0, 0.5], n0=2000, n=2000)
    assert cert.valid.all()
    np.testing.assert_allclose(cert.centers, np.tile([[1.0, 0.0]], (3, 1)))
    np.testing.assert_allclose(cert.eps_out, np.tile([[0.0, 3 * np.sqrt(2.0)]], (3, 1)),
                               rtol=1e-6)


def test_too_few_samples_to_ever_validate_a_center_are_refused_with_the_count_needed():
    # D1 = sqrt(ln(2 / 0.005) / 200) = 0.17 > delta = 0.1: it could only abstain.
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="use n0 >= 300"):
        CenterSmoothing(identity, 1.0, seed=0).certify(x, [0.0, 0.5], n0=100, n=1000)


@pytest.mark.parametrize("x, match", [
    (np.zeros((0, 4)), "non-empty batch"), (np.zeros(4), "non-empty batch"),
    (np.full((1, 4), np.nan), "NaN"),
])
def test_bad_inputs_are_refused(x, match):
    with pytest.raises(ValueError, match=match):
        CenterSmoothing(identity, 1.0).certify(x, [0.0])


def test_certified_decisions_follow_the_distance_rule_on_the_sphere():
    # Cosine threshold 0.5 is the distance sqrt(2 - 2 * 0.5) = 1 on the unit sphere.
    angle = np.deg2rad([0.0, 50.0, 70.0, 180.0])
    centers = np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32)
    dist = 2 * np.sin(angle / 2)  # 0, 0.845, 1.147, 2
    cert = EmbeddingCertificate(centers=centers, valid=np.ones(4, bool), radii=(1.0, 2.0),
                                eps_out=np.array([[0.5, np.inf], [0.1, 0.2], [0.1, 0.2],
                                                  [0.9, 1.1]]),  # 2 - 1.1 < 1
                                smoothing_error=np.zeros(4), samples=0)
    refs = np.tile([[3.0, 0.0]], (4, 1))  # normalised by the function
    match, certified = certified_decisions(cert, refs, 0.5)
    np.testing.assert_array_equal(match, dist <= 1.0)
    np.testing.assert_array_equal(certified, [[1, NOT_CERTIFIED], [1, NOT_CERTIFIED],
                                              [0, NOT_CERTIFIED], [0, NOT_CERTIFIED]])
    with pytest.raises(ValueError, match="cosine threshold"):
        certified_decisions(cert, refs, 1.5)
    with pytest.raises(ValueError, match="one per input"):
        certified_decisions(cert, refs[:2], 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        certified_decisions(cert, np.zeros_like(refs), 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma > 0"), (dict(sigma=1.0, delta=0.5), "delta"),
    (dict(sigma=1.0, candidates=0), "candidates"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CenterSmoothing(identity, **kwargs)
