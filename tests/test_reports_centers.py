"""The centres study's report writer: verdicts, thresholds and the committed report."""

import json
import os

import numpy as np

from tfadv.config.centers import CentersStudyConfig
from tfadv.evaluation.centers import CentersModelResult, CentersStudyResult
from tfadv.reports import centers as R

REPORT_DIR = os.path.join(os.path.dirname(__file__), "..", "reports", "centers")


def _model(acc, var, robust=0.0, after=None, comparisons=None):
    return CentersModelResult(clean_accuracy=acc, robust_accuracy=robust,
                       robust_after=after or {"pgd_ce": robust},
                       intra_class_variance=1.0, inter_class_separation={"mean": 1.0, "min": 1.0},
                       variance_to_separation=var, comparisons=comparisons or {},
                       centers={"clean": np.zeros((10, 2), np.float32)})


def _study(n_test, **models):
    return CentersStudyResult(config=CentersStudyConfig.quick("unused"),
                              examples={"train": 1500, "test": n_test}, models=models)


def _answer(study):
    answers = [v for v in R.verdict(study) if v.startswith("Answer:")]
    assert len(answers) == 1
    return answers[0]


def test_the_quick_setting_answers_undecided():
    # What the quick setting's A and C reach: neither converged.
    quick = _study(300, A=_model(0.49, 0.02), C=_model(0.50, 0.02))
    answer = _answer(quick)
    assert answer.startswith("Answer: undecided: this setting is too small to decide")
    assert "A (0.490 clean)" in answer and "C (0.500 clean)" in answer
    assert f"below {R.CONVERGED:.2f} clean accuracy" in answer
    # One model short of converged is enough to leave the question open.
    assert _answer(_study(1000, A=_model(0.95, 0.02), C=_model(0.89, 0.02))).startswith(
        "Answer: undecided")


def test_verdicts_state_their_thresholds_next_to_the_evidence():
    full = _study(1000, A=_model(0.944, 0.0199), C=_model(0.921, 0.0271))
    lines = R.verdict(full)
    evidence = next(v for v in lines if v.startswith("Model C"))
    # Clean accuracies with their standard errors, on the number of test digits.
    se_a, se_c = R.accuracy_se(0.944, 1000), R.accuracy_se(0.921, 1000)
    assert f"0.921 ± {se_c:.3f} vs 0.944 ± {se_a:.3f}" in evidence and "1000 test" in evidence
    rule = next(v for v in lines if v.startswith("The rule:"))
    noise = R.NOISE_SES * np.hypot(se_a, se_c)
    for text in (f"{R.CONVERGED:.2f}", f"-{R.ACCURACY_TOLERANCE:.2f}", f"{noise:.3f}",
                 f"{R.COMPACTNESS_RATIO:.2f}x", "C - A = -0.023", "1.36x here"):
        assert text in rule, text
    answer = _answer(full)
    assert answer.startswith("Answer: on this evidence inverse adversaries can NOT simply "
                             "replace the learned centres (accuracy measurably lower: -0.023")
    assert "compactness 1.36x A's, above 1.25x" in answer


def test_answers_can_and_none():
    # Within two standard errors and as compact: C can replace A.
    can = _answer(_study(1000, A=_model(0.944, 0.02), C=_model(0.935, 0.024)))
    assert can.startswith("Answer: on this evidence inverse adversaries CAN replace")
    assert _answer(_study(1000, A=_model(0.95, 0.02), C=_model(0.11, 0.02))).startswith(
        "Answer: none: Model A or C did not learn")
    assert _answer(_study(1000, A=_model(0.95, 0.02))).startswith(
        "Answer: none: the question compares models A and C")
    within = R.verdict(_study(300, A=_model(0.95, 0.02), C=_model(0.94, 0.02)))
    assert any(v.startswith("The accuracy difference (-0.010) is within noise") for v in within)


def test_gradient_masking_is_reported_above_its_gap():
    after = {"pgd_ce": 0.23, "apgd_ce": 0.185, "apgd_dlr": 0.0, "pgd_margin": 0.0}
    lines = R.verdict(_study(1000, B=_model(0.95, 0.08, robust=0.0, after=after)))
    assert any("Model B: the cross-entropy attacks" in v and f"{R.MASKING_GAP:.2f}" in v
               for v in lines)
    after = {"pgd_ce": 0.03, "apgd_ce": 0.03, "apgd_dlr": 0.0, "pgd_margin": 0.0}
    lines = R.verdict(_study(1000, B=_model(0.95, 0.08, robust=0.0, after=after)))
    assert not any("cross-entropy" in v for v in lines)


def test_the_committed_report_reproduces_from_its_results():
    """The committed results rendered by this writer: the same report, line for line."""
    with open(os.path.join(REPORT_DIR, "results.json")) as f:
        saved = json.load(f)
    saved["figures"] = {k: os.path.basename(v) for k, v in saved["figures"].items()}
    study = CentersStudyResult.from_dict(saved)
    ours = R.markdown(study).splitlines()
    assert R.markdown(saved).splitlines() == ours  # the JSON form renders alike
    with open(os.path.join(REPORT_DIR, "report.md")) as f:
        committed = f.read().splitlines()
    assert ours == committed
    assert saved["verdict"] == R.verdict(study)
    answer = _answer(study)
    assert answer.startswith("Answer: on this evidence inverse adversaries CAN replace the "
                             "learned centres (clean accuracy +0.004")
    # AutoAttack (standard) for every model, D's after each of its four attacks.
    assert "| D | 0.965 | 0.758 | 0.733 | 0.732 | 0.730 | 5083 |" in committed
    assert all(study.models[m].autoattack["robust_accuracy"] == 0.0 for m in "ABC")
    assert any(v.startswith("Model D (PGD + center loss) buys robust accuracy 0.744 "
                            "(AutoAttack 0.730; A: 0.000)") for v in R.verdict(study))


def test_figures_are_drawn(tmp_path):
    rng = np.random.default_rng(0)
    centres = {"clean": rng.normal(size=(10, 2)), "inverse": rng.normal(size=(10, 2)),
               "weights": rng.normal(size=(10, 2)), "learned": rng.normal(size=(10, 2))}
    study = _study(40, A=_model(0.5, 0.1), C=_model(0.5, 0.1))
    for r in study.models.values():
        r.centers = centres
    study.features = {m: rng.normal(size=(40, 2)) for m in study.models}
    study.labels = rng.integers(0, 10, size=40)
    paths = R.write_figures(study, str(tmp_path))
    assert set(paths) == {"features", "cosine_heatmaps"}
    for p in paths.values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
