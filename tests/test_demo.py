import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tfadv.demo", "mnist", "--quick", "--epochs", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert set(summary["models"]) == {"standard", "pgd"}
    for m in summary["models"].values():
        assert 0 <= m["robust_accuracy"] <= min(m["per_attack"].values()) <= m["clean_accuracy"]
        assert m["curve"]["eps"][0] == 0.0
        # --quick evaluates and draws the curve on the same 100 digits: eps 0 is clean.
        assert m["curve"]["accuracy"][0] == pytest.approx(m["clean_accuracy"])
    assert open(summary["curve_png"], "rb").read(4) == b"\x89PNG"
    assert "robust" in out.stdout and "robustness curves" in out.stdout


@pytest.mark.slow
def test_face_demo_quick_runs_end_to_end(tmp_path):
    # The whole story: fetch (cache), pretrained eval, fine-tune, export, serve, gRPC query.
    out = subprocess.run([sys.executable, "-m", "tfadv.demo", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["served_max_abs_diff"] < 1e-4
    assert summary["served_signatures"] == ["embed_images", "embed_uint8", "serving_default",
                                             "verify", "verify_images"]
    metrics = json.load(open(summary["metrics"]))
    attacks = metrics["config"]["evaluation"]["attacks"]
    for model in ("pretrained", "finetuned"):
        for mode in ("dodging", "impersonation"):
            res = metrics[model]["attacks"][mode]["all"]
            # The worst case is the per-example OR of the Linf attacks' stored results.
            worst = np.logical_or.reduce([np.asarray(res[a]["per_example"], bool)
                                          for a in attacks if a != "cw"])
            np.testing.assert_array_equal(res["worst_case"]["per_example"], worst)
            assert res["worst_case"]["success"] == pytest.approx(worst.mean())
            assert metrics[model]["curves"][mode]["eps"] == metrics["config"]["evaluation"][
                "curve_eps"]
    assert metrics["config"]["method"] == "free" and metrics["config"]["holdout"] == 0
    assert (tmp_path / "finetuned" / "embedder.keras").is_file()
    assert (tmp_path / "serving" / "facenet" / "1" / "saved_model.pb").is_file()
    for stage in ("[1/6]", "[5/6]", "before / after", "fine-tuned"):
        assert stage in out.stdout


def test_each_demo_has_its_own_default_output(monkeypatch):
    from tfadv import cli, demo, demo_mnist

    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, *a, **k: seen.setdefault("faces", out))
    monkeypatch.setattr(demo_mnist, "run", lambda out, *a, **k: seen.setdefault("mnist", out))
    demo.main([])
    demo.main(["mnist"])
    assert seen == {"faces": "runs/demo", "mnist": "runs/demo-mnist"}
    assert cli.build_parser().parse_args(["demo"]).out == seen["faces"]
    assert demo.DEFAULT_OUT != demo_mnist.DEFAULT_OUT


def test_served_model_reports_its_signature_names(tmp_path, capsys):
    from test_export import pixels, save_embedder
    from tfadv.demo import serve_and_query
    from tfadv.export import contract as C, export_model

    _, path = save_embedder(str(tmp_path / "model"))
    base = tmp_path / "base"
    export_model(path, str(base), name="faces")
    got = serve_and_query(base, path, pixels(4), np.array([0, 1, 0, 1]), name="faces")
    names = sorted([C.SERVING_SIGNATURE, C.EMBED_UINT8_SIGNATURE, C.VERIFY_SIGNATURE])
    assert got["signatures"] == names
    assert got["max_abs_diff"] < 1e-4
    assert f"signatures: {names}" in capsys.readouterr().out


def test_before_after_table_shows_held_out_rows_only_when_people_are_held_out():
    from tfadv.demo import _table

    def model(dodging, held_out=None):
        groups = {"all": {"nn_accuracy": 1.0, "verification_accuracy": 0.99}}
        attacks = {"dodging": {"all": {"pgd": {"success": dodging},
                                       "worst_case": {"success": dodging}}}}
        if held_out is not None:
            groups["held_out"] = {"verification_accuracy": 0.98}
            attacks["dodging"]["held_out"] = {"worst_case": {"success": held_out}}
        return {"threshold": 0.3, "groups": groups, "attacks": attacks,
                "min_eps_dodging": {"median": 5.5}}

    m = {"config": {"evaluation": {"eps": 4.0}}, "pretrained": model(1.0),
         "finetuned": model(0.44)}
    table = _table(m)
    assert "held-out" not in table
    assert "dodging success PGD eps 4" in table and "0.440" in table
    assert "impersonation" not in table  # no value on either side: no row
    m["finetuned"] = model(0.44, held_out=0.9)
    lines = {line[:36].strip(): line[36:].split() for line in _table(m).splitlines()[1:]}
    assert lines["dodging, held-out people"] == ["n/a", "0.900"]
