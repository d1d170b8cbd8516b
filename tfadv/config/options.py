"""Command-line options generated from the configuration dataclasses.

Every setting of a command is declared once, as a dataclass field made with
`setting(default, help=...)`; `add_options` turns the fields into argparse
options (`--field-name`, type and choices from the field, the default shown
in the help) and `overrides` reads back the options the user gave, so a
command builds its config as `build(cls, args, base=...)`. `add_command`
makes a sub-command from its configs and its handler, the one way every
`tfadv` command is declared and dispatched.

Option kinds, from the field's annotation:

- int, float, str: one value (`type` and `choices` from the field);
- bool: `--x` / `--no-x`;
- tuple: one or more values, each of which may be comma-separated, and
  repeating the option adds more (`--eps 1 2`, `--eps 1,2`, `--eps 1 --eps 2`);
- a nested config dataclass: its own options, prefixed (`--eval-eps`);
- `positional=True`: a positional argument (a tuple takes one or more
  words, not split at commas).

Only the standard library is imported here: `tfadv --help` stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

_MISSING = dataclasses.MISSING


def setting(default=_MISSING, *, help: str, choices=None, type=None, item=None, flags=(),
            default_factory=_MISSING, cli: bool = True, metavar=None, prefix=None,
            positional: bool = False, words: bool = False):
    """A dataclass field that is also a command-line option.

    Args:
        default / default_factory: as `dataclasses.field` (neither: required).
        help: one line for `--help` (units included: pixels or [0, 1]).
        choices: allowed values (argparse checks them; the config validates again).
        type: an argparse type function (e.g. `tfadv.argtypes.positive_int`);
            default: from the field's annotation (int, float, str; tuples
            take comma-separated `item`s; bools get `--x/--no-x`). For a
            tuple field it parses one command-line word and may return a
            tuple (e.g. `comma_list(float)`) or one value.
        item: element type of a tuple field (default str).
        flags: extra option strings kept for compatibility (e.g. "--lr").
        cli: False for settings that only code sets (objects, callbacks).
        metavar: shown in the help instead of the upper-cased name.
        prefix: for a nested config field, the prefix of its options
            (default: the field name; "" adds the nested options unprefixed).
        positional: a positional argument instead of an option (optional
            when the field has a default; a tuple takes one or more words).
        words: a tuple option that also takes several space-separated words
            (`--eps 1 2 4`). Off by default: such an option would swallow a
            positional argument written after it, so tuple options take one
            comma-separated word (`--eps 1,2,4`) and may be repeated.

    Returns:
        A `dataclasses.Field`.
    """
    meta = {"help": help, "choices": choices, "type": type, "item": item, "flags": tuple(flags),
            "cli": cli, "metavar": metavar, "prefix": prefix, "positional": positional,
            "words": words}
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


def _flatten(values):
    out = []
    for v in values:
        out.extend(v if isinstance(v, (tuple, list)) else (v,))
    return tuple(out)


class _Extend(argparse.Action):
    """A tuple option: one or more words, each comma-separated; repeating it adds more."""

    def __init__(self, *args, allowed=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    def __call__(self, parser, namespace, values, option_string=None):
        values = _flatten(values)
        if self.allowed is not None:
            bad = [v for v in values if v not in self.allowed]
            if bad:
                parser.error(f"argument {option_string or self.dest}: invalid choice(s) "
                             f"{', '.join(map(repr, bad))} "
                             f"(choose from {', '.join(map(str, self.allowed))})")
        current = getattr(namespace, self.dest, None) or ()
        setattr(namespace, self.dest, tuple(current) + values)


def _base_type(annotation: str) -> str:
    parts = [p.strip() for p in str(annotation).split("|")]
    parts = [p for p in parts if p != "None"]
    return parts[0] if parts else "str"


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls):
    return typing.get_type_hints(cls)


def _join(prefix, sub):
    return "-".join(p for p in (prefix, sub) if p)


def _sub_prefix(prefix, field):
    own = field.metadata.get("prefix")
    return _join(prefix, field.name if own is None else own)


def _option(prefix, name):
    return "--" + _join(prefix, name.replace("_", "-"))


def _dest(prefix, name):
    return (prefix + "." if prefix else "") + name


def add_options(parser, cls, *, prefix: str = "", exclude=(), required=None, defaults=None):
    """Adds one option per field of the config dataclass `cls` to `parser`.

    The options default to `argparse.SUPPRESS`: the namespace holds only what
    the user gave, and `build` fills in the rest from the class (or a base
    config), so the defaults are declared once, on the class.

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
            add_options(parser, tp, prefix=_sub_prefix(prefix, f))
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
        text = meta["help"].replace("%", "%%")
        if not is_required and shown is not None:
            text += f" (default: {_show(shown)})".replace("%", "%%")
        base = _base_type(str(f.type))
        is_tuple = base.startswith("tuple")
        kwargs = dict(help=text)
        if meta.get("positional"):
            names = [_dest(prefix, f.name)]
            if is_tuple:
                kwargs["nargs"] = "+" if is_required else "*"
            elif not is_required:
                kwargs["nargs"] = "?"
            if not is_required:
                kwargs["default"] = argparse.SUPPRESS
            kwargs["metavar"] = meta["metavar"] or f.name.upper()
        else:
            names = [_option(prefix, f.name), *meta["flags"]]
            kwargs.update(dest=_dest(prefix, f.name), default=argparse.SUPPRESS)
            if is_required:
                kwargs["required"] = True
            if base == "bool" and meta["type"] is None:
                if f.name.startswith("no_"):
                    # argparse reads --no-x as the negation of --x: name the positive.
                    raise TypeError(f"{cls.__name__}.{f.name}: name a boolean setting by what "
                                    f"True means ({f.name[3:]}=True gives --no-{f.name[3:]}).")
                parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            elif meta["choices"] is None:
                kwargs["metavar"] = _join(prefix, f.name).replace("-", "_").upper()
        if is_tuple:
            # Positional words are taken whole (file names may hold commas).
            item = meta["item"] or str
            kwargs["type"] = meta["type"] or (item if meta.get("positional") else comma_list(item))
            kwargs["action"] = _Extend
            kwargs["allowed"] = meta["choices"]
            if meta.get("positional") or meta.get("words"):
                kwargs.setdefault("nargs", "+")
            if meta["choices"] and "metavar" not in kwargs:
                kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        else:
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            elif base in ("int", "float"):
                kwargs["type"] = {"int": int, "float": float}[base]
            if meta["choices"] is not None:
                kwargs["choices"] = list(meta["choices"])
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
        fields as their own {field: value} dicts, present only when given;
        lists as tuples).
    """
    hints = _hints(cls)
    given = vars(args)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        if _is_config(tp):
            sub = overrides(tp, args, prefix=_sub_prefix(prefix, f))
            if sub:
                out[f.name] = sub
        elif _dest(prefix, f.name) in given:
            value = given[_dest(prefix, f.name)]
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def option_names(cls, *, prefix: str = "", key: str = "") -> dict:
    """The option a user types for each field of `cls`, nested fields by dotted key.

    Returns:
        {"learning_rate": "--lr", "evaluation.eps": "--eval-eps", ...}: a
        field's compatibility flag where it has one (the shorter spelling
        the documentation uses), else its generated option; fields without
        an option are left out.
    """
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not f.init or not meta.get("cli", True):
            continue
        dotted = f"{key}.{f.name}" if key else f.name
        if _is_config(hints.get(f.name)):
            out.update(option_names(hints[f.name], prefix=_sub_prefix(prefix, f), key=dotted))
        elif not meta.get("positional"):
            flags = meta.get("flags") or ()
            out[dotted] = flags[0] if flags else _option(prefix, f.name)
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


def add_command(subparsers, name: str, func, *, help: str, configs=(), description=None):
    """A sub-command: one option per setting of each config, and `func` as its handler.

    `func(args)` receives the parsed namespace (with `args.prog`, e.g.
    "tfadv facenet generate", for messages); it builds its configs with
    `build(cls, args)`, returns None on success and raises on failure.

    Args:
        subparsers: from `parser.add_subparsers()`.
        name: the command's name.
        func: the handler.
        help: one line for the parent's `--help`.
        configs: config dataclasses whose fields become the command's options.
        description: the command's own `--help` text (default: `help`).

    Returns:
        The sub-parser (add the command's own arguments to it).
    """
    parser = subparsers.add_parser(name, help=help, description=description or help)
    for cls in configs:
        add_options(parser, cls)
    parser.set_defaults(func=func, configs=tuple(configs), prog=parser.prog)
    return parser


def add_group(subparsers, name: str, *, help: str, dest: str):
    """A command with sub-commands (e.g. `tfadv facenet`); returns its subparsers."""
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def commands(parser):
    """Yields `(prog, parser)` for every leaf command of `parser` (a parser with handlers)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser.prog, parser
        return
    for action in subs:
        for sub in dict.fromkeys(action.choices.values()):
            yield from commands(sub)
