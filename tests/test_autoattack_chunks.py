"""AutoAttack in chunks: exact merging, resuming from finished chunks, the CLI's --chunk."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.test_autoattack import data, linear_model, small_suite
from tfadv.evaluation import autoattack as aa


def run_chunks(model, x, y, tmp_path, key="k", **kw):
    return aa.autoattack_in_chunks(model, x, y, chunk=7, state_dir=str(tmp_path / "chunks"),
                                   key=key, eps=0.1, suite=small_suite(), seed=3, **kw)


def count_attacked_chunks(monkeypatch):
    """A list that records the size of every chunk `autoattack` is run on from now on."""
    calls = []
    real = aa.autoattack

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(aa, "autoattack", counting)
    return calls


def test_merge_is_the_chunks_put_together(tmp_path):
    model = linear_model()
    x, y = data(model, n=20)
    merged = run_chunks(model, x, y, tmp_path)
    chunks = [aa.autoattack(model, x[lo:lo + 7], y[lo:lo + 7], eps=0.1, suite=small_suite(),
                            seed=3) for lo in (0, 7, 14)]
    np.testing.assert_array_equal(merged.broken_by,
                                  np.concatenate([c.broken_by for c in chunks]))
    sizes = np.array([c.n for c in chunks])
    assert merged.n == 20 and list(sizes) == [7, 7, 6]
    for name in merged.per_attack:
        want = float(np.sum([c.per_attack[name] * c.n for c in chunks]) / 20)
        assert merged.per_attack[name] == pytest.approx(want)
        assert merged.attacked[name] == sum(c.attacked[name] for c in chunks)
    assert merged.robust_accuracy == pytest.approx(np.mean(merged.broken_by == ""))
    assert merged.clean_accuracy == pytest.approx(
        np.sum([c.clean_accuracy * c.n for c in chunks]) / 20)
    assert merged.max_perturbation == max(c.max_perturbation for c in chunks) <= 0.1 + 1e-6
    assert sorted(os.listdir(tmp_path / "chunks")) == [
        "digits_00000_00007.json", "digits_00007_00014.json", "digits_00014_00020.json"]


def test_a_resumed_run_reuses_finished_chunks_and_redoes_the_rest(tmp_path, monkeypatch):
    model = linear_model()
    x, y = data(model, n=20)
    first = run_chunks(model, x, y, tmp_path)
    calls = count_attacked_chunks(monkeypatch)
    again = run_chunks(model, x, y, tmp_path)
    assert calls == []  # all three reused
    np.testing.assert_array_equal(again.broken_by, first.broken_by)
    # A torn chunk file and another key are redone.
    (tmp_path / "chunks" / "digits_00007_00014.json").write_text('{"key": "k", "resu')
    with pytest.warns(UserWarning, match="is unreadable or incomplete; attacking examples 7-13"):
        run_chunks(model, x, y, tmp_path)
    assert calls == [7]
    with pytest.warns(UserWarning, match="was made with another model or other settings") as caught:
        run_chunks(model, x, y, tmp_path, key="other model")
    assert calls == [7, 7, 7, 6] and len(caught) == 3  # each replaced chunk is named


def test_merge_refuses_other_threat_models():
    model = linear_model()
    x, y = data(model, n=6)
    a = aa.autoattack(model, x, y, eps=0.1, suite=small_suite())
    b = aa.autoattack(model, x, y, eps=0.05, suite=small_suite(eps=0.05))
    with pytest.raises(ValueError, match="one AutoAttack run"):
        aa.merge([a, b])
    with pytest.raises(ValueError, match="at least one"):
        aa.merge([])


def test_cli_chunks_resume(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(4, 5, strides=3, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    path = str(tmp_path / "m.keras")
    model.save(path)
    cmd = [sys.executable, "-m", "tfadv.cli", "autoattack", path, "--eps", "0.05", "--n", "10",
           "--chunk", "4", "--json", "--out", str(tmp_path / "aa")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 10
    chunks = sorted(os.listdir(tmp_path / "aa" / "chunks"))
    assert chunks == ["digits_00000_00004.json", "digits_00004_00008.json",
                      "digits_00008_00010.json"]
    saved = json.loads((tmp_path / "aa" / "chunks" / chunks[0]).read_text())
    assert saved["key"]["eps"] == 0.05 and len(saved["key"]["model_sha256"]) == 64
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert json.loads(again.stdout.strip().splitlines()[-1])["broken_by"] == result["broken_by"]
    # A larger --n keeps the finished chunks of the same digits and attacks the rest.
    stamps = {c: (tmp_path / "aa" / "chunks" / c).stat().st_mtime_ns for c in chunks[:2]}
    more = subprocess.run([*cmd[:cmd.index("--n") + 1], "12", *cmd[cmd.index("--n") + 2:]],
                          capture_output=True, text=True, timeout=900)
    assert more.returncode == 0, more.stderr[-3000:]
    grown = json.loads(more.stdout.strip().splitlines()[-1])
    assert grown["n"] == 12 and grown["broken_by"][:8] == result["broken_by"][:8]
    assert {c: (tmp_path / "aa" / "chunks" / c).stat().st_mtime_ns for c in chunks[:2]} == stamps
    assert (tmp_path / "aa" / "chunks" / "digits_00008_00012.json").exists()


def test_chunks_with_missing_fields_or_other_examples_are_redone(tmp_path, monkeypatch):
    model = linear_model()
    x, y = data(model, n=20)
    first = run_chunks(model, x, y, tmp_path)
    chunks = tmp_path / "chunks"
    damaged = json.loads((chunks / "digits_00000_00007.json").read_text())
    del damaged["result"]["per_attack"]
    (chunks / "digits_00000_00007.json").write_text(json.dumps(damaged))
    # A chunk file copied over another range (same key, other digits).
    (chunks / "digits_00014_00020.json").write_text(
        (chunks / "digits_00007_00014.json").read_text())
    calls = count_attacked_chunks(monkeypatch)
    with pytest.warns(UserWarning) as caught:
        again = run_chunks(model, x, y, tmp_path)
    assert any("is unreadable or incomplete" in str(w.message) for w in caught)
    assert any("holds other examples ([7, 14])" in str(w.message) for w in caught)
    assert calls == [7, 6] and again.n == 20
    np.testing.assert_array_equal(again.broken_by, first.broken_by)
