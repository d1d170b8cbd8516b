"""`tfadv.runs.claim`: a killed run resumes only with its own settings; a finished run is kept."""

import json

import pytest

from tfadv.runs import RUN_FILE, claim

CFG = {"out": "o", "epochs": 5, "learning_rate": 0.001, "nested": {"eps": 4.0}}


def test_new_run_records_its_settings(tmp_path):
    assert claim(tmp_path / "o", CFG, finished="metrics.json") == "new"
    assert json.loads((tmp_path / "o" / RUN_FILE).read_text()) == CFG


def test_resume_with_the_same_settings_or_a_longer_run(tmp_path):
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "backup").mkdir()
    assert claim(tmp_path, CFG, finished="metrics.json") == "resume"
    longer = dict(CFG, epochs=9)
    assert claim(tmp_path, longer, finished="metrics.json", mutable=("epochs",)) == "resume"
    assert json.loads((tmp_path / RUN_FILE).read_text())["epochs"] == 9


@pytest.mark.parametrize("change, named", [
    ({"learning_rate": 0.005}, "learning_rate: 0.001 -> 0.005"),
    ({"nested": {"eps": 6.0}}, "nested: {'eps': 4.0} -> {'eps': 6.0}"),
    ({"extra": 1}, "extra: (unset) -> 1"),
    ({"epochs": 9}, "epochs: 5 -> 9"),  # not declared mutable here
])
def test_resume_with_other_settings_is_refused_and_names_them(tmp_path, change, named):
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "backup").mkdir()
    with pytest.raises(ValueError, match="holds a killed run with other settings") as err:
        claim(tmp_path, dict(CFG, **change), finished="metrics.json")
    assert named in str(err.value)
    # Nothing was touched: the recorded settings are the killed run's.
    assert json.loads((tmp_path / RUN_FILE).read_text()) == CFG


def test_backup_from_before_settings_were_recorded_resumes(tmp_path):
    (tmp_path / "backup").mkdir()
    assert claim(tmp_path, CFG, finished="metrics.json") == "resume"


def test_finished_run_is_kept_unless_overwrite(tmp_path):
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds a finished run.*--overwrite"):
        claim(tmp_path, CFG, finished="metrics.json")
    assert claim(tmp_path, dict(CFG, learning_rate=0.1), finished="metrics.json",
                 overwrite=True) == "overwrite"
    assert json.loads((tmp_path / RUN_FILE).read_text())["learning_rate"] == 0.1


def test_state_reused_when_finished_is_none_and_a_file_backup(tmp_path):
    """Benchmarks reuse finished state (no finished-run check); a file can be the backup."""
    claim(tmp_path, CFG, finished=None, backup="epochs.json")
    (tmp_path / "epochs.json").write_text("{}")
    assert claim(tmp_path, CFG, finished=None, backup="epochs.json") == "resume"
    with pytest.raises(ValueError, match="seed"):
        claim(tmp_path, dict(CFG, seed=1), finished=None, backup="epochs.json")
