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
    ({"nested": {"eps": 6.0}}, "nested.eps: 4.0 -> 6.0"),
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


def test_a_setting_added_since_counts_as_its_default(tmp_path):
    """A run recorded before a setting existed resumes when the setting is at its default
    (it ran as the default); another value is still a difference."""
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "backup").mkdir()
    newer = dict(CFG, guard_gap=0.4, nested={"eps": 4.0, "added": "x"})
    defaults = {"guard_gap": 0.4, "epochs": 1, "nested": {"added": "x"}}
    assert claim(tmp_path, newer, finished="metrics.json", defaults=defaults) == "resume"
    (tmp_path / RUN_FILE).write_text(json.dumps(CFG))
    with pytest.raises(ValueError, match=r"guard_gap: 0.4 -> 0.6"):
        claim(tmp_path, dict(newer, guard_gap=0.6), finished="metrics.json", defaults=defaults)
    # A recorded setting is the run's, whatever the default.
    with pytest.raises(ValueError, match=r"epochs: 5 -> 1"):
        claim(tmp_path, dict(newer, epochs=1), finished="metrics.json", defaults=defaults)


def test_an_mnist_record_from_before_guard_gap_resumes_with_the_config_defaults(tmp_path):
    """What `train_mnist` passes (its config's defaults): a run.json written before guard_gap
    existed, the other settings equal, is resumed, not refused."""
    import dataclasses

    from tfadv.config.mnist import MnistTrainConfig

    cfg = dataclasses.asdict(MnistTrainConfig(out=str(tmp_path)))
    old = {k: v for k, v in cfg.items() if k != "guard_gap"}
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    (tmp_path / "backup").mkdir()
    with pytest.raises(ValueError, match="guard_gap"):
        claim(tmp_path, cfg, finished="metrics.json")
    assert claim(tmp_path, cfg, finished="metrics.json",
                 defaults=dataclasses.asdict(MnistTrainConfig(out="elsewhere"))) == "resume"


def test_refusal_names_the_options_the_user_typed(tmp_path):
    """The message names command-line options (--lr, --eval-eps), not config fields."""
    from tfadv.config.faces import FaceFinetuneConfig
    from tfadv.config.options import option_names

    names = option_names(FaceFinetuneConfig)
    assert names["learning_rate"] == "--lr" and names["evaluation.eps"] == "--eval-eps"
    assert names["train_eps"] == "--train-eps" and "out" in names
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "backup").mkdir()
    with pytest.raises(ValueError) as err:
        claim(tmp_path, dict(CFG, learning_rate=0.002, nested={"eps": 6.0}),
              finished="metrics.json", options={"learning_rate": "--lr",
                                                 "nested.eps": "--nested-eps"})
    assert "--lr: 0.001 -> 0.002; --nested-eps: 4.0 -> 6.0" in str(err.value)


def test_mutable_nested_settings_may_change(tmp_path):
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "backup").mkdir()
    assert claim(tmp_path, dict(CFG, nested={"eps": 6.0}), finished="metrics.json",
                 mutable=("nested",)) == "resume"


def test_refused_epochs_leave_the_record_untouched(tmp_path):
    """A resume asking for fewer epochs than finished is refused before run.json changes."""
    claim(tmp_path, CFG, finished="metrics.json")
    (tmp_path / "backup").mkdir()
    (tmp_path / "history.json").write_text(json.dumps({"epoch": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match="finished 4 epochs; --epochs 2"):
        claim(tmp_path, dict(CFG, epochs=2), finished="metrics.json", mutable=("epochs",),
              epochs=2)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == CFG
    assert claim(tmp_path, dict(CFG, epochs=6), finished="metrics.json", mutable=("epochs",),
                 epochs=6) == "resume"


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


def test_resumed_runs_may_not_shrink_below_their_finished_epochs(tmp_path):
    from tfadv.runs import check_resumed_epochs

    assert check_resumed_epochs(tmp_path, 3) == 0  # no history yet
    (tmp_path / "history.json").write_text(json.dumps({"epoch": [0, 1, 2]}))
    assert check_resumed_epochs(tmp_path, 3) == 3
    with pytest.raises(ValueError, match="finished 3 epochs; --epochs 2 .* --epochs 3 or more"):
        check_resumed_epochs(tmp_path, 2)


def test_mnist_run_killed_in_its_final_evaluation_resumes_there(tmp_path, monkeypatch):
    """The backup outlives training until metrics.json is written: a run interrupted in its
    final evaluation resumes there (no epoch trains again), from a relative --out too; a
    cyclic schedule's run cannot change its epochs when resumed."""
    import dataclasses

    from tfadv.config.mnist import MnistTrainConfig
    from tfadv.recipes import mnist as R
    from tfadv.trainers.callbacks import EpochSeconds

    cfg = MnistTrainConfig(out=str(tmp_path / "run"), epochs=2, limit=200, steps=1,
                           eval_steps=1, batch_size=50, lr_schedule="cyclic", verbose=0)
    real = R.evaluate_robustness

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "evaluate_robustness", interrupted)
    with pytest.raises(KeyboardInterrupt):
        R.train_mnist(cfg)
    assert (tmp_path / "run" / "backup").is_dir()
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setattr(R, "evaluate_robustness", real)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"epochs: 2 -> 3"):
        R.train_mnist(dataclasses.replace(cfg, out="run", epochs=3))
    began = []
    monkeypatch.setattr(EpochSeconds, "on_epoch_begin", lambda self, epoch, logs=None:
                        began.append(epoch))
    metrics = R.train_mnist(dataclasses.replace(cfg, out="run"))
    assert began == []  # nothing trained again
    assert json.loads((tmp_path / "run" / "history.json").read_text())["epoch"] == [0, 1]
    assert (tmp_path / "run" / "model.keras").is_file() and "test" in metrics
    assert not (tmp_path / "run" / "backup").exists()


def test_a_bad_data_option_leaves_no_output_folder(tmp_path):
    from tfadv.config.mnist import MnistTrainConfig
    from tfadv.recipes import mnist as R

    with pytest.raises(ValueError, match="data_dir"):
        R.train_mnist(MnistTrainConfig(out=str(tmp_path / "o"), data="tfds", verbose=0))
    assert not (tmp_path / "o").exists()
