"""Atomic writes: the target is the old file or the new one, never half of it."""

import json
import os

import pytest

from tfadv import files


def test_write_json_round_trip_and_no_leftovers(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"a": [1, 2.5]})
    assert json.loads(target.read_text()) == {"a": [1, 2.5]}
    files.write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 3}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.md"
    files.write_text(target, "old")
    with pytest.raises(TypeError):
        files.write_json(target, {"x": object()})
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.md"]


def test_temporary_name_keeps_the_suffix(tmp_path):
    with files.atomic_path(tmp_path / "embedder.keras") as tmp:
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").close()
    assert (tmp_path / "embedder.keras").exists()


def test_read_json_or_empty(tmp_path):
    from tfadv.files import read_json_or_empty

    path = tmp_path / "state.json"
    assert read_json_or_empty(path) == {} and read_json_or_empty(None) == {}
    path.write_text('{"key": 1}')
    assert read_json_or_empty(path) == {"key": 1}
    path.write_text('{"key": ')  # torn by a kill
    assert read_json_or_empty(path) == {}
    path.write_text("[1, 2]")  # not an object
    assert read_json_or_empty(path) == {}
