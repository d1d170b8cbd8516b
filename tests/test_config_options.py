"""Options generated from config dataclasses (`tfadv.config.options`)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tfadv import config
from tfadv.config.centers import CentersStudyConfig
from tfadv.config.mnist import AttackEvalConfig, AutoAttackConfig, CurveConfig, MnistTrainConfig
from tfadv.config.options import (add_command, add_group, add_options, build, comma_list, commands,
                                  overrides, replace, setting)


@dataclasses.dataclass(frozen=True)
class Inner:
    eps: float = setting(4.0, help="budget")
    steps: int = setting(10, help="steps")


@dataclasses.dataclass(frozen=True)
class Outer:
    out: str = setting(help="output directory")
    rate: float = setting(0.1, flags=("--lr",), help="a 50% rate")
    sizes: tuple = setting((1,), type=comma_list(int), help="sizes")
    names: tuple = setting(("a",), choices=("a", "b", "c"), words=True, help="names")
    fast: bool = setting(False, help="go fast")
    slow: bool = setting(True, help="go slow")
    hidden: object = setting(None, cli=False, help="set by code only")
    inner: Inner = setting(default_factory=Inner, prefix="in", help="nested")
    plain: Inner = setting(default_factory=Inner, prefix="", help="nested, unprefixed")


def _parser(cls=Outer, **kwargs):
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_options(p, cls, **kwargs)
    return p


def _outer(argv):
    return build(Outer, _parser().parse_args(argv))


def test_defaults_come_from_the_class_and_only_given_options_are_read():
    args = _parser().parse_args(["--out", "o"])
    assert overrides(Outer, args) == {"out": "o"}
    assert _outer(["--out", "o"]) == Outer(out="o")


def test_tuples_take_commas_and_repeats_and_words_only_where_declared():
    assert _outer(["--out", "o", "--sizes", "1,2"]).sizes == (1, 2)
    assert _outer(["--out", "o", "--sizes", "1", "--sizes", "2,3"]).sizes == (1, 2, 3)
    with pytest.raises(SystemExit):  # "unrecognized arguments: 2"
        _parser().parse_args(["--out", "o", "--sizes", "1", "2"])
    assert _outer(["--out", "o", "--names", "b,c", "a"]).names == ("b", "c", "a")


def test_a_tuple_option_does_not_swallow_a_positional_written_after_it():
    from tfadv.cli import build_parser

    args = build_parser().parse_args(["eval", "--attack", "pgd", "m.keras", "--attack", "apgd"])
    assert args.model == "m.keras" and args.attacks == ("pgd", "apgd")
    args = build_parser().parse_args(
        ["facenet", "generate", "--preset", "p", "--out", "o", "--eps", "1", "2", "4"])
    assert args.eps == (1.0, 2.0, 4.0)


def test_tuple_choices_and_bad_items_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "o", "--names", "a,z"])
    assert "invalid choice(s) 'z'" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentError, match="comma-separated"):
        _parser().parse_args(["--out", "o", "--sizes", "1,x"])


def test_bools_scalars_and_compatibility_flags():
    cfg = _outer(["--out", "o", "--fast", "--no-slow", "--lr", "0.5"])
    assert (cfg.fast, cfg.slow, cfg.rate) == (True, False, 0.5)
    assert _outer(["--out", "o", "--rate", "0.25"]).rate == 0.25


def test_nested_configs_get_prefixed_options_and_update_field_by_field():
    cfg = _outer(["--out", "o", "--in-eps", "2", "--steps", "3"])
    assert cfg.inner == Inner(eps=2.0) and cfg.plain == Inner(steps=3)
    base = replace(Outer(out="base"), inner=Inner(eps=8.0, steps=1))
    cfg = build(Outer, _parser().parse_args(["--out", "o", "--in-steps", "5"]), base=base)
    assert cfg.inner == Inner(eps=8.0, steps=5) and cfg.out == "o"


def test_required_options_and_code_only_fields():
    with pytest.raises(SystemExit):
        _parser().parse_args([])
    assert "--hidden" not in _parser().format_help()
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "o", "--hidden", "x"])


def test_help_shows_defaults_and_survives_percent_signs():
    text = _parser().format_help()
    assert "a 50% rate (default: 0.1)" in " ".join(text.split())
    assert "--in-eps" in text and "--eps" in text


def test_a_setting_without_help_is_refused():
    @dataclasses.dataclass
    class Bad:
        x: int = 1

    with pytest.raises(TypeError, match="no help"):
        _parser(Bad)


def test_a_negated_boolean_name_is_refused():
    """argparse reads `--no-crop` as the negation of `--crop`: a field `no_crop` parsed
    `--no-crop` as False (found in `tfadv poison scan`)."""
    @dataclasses.dataclass
    class Negated:
        no_crop: bool = setting(False, help="photos are crops")

    with pytest.raises(TypeError, match="crop=True gives --no-crop"):
        _parser(Negated)


@dataclasses.dataclass(frozen=True)
class Positional:
    target: str = setting(positional=True, help="where")
    files: tuple = setting(positional=True, help="what")
    json: bool = setting(False, help="JSON lines")


@dataclasses.dataclass(frozen=True)
class OptionalPositional:
    base_dir: str | None = setting(None, positional=True, help="a directory")


def test_positional_settings():
    cfg = build(Positional, _parser(Positional).parse_args(["h:1", "--json", "a,b", "c"]))
    assert cfg == Positional(target="h:1", files=("a,b", "c"), json=True)  # no comma split
    with pytest.raises(SystemExit):
        _parser(Positional).parse_args(["h:1"])
    assert build(OptionalPositional, _parser(OptionalPositional).parse_args([])).base_dir is None
    assert build(OptionalPositional,
                 _parser(OptionalPositional).parse_args(["d"])).base_dir == "d"


def test_add_command_sets_the_handler_and_commands_lists_the_leaves():
    def handler(args):
        return None

    p = argparse.ArgumentParser(prog="t")
    sub = p.add_subparsers(dest="command", required=True)
    add_command(sub, "one", handler, configs=(Inner,), help="first")
    group = add_group(sub, "grp", help="a group", dest="grp_command")
    add_command(group, "two", handler, configs=(Outer,), help="second")
    assert [prog for prog, _ in commands(p)] == ["t one", "t grp two"]
    args = p.parse_args(["grp", "two", "--out", "o", "--in-eps", "1"])
    assert args.func is handler and args.prog == "t grp two" and args.configs == (Outer,)
    assert build(Outer, args).inner.eps == 1.0


CONFIGS = [config.MnistTrainConfig, config.AttackEvalConfig, config.CurveConfig,
           config.MnistDataConfig, config.FaceEvalConfig, config.FaceFinetuneConfig,
           config.SweepConfig, config.GenerateConfig, config.CentersStudyConfig,
           config.ExportConfig, config.ServeConfig, config.QueryConfig, config.BatchingOptions]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_shipped_config_generates_its_options(cls):
    p = _parser(cls)
    p.format_help()
    names = {f.name for f in dataclasses.fields(cls)}
    assert names  # each field declared with setting(help=...), else add_options raised


def test_serving_configs_check_their_values():
    with pytest.raises(ValueError, match="not both"):
        config.ServeConfig(base_dir="b", model_config_file="m")
    with pytest.raises(ValueError, match="BASE_DIR"):
        config.ServeConfig()
    assert config.BatchingOptions(max_batch_size=8).given() == {"max_batch_size": 8}


@pytest.mark.parametrize("make", [
    lambda: MnistTrainConfig(out="o", eps=8.0),
    lambda: AttackEvalConfig(eps=8.0),
    lambda: AutoAttackConfig(eps=8.0),
    lambda: CurveConfig(out="o", eps=(0.1, 8.0)),
    lambda: CentersStudyConfig(out="o", robust_eps=8.0),
])
def test_linf_budgets_in_pixels_are_refused_with_the_unit_value(make):
    with pytest.raises(ValueError, match=r"\[0, 1\] units.*use .*0\.03137"):
        make()


@pytest.mark.parametrize("make", [
    lambda: config.FaceEvalConfig(eps=0.03),
    lambda: config.FaceEvalConfig(curve_eps=(0.03, 4.0)),
    lambda: config.FaceFinetuneConfig(out="o", train_eps=0.03),
    lambda: config.SweepConfig(out="o", eps=(0.03,)),
    lambda: config.GenerateConfig(out="o", eps=(0.03,)),
    lambda: config.EndpointAttackConfig(target="h:1", faces="f", eps=0.03),
])
def test_face_linf_budgets_in_unit_range_are_refused_with_the_pixel_value(make):
    """Face budgets are pixels (0-255): 0.03 is under one grey level, i.e. 7.65 meant."""
    with pytest.raises(ValueError, match=r"in pixels .*under one grey level.* 7\.65"):
        make()


def test_face_budgets_of_zero_whole_pixels_or_l2_are_fine():
    assert config.FaceEvalConfig(eps=1.0, curve_eps=(0.0, 2.0)).eps == 1.0
    assert config.GenerateConfig(out="o", eps=(0.5,), norm="2").eps == (0.5,)
    assert config.EndpointAttackConfig(target="h:1", faces="f", eps=0.5, norm="2").eps == 0.5


def test_l2_budgets_above_one_are_fine():
    assert AttackEvalConfig(eps=2.0, norm="2").eps == 2.0
    assert AutoAttackConfig(eps=1.5, norm="2").eps == 1.5


def test_attacks_warn_when_the_linf_ball_covers_the_input_range():
    import warnings

    from tfadv.attacks import PGD

    with pytest.warns(UserWarning, match="larger than the whole input range"):
        PGD(eps=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PGD(eps=8.0, bounds=(0.0, 255.0))
        PGD(eps=3.0, norm="2")
