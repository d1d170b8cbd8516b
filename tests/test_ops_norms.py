import numpy as np
import pytest
import tensorflow as tf

from tfadv.ops import canonical_norm, clip_to_bounds, lp_norm, normalize_gradient, project, random_start


@pytest.mark.parametrize("spelling,expected", [
    ("inf", "inf"), ("Linf", "inf"), (np.inf, "inf"), (2, "2"), ("l2", "2"), ("2", "2"),
])
def test_canonical_norm(spelling, expected):
    assert canonical_norm(spelling) == expected


@pytest.mark.parametrize("bad", [1, "l1", None, True, -np.inf])
def test_canonical_norm_rejects(bad):
    with pytest.raises(ValueError, match="norm"):
        canonical_norm(bad)


def test_project_linf_clips_each_coordinate():
    d = tf.constant([[0.5, -0.5, 0.05], [0.0, 0.2, -0.01]])
    np.testing.assert_allclose(project(d, 0.1, "inf").numpy(), [[0.1, -0.1, 0.05], [0, 0.1, -0.01]])


def test_project_l2_scales_only_outside_ball():
    d = tf.constant([[3.0, 4.0], [0.3, 0.4]])
    out = project(d, 1.0, "2").numpy()
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


def test_project_per_example_eps():
    d = tf.constant([[1.0], [1.0]])
    np.testing.assert_allclose(project(d, tf.constant([0.5, 0.25]), "inf").numpy(), [[0.5], [0.25]])


def test_normalize_gradient():
    g = tf.constant([[3.0, -4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_gradient(g, "inf").numpy(), [[1, -1], [0, 0]])
    np.testing.assert_allclose(normalize_gradient(g, "2").numpy(), [[0.6, -0.8], [0, 0]], rtol=1e-6)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_random_start_inside_ball(norm):
    tf.random.set_seed(0)
    d = random_start(tf.constant([256, 5, 5, 1]), 0.3, norm)
    n = lp_norm(d, norm).numpy()
    assert n.max() <= 0.3 + 1e-6
    assert n.min() > 0  # not degenerate
    if norm == "inf":
        assert d.numpy().min() < -0.25 and d.numpy().max() > 0.25


def test_clip_to_bounds_none_is_identity():
    x = tf.constant([[-2.0, 3.0]])
    assert clip_to_bounds(x, None) is x
    np.testing.assert_allclose(clip_to_bounds(x, (0, 1)).numpy(), [[0, 1]])


def test_ops_keep_dtype():
    d = tf.constant([[0.5, 0.5]], tf.bfloat16)
    assert project(d, 0.1, "2").dtype == tf.bfloat16
    assert normalize_gradient(d, "2").dtype == tf.bfloat16
