"""Command-line options generated from the configuration dataclasses.

Every setting of a command is declared once, as a dataclass field made with
`setting(default, help=...)`; `add_options` turns the fields into argparse
options (`--field-name`, type and choices from the field, the default shown
in the help) and `overrides` reads back the options the user gave, so a
command builds its config as `dataclasses.replace(base, **overrides(...))`.

Only the standard library is imported here: `tfadv --help` stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

_MISSING = dataclasses.MISSING


def setting(default=_MISSING, *, help: str, choices=None, type=None, item=None, flags=(),
            default_factory=_MISSING, cli: bool = True, metavar=None, prefix=None):
    """A dataclass field that is also a command-line option.

    Args:
        default / default_factory: as `dataclasses.field` (neither: required).
        help: one line for `--help` (units included: pixels or [0, 1]).
        choices: allowed values (argparse checks them; the config validates again).
        type: an argparse type function (e.g. `tfadv.argtypes.positive_int`);
            default: from the field's annotation (int, float, str; tuples
            take comma-separated `item`s; bools get `--x/--no-x`).
        item: element type of a tuple field (default str).
        flags: extra option strings kept for compatibility (e.g. "--lr").
        cli: False for settings that only code sets (objects, callbacks).
        metavar: shown in the help instead of the upper-cased name.
        prefix: for a nested config field, the prefix of its options
            (default: the field name).

    Returns:
        A `dataclasses.Field`.
    """
    meta = {"help": help, "choices": choices, "type": type, "item": item, "flags": tuple(flags),
            "cli": cli, "metavar": metavar, "prefix": prefix}
    kwargs = {"metadata": meta}
    if default is not _MISSING:
        kwargs["default"] = default
    if default_factory is not _MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def comma_list(item=str):
    """An argparse type: `"a,b,c"` -> a tuple of `item(...)` (blank entries skipped)."""
    def parse(text):
        try:
            return tuple(item(v.strip()) for v in str(text).split(",") if v.strip())
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list such as 1,2,4; got {text!r} ({err})") from None
    parse.__name__ = f"list of {getattr(item, '__name__', 'values')}"
    return parse


class _Extend(argparse.Action):
    """A tuple option: comma-separated values, and repeating the option adds more."""

    def __init__(self, *args, allowed=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None) or ()
        if self.allowed is not None:
            bad = [v for v in values if v not in self.allowed]
            if bad:
                parser.error(f"argument {option_string}: invalid choice(s) {bad} "
                             f"(choose from {', '.join(map(str, self.allowed))})")
        setattr(namespace, self.dest, tuple(current) + tuple(values))


def _base_type(annotation: str) -> str:
    parts = [p.strip() for p in str(annotation).split("|")]
    parts = [p for p in parts if p != "None"]
    return parts[0] if parts else "str"


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls):
    return typing.get_type_hints(cls)


def _option(prefix, name):
    return "--" + (prefix + "-" if prefix else "") + name.replace("_", "-")


def _dest(prefix, name):
    return (prefix + "." if prefix else "") + name


def add_options(parser, cls, *, prefix: str = "", exclude=(), required=None, defaults=None):
    """Adds one option per field of the config dataclass `cls` to `parser`.

    Args:
        parser: an `argparse.ArgumentParser` (or group).
        cls: a dataclass whose fields were made with `setting`. A field whose
            type is itself such a dataclass becomes a group of options
            `--<name-or-its-prefix>-<field>` (e.g. `--eval-eps`).
        prefix: prefix of the option names (used for nested configs).
        exclude: field names that get no option (the command sets them).
        required: field names that must be given (default: fields with no default).
        defaults: values shown in the help instead of the class defaults
            (e.g. a preset's).

    Raises:
        TypeError: a field has no `help` (every setting must say what it does).
    """
    hints = _hints(cls)
    defaults = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help; declare it with "
                            f"tfadv.config.setting(..., help=...)")
        if not meta["cli"]:
            continue
        tp = hints.get(f.name)
        if _is_config(tp):
            sub_prefix = meta.get("prefix") or f.name
            add_options(parser, tp, prefix=(prefix + "-" if prefix else "") + sub_prefix)
            continue
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        if f.name in defaults:
            shown = defaults[f.name]
        elif f.default is not _MISSING:
            shown = f.default
        elif f.default_factory is not _MISSING:
            shown = f.default_factory()
        else:
            shown = None
        is_required = (f.name in required) if required is not None else not has_default
        names = [_option(prefix, f.name), *meta["flags"]]
        kwargs = dict(dest=_dest(prefix, f.name), default=argparse.SUPPRESS,
                      help=meta["help"] + ("" if is_required or shown is None
                                           else f" (default: {_show(shown)})"))
        if is_required:
            kwargs["required"] = True
        base = _base_type(str(f.type))
        if base == "bool" and meta["type"] is None:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if base.startswith("tuple"):
            kwargs["type"] = meta["type"] or comma_list(meta["item"] or str)
            kwargs["action"] = _Extend
            kwargs["allowed"] = meta["choices"]
            if meta["choices"] and "metavar" not in kwargs:
                kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        elif meta["type"] is not None:
            kwargs["type"] = meta["type"]
        elif base in ("int", "float"):
            kwargs["type"] = {"int": int, "float": float}[base]
        if meta["choices"] is not None and not base.startswith("tuple"):
            kwargs["choices"] = list(meta["choices"])
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(*names, **kwargs)


def _show(value):
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return value


def overrides(cls, args, *, prefix: str = "") -> dict:
    """The fields of `cls` the user gave on the command line (nested configs as dicts).

    Args:
        cls: the dataclass given to `add_options`.
        args: the parsed `argparse.Namespace`.

    Returns:
        {field: value} for the options present in `args` (nested config
        fields as their own {field: value} dicts, present only when given).
    """
    hints = _hints(cls)
    given = vars(args)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        if _is_config(tp):
            sub_prefix = f.metadata.get("prefix") or f.name
            sub = overrides(tp, args, prefix=(prefix + "-" if prefix else "") + sub_prefix)
            if sub:
                out[f.name] = sub
        elif _dest(prefix, f.name) in given:
            out[f.name] = given[_dest(prefix, f.name)]
    return out


def build(cls, args, *, base=None, **fixed):
    """A config of type `cls` from parsed options: `base` (or the defaults) updated
    with the given options and `fixed` values; nested configs updated field by field.

    Raises:
        ValueError: from the config's own validation.
    """
    values = overrides(cls, args)
    values.update(fixed)
    if base is None:
        return cls(**{k: _nested(cls, k, v) for k, v in values.items()})
    return replace(base, **values)


def _nested(cls, name, value, current=None):
    tp = _hints(cls).get(name)
    if _is_config(tp) and isinstance(value, dict):
        return tp(**value) if current is None else dataclasses.replace(current, **value)
    return value


def replace(config, **values):
    """`dataclasses.replace` that updates nested config fields from dicts."""
    cls = type(config)
    return dataclasses.replace(config, **{k: _nested(cls, k, v, getattr(config, k))
                                          for k, v in values.items()})
