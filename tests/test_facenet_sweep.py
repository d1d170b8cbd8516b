"""The FaceNet sweep: its grid (methods, eps, steps, lr), resuming, and its ensemble."""

import json
import os

import numpy as np
import pytest

import keras
from tests.conftest import tiny_embedder
from tfadv.recipes import facenet as R
from tfadv.recipes import facenet_sweep as S


def metrics(verification, dodging, before=(0.9, 1.0)):
    def model(acc, dod):
        return {"groups": {"all": {"verification_accuracy": acc}},
                "attacks": {"dodging": {"all": {"pgd": {"success": dod}}}}}
    return {"pretrained": model(*before), "finetuned": model(verification, dodging)}


@pytest.fixture
def fake(monkeypatch):
    """finetune replaced: records each config, writes a tiny embedder, returns `outcome`."""
    calls, outcome = [], {}

    def fake_finetune(cfg, progress=True, splits=None):
        calls.append(cfg)
        model = tiny_embedder(16, 6, seed=len(calls), name=f"tiny{len(calls)}")
        os.makedirs(cfg.out, exist_ok=True)
        model.save(f"{cfg.out}/embedder.keras")
        return outcome.get(cfg.out.rsplit("/", 1)[-1], metrics(0.88, 0.3))

    monkeypatch.setattr(R, "finetune", fake_finetune)
    monkeypatch.setattr(R, "load_splits", lambda *a, **k: None)
    return calls, outcome


def test_sweep_resumes(fake, tmp_path):
    calls, _ = fake
    table = S.sweep(tmp_path / "sw", eps_list=[2.0, 4.0], steps_list=[1], lr_list=[1e-4],
                    progress=False)
    assert len(calls) == 2 and "| pgd | 2 | 1 | 0.0001 | 0.900 -> 0.880 | 1.000 -> 0.300 |" in table
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    state.pop("eps4_steps1_lr0.0001")
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(state))
    (tmp_path / "sw" / "eps4_steps1_lr0.0001" / "embedder.keras").unlink()
    S.sweep(tmp_path / "sw", eps_list=[2.0, 4.0], steps_list=[1], lr_list=[1e-4], progress=False)
    assert len(calls) == 3 and calls[-1].out.endswith("eps4_steps1_lr0.0001")


def test_sweep_grid_of_methods(fake, tmp_path):
    calls, _ = fake
    table = S.sweep(tmp_path / "sw", eps_list=[4.0], steps_list=[1, 3], lr_list=[1e-4],
                    methods=("pgd", "free", "fgsm_rs"), progress=False)
    got = [(c.out.rsplit("/", 1)[-1], c.method, c.train_steps, c.free_replays) for c in calls]
    assert got == [("eps4_steps1_lr0.0001", "pgd", 1, 4), ("eps4_steps3_lr0.0001", "pgd", 3, 4),
                   ("free_eps4_steps1_lr0.0001", "free", 10, 1),
                   ("free_eps4_steps3_lr0.0001", "free", 10, 3),
                   ("fgsm_rs_eps4_steps1_lr0.0001", "fgsm_rs", 10, 4)]
    assert all(c.train_eps == 4.0 for c in calls)
    assert table.count("\n| free | 4 |") == 2 and table.count("\n| fgsm_rs | 4 | 1 |") == 1
    with pytest.raises(ValueError, match="methods from pgd"):
        S.sweep(tmp_path / "sw2", eps_list=[4.0], methods=("fgsm",), progress=False)


def test_sweep_ensemble_of_the_best_points(fake, tmp_path):
    calls, outcome = fake
    # dodging 0.2 drops verification by 0.08 (left out); the two best within 0.05 are kept.
    outcome.update({"eps2_steps1_lr0.0001": metrics(0.82, 0.2),
                    "eps4_steps1_lr0.0001": metrics(0.88, 0.4),
                    "eps6_steps1_lr0.0001": metrics(0.86, 0.3),
                    "eps8_steps1_lr0.0001": metrics(0.89, 0.5)})
    table = S.sweep(tmp_path / "sw", eps_list=[2.0, 4.0, 6.0, 8.0], steps_list=[1],
                    lr_list=[1e-4], ensemble=2, progress=False)
    members = ["eps6_steps1_lr0.0001", "eps4_steps1_lr0.0001"]
    assert json.loads((tmp_path / "sw" / "ensemble.json").read_text())["members"] == members
    assert "mean embedding of eps6_steps1_lr0.0001, eps4_steps1_lr0.0001" in table
    ens = keras.saving.load_model(tmp_path / "sw" / "ensemble.keras", safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3)).astype("float32")
    parts = [np.asarray(R.load_embedder(tmp_path / "sw" / k / "embedder.keras")(x))
             for k in members]
    mean = parts[0] + parts[1]
    np.testing.assert_allclose(np.asarray(ens(x)),
                               mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)


def test_sweep_refusals_come_before_any_training(fake, tmp_path):
    calls, _ = fake
    with pytest.raises(ValueError, match="at most the grid's 2 points"):
        S.sweep(tmp_path / "sw", eps_list=[2.0, 4.0], steps_list=[1], ensemble=3,
                progress=False)
    with pytest.raises(ValueError, match="empty list"):
        S.sweep(tmp_path / "sw", eps_list=[], progress=False)
    assert calls == [] and not (tmp_path / "sw").exists()


def test_a_folder_holds_one_sweep_and_the_ensemble_picks_from_this_grid(fake, tmp_path):
    calls, outcome = fake
    outcome.update({"eps2_steps1_lr0.0001": metrics(0.9, 0.1),
                    "free_eps4_steps1_lr0.0001": metrics(0.9, 0.5),
                    "free_eps6_steps1_lr0.0001": metrics(0.9, 0.6)})
    S.sweep(tmp_path / "sw", eps_list=[2.0], steps_list=[1], progress=False)
    table = S.sweep(tmp_path / "sw", eps_list=[4.0, 6.0], steps_list=[1], methods=("free",),
                    ensemble=2, progress=False)
    # The earlier PGD point (dodging 0.1) is not this grid's: not in the table or ensemble.
    assert "| pgd |" not in table
    assert json.loads((tmp_path / "sw" / "ensemble.json").read_text())["members"] == [
        "free_eps4_steps1_lr0.0001", "free_eps6_steps1_lr0.0001"]
    # Other shared settings in the same folder are refused, naming them.
    with pytest.raises(ValueError, match="epochs: 3 -> 7"):
        S.sweep(tmp_path / "sw", eps_list=[4.0], steps_list=[1], methods=("free",), epochs=7,
                progress=False)
    assert len(calls) == 3
    # A member's folder deleted: what to do.
    import shutil

    shutil.rmtree(tmp_path / "sw" / "free_eps6_steps1_lr0.0001")
    with pytest.raises(FileNotFoundError, match="Remove their rows"):
        S.sweep(tmp_path / "sw", eps_list=[4.0, 6.0], steps_list=[1], methods=("free",),
                ensemble=2, progress=False)


def test_nearly_equal_budgets_are_one_point(fake, tmp_path):
    calls, _ = fake
    S.sweep(tmp_path / "sw", eps_list=[2.0, 2.0000001], steps_list=[1], progress=False)
    assert len(calls) == 1


def test_ensemble_members_says_what_was_left_out():
    rows = {"a": {"pretrained_verification": 0.9, "finetuned_verification": 0.80,
                  "finetuned_dodging": 0.1},
            "b": {"pretrained_verification": 0.9, "finetuned_verification": 0.9,
                  "finetuned_dodging": 0.4},
            "c": {"pretrained_verification": 0.9, "finetuned_verification": 0.88,
                  "finetuned_dodging": 0.4},
            "d": {"pretrained_verification": None, "finetuned_verification": None,
                  "finetuned_dodging": None}}
    # Ties on dodging go to the higher verification.
    assert S.ensemble_members(rows, 2) == ["b", "c"]
    assert S.ensemble_members(rows, 3, max_drop=0.1) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"1 qualify .*a \(verification 0.900 -> 0.800\).*"
                                         r"d \(not evaluated\)"):
        S.ensemble_members(rows, 2, max_drop=0.015)
