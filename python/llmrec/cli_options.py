"""Command-line flags generated from option dataclasses, and the values read back.

A field declared with :func:`llmrec.config.option` becomes one ``argparse`` flag carrying its
help text, type, choices and default; a plain field of a method's ``Options`` becomes
``--<method>-<field>`` typed by its annotation. Flags are added with ``default=SUPPRESS``,
so the namespace holds exactly the flags given: a value is then the flag's if given, else the
preset's (:mod:`llmrec.presets`), else the dataclass default, with no second parse.

This module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from llmrec.config import field_default
from llmrec.errors import RunConfigError

__all__ = [
    "add_field_flags",
    "add_method_flags",
    "coerce_option",
    "flag_of",
    "given_fields",
    "given_method_options",
    "option_metavar",
    "show_value",
]


def show_value(value: Any, sep: str = " ") -> str:
    """A default as ``--help`` shows it (``none``, ``1e-3``, a list joined by ``sep`` as the
    flag takes it: ``0.9 0.999`` for ``--adam-betas``, ``q_proj,v_proj`` for a list option)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return sep.join(show_value(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


def _base_type(tp) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _strip_optional(tp) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def option_metavar(tp) -> str:
    """A short upper-case name of an option's type for ``--help`` (``INT``, ``LIST``, ...)."""
    return getattr(_base_type(tp), "__name__", "VALUE").upper()


def coerce_option(name: str, tp, value):
    """``value`` (from JSON or the command line) as option ``name``'s type ``tp``."""
    if value is None:
        return None
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if base in (int, float, str):
            return base(value)
        if base in (list, tuple, dict):
            if isinstance(value, str):
                value = json.loads(value) if value[:1] in "[{" else value.split(",")
            args = [a for a in typing.get_args(_strip_optional(tp)) if a is not Ellipsis]
            if base is not dict and len(args) == 1 and args[0] in (int, float, str):
                value = [args[0](v) for v in value]
            return base(value)
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise RunConfigError(f"option {name}: cannot read {value!r} as {tp}") from exc
    return value


def _declared(f: dataclasses.Field) -> bool:
    """Declared with :func:`llmrec.config.option` (else a plain field of a method's Options)."""
    return "help" in f.metadata


def _is_switch(f: dataclasses.Field, tp) -> bool:
    """A bool option without a ``parse`` is a switch (``--compile``, ``--no-progress``)."""
    return _declared(f) and _base_type(tp) is bool and f.metadata.get("parse") is None


def flag_of(f: dataclasses.Field, tp, prefix: str = "") -> str:
    """The flag of field ``f``: its declared ``flag``, else ``--<prefix><name>`` (a switch
    that turns a True default off: ``--no-<prefix><name>``)."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f"{prefix}{f.name}".replace("_", "-")
    if _is_switch(f, tp) and field_default(f) is True:
        return f"--no-{name}"
    return f"--{name}"


def _cli_default(f: dataclasses.Field) -> Any:
    if f.metadata.get("cli_default", dataclasses.MISSING) is not dataclasses.MISSING:
        return f.metadata["cli_default"]
    return field_default(f)


def _switch_text(default: bool) -> str:
    return "on unless this flag is given" if default else "off by default"


def _add_one(group, f, tp, flag: str, dest: str, default_text: str, extra: str = "") -> None:
    meta = f.metadata
    help_text = meta.get("help") or ""
    if meta.get("required") or ("default" in help_text and not default_text.startswith("preset")):
        default_text = ""  # the help says it already
    help_text = (f"{help_text} ({default_text})" if default_text else help_text) + extra
    help_text = help_text.strip()
    kw: Dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if _is_switch(f, tp):
        kw.update(action="store_const", const=not field_default(f))
    else:
        kw["type"] = meta.get("parse") or str
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        if meta.get("choices") is None:
            kw["metavar"] = meta.get("metavar") or option_metavar(tp)
    if meta.get("required"):
        kw["required"] = True
    group.add_argument(flag, **kw)


def add_field_flags(
    groups: Callable[[Optional[str]], Any],
    cls: type,
    dest_prefix: str,
    *,
    defaults: Optional[Callable[[str, Any], str]] = None,
    skip: Iterable[str] = (),
) -> None:
    """A flag for every command-line field of dataclass ``cls``.

    ``groups(name)`` returns the argparse group of a field's ``group`` metadata; the flags'
    destinations are ``dest_prefix + field name``; ``defaults(field name, default)`` gives
    the text of a default (a preset's values, for example); ``skip``: fields left out.
    """
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    # a keyword-only base's fields (command_options.InputCheckOptions) after the command's own
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.kw_only is True):
        if not f.metadata.get("cli", True) or f.name in skip or not _declared(f):
            continue
        default = _cli_default(f)
        sep = " " if f.metadata.get("nargs") else ","
        text = defaults(f.name, default) if defaults else f"default {show_value(default, sep)}"
        if _is_switch(f, hints[f.name]):
            text = _switch_text(default)
        flag = flag_of(f, hints[f.name])
        _add_one(
            groups(f.metadata.get("group")), f, hints[f.name], flag, dest_prefix + f.name, text
        )


def given_fields(
    ns: argparse.Namespace, cls: type, dest_prefix: str, cli_defaults: bool = True
) -> Dict[str, Any]:
    """``{field name: value}`` of the flags of ``cls`` given on the command line (each passed
    through the field's ``convert``); with ``cli_defaults``, also the declared command-line
    default of a field not given (``option(cli_default=...)``)."""
    out = {}
    for f in dataclasses.fields(cls):
        dest = dest_prefix + f.name
        declared = f.metadata.get("cli_default", dataclasses.MISSING)
        if cli_defaults and not hasattr(ns, dest) and declared is not dataclasses.MISSING:
            out[f.name] = declared
        if hasattr(ns, dest):
            value = getattr(ns, dest)
            convert = f.metadata.get("convert")
            out[f.name] = convert(value) if convert and value is not None else value
    return out


MethodFlags = Dict[str, List[Tuple[str, dataclasses.Field, Any]]]


def add_method_flags(
    parser: argparse.ArgumentParser,
    registry: Mapping[str, type],
    defaults: Optional[Callable[[str, str, Any], str]] = None,
) -> MethodFlags:
    """One flag per option of every method: ``--<method>-<option>``, or the option's declared
    ``flag`` (CoRA's ``--rank``; ``--backend`` of every method that has a ``backend``).

    A flag shared by several methods is added once and applies to whichever is trained.
    Returns ``{flag: [(method, field, type), ...]}`` for :func:`given_method_options`.
    """
    by_flag: MethodFlags = {}
    for name, cls in registry.items():
        hints = typing.get_type_hints(cls.Options)
        for f in dataclasses.fields(cls.Options):
            by_flag.setdefault(flag_of(f, hints[f.name], f"{name}-"), []).append(
                (name, f, hints[f.name])
            )
    for name in registry:
        flags = [(fl, owners) for fl, owners in by_flag.items() if owners[0][0] == name]
        if not flags:
            continue
        g = parser.add_argument_group(f"{name} options (--method {name}; or --method-kwargs)")
        for flag, owners in flags:
            _, f, tp = owners[0]
            default = field_default(f)
            text = defaults(name, f.name, default) if defaults else None
            text = text or f"default {show_value(default, ',')}"
            if _is_switch(f, tp):
                text = _switch_text(default)
            extra = ""
            if len(owners) > 1:
                extra = f"; for --method {', '.join(m for m, _, _ in owners)}"
            _add_one(g, f, tp, flag, "method:" + flag, text, extra)
    return by_flag


def given_method_options(ns: argparse.Namespace, by_flag: MethodFlags, method: str) -> dict:
    """``{option: value}`` of ``method``'s option flags given on the command line.

    A ``--<method>-<option>`` flag of another method is refused (SystemExit with a one-line
    message); a flag with a declared name (``--backend``, CoRA's ``--rank``) sets the
    methods that have the option and leaves the others alone, so one command line can be
    reused across methods."""
    out = {}
    for flag, owners in by_flag.items():
        dest = "method:" + flag
        if not hasattr(ns, dest):
            continue
        mine = [(f, tp) for m, f, tp in owners if m == method]
        if not mine and any(f.metadata.get("flag") for _, f, _ in owners):
            continue
        if not mine:
            names = ", ".join(m for m, _, _ in owners)
            raise SystemExit(f"llmrec train: error: {flag} applies to --method {names} only")
        f, tp = mine[0]
        value = getattr(ns, dest)
        out[f.name] = value if f.metadata.get("parse") else coerce_option(f.name, tp, value)
    return out
