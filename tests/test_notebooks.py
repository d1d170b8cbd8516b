"""Executes the example notebooks end to end, with tiny settings, and checks their results."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PGD_NOTEBOOK = NOTEBOOKS / "01_pgd_adversarial_training.ipynb"

# A few hundred digits, one epoch and a tiny evaluation: a smoke run of every cell.
TINY = {
    "TFADV_NB_EPOCHS": "1",
    "TFADV_NB_LIMIT": "300",
    "TFADV_NB_EVAL_LIMIT": "100",
    "TFADV_NB_CHECK_LIMIT": "50",
    "TFADV_NB_APGD_STEPS": "10",
    "TFADV_NB_CURVE_EPS": "0,0.2,0.4",
}
PYTHON_NAMES = {"python", "python{}".format(*sys.version_info),
                "python{}.{}".format(*sys.version_info)}


def _use_this_python_for_kernel(tmp_path, monkeypatch):
    """Makes the kernel named "python3" run `sys.executable` (this venv's interpreter).

    ipykernel ships a "python3" spec in the venv whose argv[0] is "python", which
    jupyter_client replaces with `sys.executable`. If that spec is not what
    resolves (e.g. a user-level "python3" kernel points elsewhere), a spec for
    this interpreter is put first on JUPYTER_PATH for this test only.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        argv0 = None
    if argv0 in PYTHON_NAMES:  # jupyter_client runs sys.executable for these
        return
    if argv0 and os.path.realpath(argv0) == os.path.realpath(sys.executable):
        return
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tfadv tests)",
        "language": "python",
    }))
    old = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    paths = [str(tmp_path / "jupyter")] + old
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(paths))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


def _execute(path, out_dir, tmp_path, monkeypatch, env, timeout=300):
    _use_this_python_for_kernel(tmp_path, monkeypatch)
    # The kernel inherits this process's environment.
    for key, value in {**env, "TFADV_NB_OUT": str(out_dir), "TF_CPP_MIN_LOG_LEVEL": "3",
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return nb


def test_committed_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name} has stored outputs; clear them before committing"
                )


@pytest.mark.slow
def test_pgd_adversarial_training_notebook(tmp_path, monkeypatch):
    out = tmp_path / "out"
    nb = _execute(PGD_NOTEBOOK, out, tmp_path, monkeypatch, TINY)

    # Two figures shown inline: the training history and the robustness curve.
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 2

    for name in ("mnist_cnn_pgd.keras", "robustness_curve.png", "history.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("robustness_curve.png", "history.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["epochs"] == 1 and s["settings"]["limit"] == 300

    # Plain fit() recorded clean and robust validation metrics, one value per epoch.
    hist = s["history"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_robust_accuracy",
                "val_robust_loss", "train_eps"):
        assert len(hist[key]) == 1, key
    for key in ("accuracy", "val_accuracy", "val_robust_accuracy"):
        assert 0.0 <= hist[key][0] <= 1.0
    assert all(np.isfinite(hist["loss"] + hist["val_loss"] + hist["val_robust_loss"]))
    # One epoch with a 3-epoch warm-up trains at a third of the budget.
    assert hist["train_eps"][0] == pytest.approx(0.1)

    # Worst case over attacks: never above clean accuracy nor any single attack.
    ev = s["evaluation"]
    assert ev["n"] == 100
    assert set(ev["per_attack"]) == {"pgd", "apgd"}
    worst_single = min(ev["per_attack"].values())
    assert 0.0 <= ev["robust_accuracy"] <= worst_single <= ev["clean_accuracy"] <= 1.0

    checks = s["checks"]
    assert checks["ok"] == (checks["problems"] == [])
    assert checks["measurements"]["fraction_nonfinite_gradients"] == 0.0
    assert checks["measurements"]["outputs_look_like_probabilities"] is False

    # The curve is evaluated on the same digits: at eps 0 it is the clean accuracy.
    curve = s["curve"]
    assert curve["eps"] == [0.0, 0.2, 0.4] and curve["n"] == 100
    assert curve["accuracy"][0] == pytest.approx(ev["clean_accuracy"])
    assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])

    # The saved base model reloads in safe mode, outside the notebook, and is the model evaluated.
    assert s["reload"]["max_abs_logit_diff"] < 1e-5
    import keras

    from tfadv.data import load_mnist, subset

    model = keras.saving.load_model(out / "mnist_cnn_pgd.keras", safe_mode=True)
    x, y = subset(*load_mnist("embedded", "test"), 100, seed=0)
    logits = model.predict(x, verbose=0)
    assert logits.shape == (100, 10)
    # Other batch sizes than the notebook's may flip a near-tie: allow one digit of 100.
    clean = float(np.mean(np.argmax(logits, -1) == y))
    assert clean == pytest.approx(ev["clean_accuracy"], abs=0.0101)


CENTERS_NOTEBOOK = NOTEBOOKS / "02_center_loss_inverse_adversaries.ipynb"

# One epoch on a few hundred digits for Models A and B, and a one-epoch study of all four models.
CENTERS_TINY = {
    "TFADV_NB_EPOCHS": "1",
    "TFADV_NB_LIMIT": "300",
    "TFADV_NB_EVAL_LIMIT": "100",
    "TFADV_NB_UIAT_EPOCHS": "1",
    "TFADV_NB_STUDY_EPOCHS": "1",
    "TFADV_NB_STUDY_LIMIT": "200",
    "TFADV_NB_STUDY_EVAL_LIMIT": "50",
    "TFADV_NB_STUDY_ROBUST_STEPS": "5",
}


@pytest.mark.slow
def test_center_loss_inverse_adversaries_notebook(tmp_path, monkeypatch):
    from tfadv.evaluation import centers as C

    out = tmp_path / "out"
    nb = _execute(CENTERS_NOTEBOOK, out, tmp_path, monkeypatch, CENTERS_TINY)

    # Shown inline: feature scatter, cosine heat-maps, and the study's two figures; the study's report.
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 4
    reports = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(reports) == 1 and "## What the numbers say" in reports[0]
    assert not [o for o in outputs if o.output_type == "error"]

    for name in ("summary.json", "features.png", "cosine_heatmaps.png", "study/report.md",
                 "study/results.json", "study/features.png", "study/cosine_heatmaps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("features.png", "cosine_heatmaps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    s = json.loads((out / "summary.json").read_text())
    st = s["settings"]
    assert (st["epochs"], st["limit"], st["eval_limit"], st["n_train"], st["n_test"]) == (1, 300, 100, 300, 100)
    assert st["inverse"] == {"eps": pytest.approx(4 / 255), "step_size": pytest.approx(2 / 255), "steps": 5}

    assert set(s["models"]) == {"A", "B"}
    expected_kinds = {"A": ["inverse", "clean", "uiat", "learned", "weights"],
                      "B": ["inverse", "clean", "uiat", "weights"]}
    for name, m in s["models"].items():
        assert m["kinds"] == expected_kinds[name]
        assert len(m["counts"]) == 10 and sum(m["counts"]) == 300 and min(m["counts"]) > 0
        assert 0.0 <= m["clean_accuracy"] <= 1.0
        assert m["clean_accuracy"] == m["history"]["val_accuracy"][-1]
        assert len(m["history"]["loss"]) == 1 and np.isfinite(m["history"]["loss"][0])
        assert ("center_loss" in m["history"]) == (name == "A")
        centres = {k: np.asarray(v) for k, v in m["centres"].items()}
        assert all(v.shape == (10, 2) and np.all(np.isfinite(v)) for v in centres.values())

        # Every pair of kinds, each compared class by class; the stored numbers match the centres.
        k = len(m["kinds"])
        assert len(m["comparisons"]) == k * (k - 1) // 2
        recomputed = C.compare_centers(centres)
        assert set(recomputed) == set(m["comparisons"])
        for pair, v in m["comparisons"].items():
            assert len(v["cosine"]) == 10 and len(v["mse"]) == 10
            assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in v["cosine"] + [v["cosine_mean"]]), pair
            assert all(e >= 0.0 for e in v["mse"]) and v["mse_mean"] >= 0.0
            np.testing.assert_allclose(v["cosine"], recomputed[pair]["cosine"], atol=1e-9)
            np.testing.assert_allclose(v["mse"], recomputed[pair]["mse"], rtol=1e-9, atol=1e-12)

        g = m["geometry"]
        assert g["reference_centre"] == ("learned" if name == "A" else "clean")
        assert 0.0 <= g["fraction_features_closer_to_centre"] <= 1.0
        assert g["intra_class_variance"] >= 0.0 and g["centre_distance_mean"] >= g["centre_distance_min"] >= 0.0
        assert (g["cos_shift_vs_toward_ref"] is None) == (name == "B")
        assert -1.0 - 1e-9 <= g["cos_shift_vs_weights"] <= 1.0 + 1e-9

    # The learned centres are Model A's, and the inverse centres differ from the clean ones.
    a = {k: np.asarray(v) for k, v in s["models"]["A"]["centres"].items()}
    assert not np.allclose(a["inverse"], a["clean"])

    assert len(s["heatmaps"]) == 5
    for key, m in s["heatmaps"].items():
        m = np.asarray(m)
        assert m.shape == (10, 10) and np.all(np.abs(m) <= 1.0 + 1e-9), key
    np.testing.assert_allclose(np.diag(s["heatmaps"]["A: inverse vs learned"]),
                               s["models"]["A"]["comparisons"]["inverse vs learned"]["cosine"], atol=1e-9)

    assert s["conclusions"] and all(isinstance(c, str) and c for c in s["conclusions"])

    # The packaged study ran all four models with the overrides, from the quick config.
    study = s["study"]
    assert study["n"] == {"train": 200, "test": 50}
    assert study["config"]["epochs"] == 1 and study["config"]["robust_steps"] == 5
    assert study["config"]["arch"] == "small"
    assert set(study["models"]) == {"A", "B", "C", "D"}
    for m in study["models"].values():
        assert 0.0 <= m["robust_accuracy"] <= m["clean_accuracy"] <= 1.0
        assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in m["cosine_means"].values())
    assert "inverse vs learned" in study["models"]["A"]["cosine_means"]
    assert "inverse vs learned" not in study["models"]["C"]["cosine_means"]
    assert study["verdict"] and any(v.startswith("Answer:") for v in study["verdict"])
    results = json.loads((out / "study" / "results.json").read_text())
    assert results["verdict"] == study["verdict"]


FACENET_NOTEBOOK = NOTEBOOKS / "03_robust_facenet.ipynb"

# One epoch with PGD-1, the quick evaluation on two probes per person, PGD-5 on three faces.
FACENET_TINY = {
    "TFADV_NB_EPOCHS": "1",
    "TFADV_NB_TRAIN_STEPS": "1",
    "TFADV_NB_QUICK": "1",
    "TFADV_NB_VAL_PER_PERSON": "2",
    "TFADV_NB_ATTACK_STEPS": "5",
    "TFADV_NB_ATTACK_LIMIT": "3",
}


@pytest.mark.slow
def test_robust_facenet_notebook(tmp_path, monkeypatch):
    # The notebook fetches the pretrained weights and the demo faces (a no-op when cached).
    out = tmp_path / "out"
    # The fine-tuning cell evaluates and trains InceptionResNetV1: minutes on a busy CPU.
    nb = _execute(FACENET_NOTEBOOK, out, tmp_path, monkeypatch, FACENET_TINY, timeout=1200)

    # Shown inline: the crops, the similarity matrices, the two single-face attacks, the
    # recipe's two curves and the fine-tuned attack; the recipe's report as Markdown.
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 7
    reports = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(reports) == 1 and "# Robust FaceNet: before and after" in reports[0]
    assert "![" not in reports[0]

    ft = out / "finetuned"
    for name in ("embedder.keras", "threshold.json", "report.md", "metrics.json",
                 "curve_dodging.png", "curve_impersonation.png"):
        assert (ft / name).is_file() and (ft / name).stat().st_size > 0, name
    for name in ("curve_dodging.png", "curve_impersonation.png"):
        assert (ft / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (ft / "backup").exists()

    m = json.loads((ft / "metrics.json").read_text())
    assert m["config"]["epochs"] == 1 and m["config"]["train_steps"] == 1
    assert m["config"]["evaluation"]["attacks"] == ["fgsm", "pgd"]  # FaceEvalConfig.quick()
    assert len(m["held_out"]) == 2 and len(m["identities"]) == 5
    for model in ("pretrained", "finetuned"):
        r = m[model]
        assert -1.0 <= r["threshold"] <= 1.0
        assert r["groups"]["all"]["probes"] == 10  # two probes per person
        for g in ("all", "trained", "held_out"):
            for key in ("nn_accuracy", "verification_accuracy"):
                assert 0.0 <= r["groups"][g][key] <= 1.0, (model, g, key)
        for mode in ("dodging", "impersonation"):
            res = r["attacks"][mode]["all"]
            for attack in ("fgsm", "pgd", "worst_case"):
                s = res[attack]["success"]
                assert res["n"] == 0 or 0.0 <= s <= 1.0, (model, mode, attack, s)
            # The worst case per photo is at least every single attack.
            if res["n"]:
                assert res["worst_case"]["success"] >= max(res["fgsm"]["success"],
                                                           res["pgd"]["success"])
            assert r["curves"][mode]["eps"] == [2.0, 8.0]
        assert all(v >= 0.0 for v in r["min_eps_dodging"]["values"])
    from tfadv.evaluation.verification import load_threshold

    assert load_threshold(ft) == pytest.approx(m["finetuned"]["threshold"])

    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["epochs"] == 1 and s["settings"]["attack_steps"] == 5
    assert s["held_out"] == m["held_out"]
    assert 0.0 <= s["clean"]["nn_accuracy"] <= 1.0 and 0.5 <= s["clean"]["auc"] <= 1.0
    single = s["single_face"]
    # The attacked face was accepted clean, and every perturbation stays inside the budget.
    assert single["dodging"]["cos_clean"] >= s["clean"]["threshold"]
    for key in ("dodging", "impersonation", "dodging_finetuned"):
        assert single[key]["linf"] <= 4.0 + 1e-3, key
    assert single["dodging"]["success"] == (single["dodging"]["cos_adversarial"] < s["clean"]["threshold"])
    assert single["impersonation"]["target"] != single["impersonation"]["person"]
    for model in ("pretrained", "finetuned"):
        photos = s["photos"][model]
        assert len(photos["photo"]) == 3
        assert all(isinstance(v, bool) for v in photos["dodging success"] + photos["impersonation success"])
        assert all(v >= 0.0 for v in photos["minimal dodging eps"])
    assert s["finetune"]["finetuned"]["threshold"] == pytest.approx(m["finetuned"]["threshold"])


SERVING_NOTEBOOK = NOTEBOOKS / "04_serving_and_grpc.ipynb"


@pytest.mark.slow
def test_serving_and_grpc_notebook(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_serving")
    monkeypatch.delenv("TFADV_NB_MODEL", raising=False)  # the tiny untrained embedder
    out = tmp_path / "out"
    nb = _execute(SERVING_NOTEBOOK, out, tmp_path, monkeypatch, {"TFADV_NB_NAME": "faces"})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]

    s = json.loads((out / "summary.json").read_text())
    base = out / "serving" / "faces"
    assert s["settings"]["model"] is None and s["settings"]["image_size"] == [160, 160]
    assert (out / "model" / "embedder.keras").is_file()
    assert s["settings"]["threshold"] == 0.5

    # The layout TF Serving loads, with our config files and the README beside the versions.
    ex = s["export"]
    assert [pathlib.Path(p).name for p in ex["version_dirs"]] == ["1", "2"]
    for name in ("1/saved_model.pb", "1/assets.extra/tf_serving_warmup_requests",
                 "1/assets.extra/threshold.json", "models.config", "batching_parameters.txt",
                 "README.md", "2/saved_model.pb"):
        assert (base / name).is_file(), name
    assert "1/saved_model.pb" in ex["files"]
    assert ex["signatures"] == ["embed_images", "embed_uint8", "serving_default", "verify",
                             "verify_images"]
    assert ex["saved_model_cli_ok"] and ex["savedmodel_max_diff"] < 1e-5
    cli_text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "signature_def['verify']" in cli_text

    # Three ways in, one answer: the in-process model's.
    g = s["grpc"]
    assert g["metadata"]["name"] == "faces" and g["metadata"]["version"] == 1
    assert g["metadata"]["embedding_dim"] == 32
    assert max(g["client_max_diff"], g["verify_max_diff"], g["stub_max_diff"]) < 1e-4
    assert len(g["same_person"]) == 4
    assert s["rest"]["max_diff"] < 1e-4
    assert s["rest"]["status"]["model_version_status"][0]["state"] == "AVAILABLE"

    # Bad requests: the right code and a message, and the server kept serving.
    assert {e["code"] for e in s["errors"].values()} == {"INVALID_ARGUMENT"}
    assert "float32" in s["errors"]["float64 pixels"]["details"]
    assert "160" in s["errors"]["wrong image size"]["details"]
    assert s["rest"]["bad_request"]["http_status"] == 400 and s["rest"]["bad_request"]["error"]

    # Hot reload: version 2 (another network) took over and version 1 was unloaded.
    r = s["reload"]
    assert r["versions_on_disk"] == [1, 2] and r["served_version"] == 2
    assert r["max_diff_vs_v2"] < 1e-4 and r["max_diff_vs_v1"] > 1e-3
    states = {st["version"]: st["state"] for st in r["status"]}
    assert states == {2: "AVAILABLE", 1: "END"}
    assert r["pinned_v1"].startswith("NOT_FOUND")
    assert s["after_stop"] == "UNAVAILABLE"

    readme = (base / "README.md").read_text()
    assert s["docker"].startswith("docker run") and s["docker"] in readme
    assert f"source={base.resolve()}" in s["docker"] or f"source={base}" in s["docker"]
    assert "--enable_model_warmup" in s["docker"]
